"""Sweeps lose nothing: a failing job leaves the others' results; parallel jobs train one teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import run_cli

from kd_lightning.run.report import collect

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def test_a_bad_value_in_any_job_stops_the_sweep_before_the_first_job_trains(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "distill.temperature=2,4,-1", *FAST, "hydra.sweep.dir=sweep", multirun=True)
    assert out.returncode == 1
    line = next(line for line in out.stderr.splitlines() if line.startswith("error:"))
    assert line.startswith("error: sweep job 2 (") and "distill.temperature=-1" in line
    assert "temperature must be between 0.01 and 100" in line and "Nothing was started" in line
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow  # over 30 s on 2 cores
def test_a_failing_job_leaves_the_others_and_is_reported(tmp_path: Path) -> None:
    # speed.chunk_rows on image data is found when the job has built its data, not before the sweep starts
    out = run_cli(tmp_path, "speed.chunk_rows=null,16,null", *FAST, "hydra.sweep.dir=sweep", multirun=True)
    assert out.returncode != 0  # the sweep says something failed...
    assert "speed.chunk_rows is for language models" in out.stderr
    rows = collect(tmp_path / "sweep")  # ...and every other job finished and kept its results
    assert [r["status"] for r in rows] == ["ok", "FAILED", "ok"]
    assert [next(o for o in r["overrides"].split() if o.startswith("speed.chunk_rows")) for r in rows] == [
        "speed.chunk_rows=null",
        "speed.chunk_rows=16",
        "speed.chunk_rows=null",
    ]
    assert rows[1]["error"].startswith("speed.chunk_rows is for language models")
    report = subprocess.run(
        [sys.executable, "-m", "kd_lightning.run.report", str(tmp_path / "sweep")], capture_output=True, text=True
    )
    assert report.returncode == 0 and "FAILED" in report.stdout
    assert "job 1 failed: speed.chunk_rows is for language models" in report.stdout
    assert (tmp_path / "sweep" / "report.csv").is_file()


@pytest.mark.slow  # two processes at once
def test_parallel_jobs_share_one_teacher_training(tmp_path: Path) -> None:
    env = {**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kd_lightning",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                f"distill.temperature={t}",
                *FAST,
                f"hydra.run.dir=run_{t}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in (2, 8)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    trained = [(tmp_path / f"run_{t}" / "teacher").is_dir() for t in (2, 8)]
    assert sorted(trained) == [False, True]  # one job trained the teacher, the other waited and reused it
    assert len(list((tmp_path / "cache" / "trained_teachers").glob("*.pth"))) == 1
    assert not list((tmp_path / "cache" / "trained_teachers").glob(".*.pth.*"))  # no half-written temp file left


@pytest.mark.slow  # over 30 s on 2 cores
def test_an_optuna_search_maximises_validation_accuracy_and_trains_the_teacher_once(tmp_path: Path) -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason='the search needs pip install "kd_lightning[search]"'
    )
    out = run_cli(
        tmp_path, "+recipe=digits_search", "hydra.sweeper.n_trials=2", *FAST, "hydra.sweep.dir=search", multirun=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert log.count("teacher: no checkpoint given, training one") == 1 and log.count("teacher: reusing") == 1
    trials = collect(tmp_path / "search")
    assert len(trials) == 2 and all(t["status"] == "ok" and t["val"] is not None for t in trials)
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert round(100 * best["best_value"], 2) == max(
        t["val"] for t in trials
    )  # the validation accuracy, not the test's
    report = subprocess.run(
        [sys.executable, "-m", "kd_lightning.run.report", str(tmp_path / "search")], capture_output=True, text=True
    )
    assert "best of 2 trials: validation accuracy" in report.stdout and "distill.temperature=" in report.stdout
