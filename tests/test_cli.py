"""The command line as users type it: python -m kd_lightning ..., in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED
from data_factory import make_image_tree


def run_cli(
    tmp_path: Path, *args: str, multirun: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0", **(env or {})}
    flags = ["-m"] if multirun else []
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_lightning",
            *flags,
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fast_dev_run_prints_the_table(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "trainer.fast_dev_run=true", "hydra.run.dir=run")
    assert out.returncode == 0, out.stderr
    for row in ("teacher", "student alone", "student distilled", "gain from KD", "outputs:"):
        assert row in out.stdout
    assert "distilled" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.slow  # several command-line runs, over 25 s on 2 cores
def test_a_refused_run_writes_nothing_into_the_run_it_was_refused_for(tmp_path: Path) -> None:
    """The run directory is checked before Hydra or the run write to it: its .hydra/config.yaml (which export reads
    the architecture from), overrides and log stay the finished run's."""
    assert run_cli(tmp_path, "trainer.fast_dev_run=true", "hydra.run.dir=run").returncode == 0
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "cli.log"} <= {
        str(p.relative_to(tmp_path / "run")) for p in before
    }
    out = run_cli(tmp_path, "trainer.fast_dev_run=true", "student=digits_cnn", "hydra.run.dir=run")
    assert out.returncode == 1 and "already holds the results of a run" in out.stderr
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == before


def test_two_by_two_sweep(tmp_path: Path) -> None:
    out = run_cli(
        tmp_path,
        "distill.temperature=1,4",
        "distill.alpha=0.5,0.9",
        "trainer.fast_dev_run=true",
        "baseline=false",
        "hydra.sweep.dir=sweep",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 4
    # the teacher is trained by the first job only; the other three reuse it
    assert [(job.parent / "teacher").exists() for job in jobs] == [True, False, False, False]


def test_bad_temperature_is_one_clear_line(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "distill.temperature=-1", "hydra.run.dir=run")
    assert out.returncode == 1
    assert "error: distill.temperature must be between 0.01 and 100, got -1" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_recipe_names_the_available_ones(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "+recipe=no_such_recipe")
    assert out.returncode != 0
    assert "no_such_recipe" in out.stderr and "digits_quick" in out.stderr


@pytest.mark.parametrize("override", ["teacher=no_such_model", "student=no_such_model"])
def test_unknown_model_names_the_available_ones(tmp_path: Path, override: str) -> None:
    out = run_cli(tmp_path, override)
    assert out.returncode != 0
    assert "no_such_model" in out.stderr and "Available options" in out.stderr


@pytest.mark.slow  # a command line of over 15 s on 2 cores
def test_cifar_recipe_fast_dev_run_on_generated_data(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "cifar", classes=4, per_class={"train": 20, "test": 4})
    # a relative data path means the launch directory: Hydra does not chdir
    out = run_cli(
        tmp_path,
        "+recipe=cifar_resnet",
        "data.data_dir=cifar",
        "data.val_size=10",
        "trainer.fast_dev_run=true",
        "hydra.run.dir=run",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student distilled" in out.stdout
    assert (tmp_path / "run" / "teacher").is_dir()  # no checkpoint given: the teacher stage ran


@pytest.mark.skipif(not (SHARED / "reference" / "repdistiller_cifar").is_dir(), reason="reference checkpoints absent")
def test_cifar_recipe_with_a_repdistiller_teacher_checkpoint(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "cifar", classes=4, per_class={"train": 20, "test": 4})
    checkpoint = SHARED / "reference" / "repdistiller_cifar" / "resnet56.pth"
    out = run_cli(
        tmp_path,
        "+recipe=cifar_resnet",
        "data.data_dir=cifar",
        "data.val_size=10",
        "baseline=false",
        f"teacher.checkpoint={checkpoint}",
        "trainer.fast_dev_run=true",
        "hydra.run.dir=run",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "run" / "teacher").exists()


def test_cifar_recipe_with_missing_data_dir_says_what_to_do(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "+recipe=cifar_resnet", "data.data_dir=nowhere", "data.source=folder", "hydra.run.dir=run")
    assert out.returncode == 1
    assert "error: data directory nowhere does not exist" in out.stderr and "Traceback" not in out.stderr
