"""A run killed part-way and re-run with ckpt_path=last ends with the same weights as one that was not."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from crash_callback import Preempted

from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
CRASH = [
    "+callbacks.crash._target_=crash_callback.CrashAtStep",
    "+callbacks.crash.stage=distilled",
    "+callbacks.crash.step=6",
]


def student_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(run / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_resume_after_a_crash_gives_the_uninterrupted_weights(make_cfg, tmp_path: Path, caplog) -> None:
    uninterrupted = train(make_cfg(*FAST, output_dir=tmp_path / "a"))

    with pytest.raises(Preempted):
        train(make_cfg(*FAST, *CRASH, output_dir=tmp_path / "b"))  # dies in epoch 1 of the distilled stage
    saved = torch.load(
        tmp_path / "b" / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["epoch"] == 0 and not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert not (tmp_path / "b" / "metrics.json").exists()

    with caplog.at_level("WARNING", logger="kd_lightning"), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        # the crash callback is gone on the resume: a change of settings, named as such
        resumed = train(
            make_cfg(*FAST, "ckpt_path=last", "changed_on_resume=[callbacks.crash]", output_dir=tmp_path / "b")
        )
    assert not [w for w in warned if "Checkpoint directory" in str(w.message)]  # Lightning's, about the resumed stage
    assert "stage distilled: ckpt_path=last" not in caplog.text  # resumed
    assert "stage baseline: ckpt_path=last, but there is no" in caplog.text  # killed before it started: said so
    for stage in ("distilled", "baseline"):
        a, b = student_weights(tmp_path / "a", stage), student_weights(tmp_path / "b", stage)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)
        assert resumed[stage] == uninterrupted[stage]
        # every row of the curves, the ones logged before the interruption too, as the uninterrupted run wrote them
        assert metrics_rows(tmp_path / "b", stage) == metrics_rows(tmp_path / "a", stage), stage


def metrics_rows(run: Path, stage: str) -> list[dict[str, float]]:
    import csv

    with open(run / stage / "metrics.csv", newline="") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def test_ckpt_path_other_than_last_is_explained(make_cfg) -> None:
    from kd_lightning import KDError

    with pytest.raises(KDError, match="ckpt_path must be null or 'last'"):
        train(make_cfg("ckpt_path=/some/file.ckpt"))


def test_a_run_killed_while_summarising_reads_its_finished_stages_back(make_cfg, tmp_path: Path, caplog) -> None:
    """Killed after its stages finished, before metrics.json: ckpt_path=last must not fit them again (their
    metrics.csv went from 23 lines to 2, curves.png was redrawn empty)."""
    first = train(make_cfg(*FAST, output_dir=tmp_path / "a"))
    (tmp_path / "a" / "metrics.json").unlink()
    logs = {stage: (tmp_path / "a" / stage / "metrics.csv").read_bytes() for stage in ("distilled", "baseline")}
    checkpoints = {stage: (tmp_path / "a" / stage / "checkpoints" / "last.ckpt").read_bytes() for stage in logs}
    with caplog.at_level("INFO", logger="kd_lightning"):
        again = train(make_cfg(*FAST, "ckpt_path=last", output_dir=tmp_path / "a"))
    for stage in logs:
        assert f"stage {stage}: finished earlier; its results and weights are read back" in caplog.text
        assert (tmp_path / "a" / stage / "metrics.csv").read_bytes() == logs[stage]
        assert (tmp_path / "a" / stage / "checkpoints" / "last.ckpt").read_bytes() == checkpoints[stage]
        assert again[stage] == first[stage]
    assert again["gain"] == first["gain"] and (tmp_path / "a" / "metrics.json").is_file()


def test_an_earlier_run_is_resumed_or_replaced_never_mixed_with(make_cfg, tmp_path: Path) -> None:
    """Without ckpt_path=last or overwrite=true a killed run's folder is refused, untouched; overwrite=true replaces
    what the library wrote as one set (no last-v1.ckpt beside a stale last.ckpt) and keeps the user's own files."""
    from kd_lightning import KDError

    run = tmp_path / "b"
    with pytest.raises(Preempted):
        train(make_cfg(*FAST, *CRASH, output_dir=run))
    killed = (run / "distilled" / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(
        KDError,
        match="holds the checkpoints of an earlier run .*pass ckpt_path=last to resume it, "
        "overwrite=true to replace it",
    ):
        train(make_cfg(*FAST, output_dir=run))
    with pytest.raises(
        KDError,
        match=r"differ from those the run .* was made with \(.hydra/config.yaml\): callbacks.crash: "
        r"\{.*CrashAtStep.*\} -> \(unset\); .* changed_on_resume=\[callbacks.crash\]",
    ):
        train(make_cfg(*FAST, "ckpt_path=last", output_dir=run))
    assert (run / "distilled" / "checkpoints" / "last.ckpt").read_bytes() == killed
    (run / "notes.txt").write_text("mine")
    results = train(make_cfg(*FAST, "trainer.max_epochs=2", "overwrite=true", output_dir=run))
    written = sorted(str(p.relative_to(run)) for p in run.rglob("*.ckpt"))
    assert not [name for name in written if "-v1" in name], written
    assert (
        torch.load(run / "distilled" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
        == 1
    )
    assert (run / "notes.txt").read_text() == "mine" and results["distilled"]["test/acc"] >= 0


def test_a_resume_with_other_settings_is_refused_unless_the_changes_are_named(make_cfg, tmp_path: Path, caplog) -> None:
    """Stages trained at T=4 must not be resumed under T=1 while the log and .hydra/config.yaml say T=1."""
    import yaml

    from kd_lightning import KDError

    run = tmp_path / "a"
    train(make_cfg(*FAST, output_dir=run))
    (run / "metrics.json").unlink()  # killed while summarising
    saved = (run / ".hydra" / "config.yaml").read_bytes()
    with pytest.raises(
        KDError,
        match=r"distill.alpha: 0.9 -> 0.5, distill.temperature: 4.0 -> 1.0; resume with its "
        r"settings, or .* changed_on_resume=\[distill.alpha,distill.temperature\]\.$",
    ):
        train(make_cfg(*FAST, "ckpt_path=last", "distill.temperature=1", "distill.alpha=0.5", output_dir=run))
    assert (run / ".hydra" / "config.yaml").read_bytes() == saved and not (run / "metrics.json").exists()

    # a run made before a release added settings (here: teacher.fit.pretrained, off) resumes
    old = yaml.safe_load(saved)
    del old["teacher"]["fit"]["pretrained"]
    del old["distill"]["on_policy"]  # added later too: sampling nothing, it changes nothing
    del old["distill"]["on_policy_stages"], old["teacher"]["shard"]  # no more stages; sharding only under trainer=fsdp
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(old))
    # where and how visibly it works may change
    train(
        make_cfg(
            *FAST, "ckpt_path=last", "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=5", output_dir=run
        )
    )
    (run / "metrics.json").unlink()
    with caplog.at_level("WARNING", logger="kd_lightning"):
        train(
            make_cfg(
                *FAST,
                "ckpt_path=last",
                "trainer.max_epochs=4",
                "changed_on_resume=[trainer.max_epochs]",
                output_dir=run,
            )
        )
    assert "ckpt_path=last with changed settings (changed_on_resume): trainer.max_epochs: 3 -> 4" in caplog.text
    resumes = yaml.safe_load((run / ".hydra" / "resumes.yaml").read_text())
    assert [entry["changed"] for entry in resumes] == [{"trainer.max_epochs": {"was": 3, "now": 4}}]
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["max_epochs"] == 4

    # a changed_on_resume entry that names no setting; a run whose record of its settings is gone
    (run / "metrics.json").unlink()
    with pytest.raises(KDError, match=r"changed_on_resume names distill.temprature, a setting neither this run nor"):
        train(make_cfg(*FAST, "ckpt_path=last", "changed_on_resume=[distill.temprature]", output_dir=run))
    (run / ".hydra" / "config.yaml").unlink()
    with pytest.raises(KDError, match=r"holds checkpoints but not .hydra/config.yaml, the record of the settings"):
        train(make_cfg(*FAST, "ckpt_path=last", "distill.temperature=1", output_dir=run))
    assert not (run / ".hydra" / "config.yaml").exists() and not (run / "metrics.json").exists()


def test_a_run_saved_before_its_targets_moved_resumes_without_a_change() -> None:
    """0.5 moved kd_lightning.losses and .schedules into kd_lightning.loss: a saved ``_target_`` there is no change."""
    from kd_lightning.run.run_dir import differences

    def run(loss: str, scheduler: str) -> dict:
        return {
            "distill": {"loss": {"_target_": loss, "_partial_": True}, "temperature": 2.0},
            "optim": {"scheduler": {"_target_": scheduler}},
        }

    saved = run("kd_lightning.losses.jsd_loss", "kd_lightning.schedules.WarmupCosineLR")
    assert (
        differences(saved, run("kd_lightning.loss.objectives.jsd_loss", "kd_lightning.loss.schedules.WarmupCosineLR"))
        == {}
    )
    assert differences(
        saved, run("kd_lightning.loss.objectives.kd_loss", "kd_lightning.loss.schedules.WarmupCosineLR")
    ) == {"distill.loss._target_": ("kd_lightning.losses.jsd_loss", "kd_lightning.loss.objectives.kd_loss")}
