"""A run whose loss goes NaN stops at once with one line, keeps its last good checkpoint, and resumes from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning import KDError, jsd_loss, kd_loss
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
POISON = [
    "+callbacks.poison._target_=crash_callback.PoisonAtStep",
    "+callbacks.poison.stage=distilled",
    "+callbacks.poison.step=6",
]


def test_a_loss_that_goes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KDError) as refused:
        train(
            make_cfg(*FAST, *POISON, output_dir=run)
        )  # the student's weights turn NaN in epoch 1 of the distilled stage
    line = str(refused.value)
    assert line.startswith("training went non-finite at step 6 (loss, ce, kd, gradients: NaN or infinite)"), line
    last = run / "distilled" / "checkpoints" / "last.ckpt"
    assert f"the last checkpoint, {last}, was written before it" in line and "ckpt_path=last" in line
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and all(
        v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point()
    )
    assert not (run / "metrics.json").exists() and not (run / "baseline").exists()

    resumed = train(make_cfg(*FAST, "ckpt_path=last", "changed_on_resume=[callbacks.poison]", output_dir=run))
    uninterrupted = train(make_cfg(*FAST, output_dir=tmp_path / "clean"))
    assert resumed["distilled"] == uninterrupted["distilled"]


def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    from test_cli import run_cli

    tests = {"PYTHONPATH": str(Path(__file__).resolve().parent)}  # where crash_callback is
    out = run_cli(tmp_path, *FAST, *POISON, "baseline=false", "hydra.run.dir=run", env=tests)
    assert out.returncode == 1
    assert out.stderr.startswith("error: training went non-finite at step 6") and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("objective", [kd_loss, jsd_loss])
def test_nan_logits_given_to_an_objective_are_named(objective) -> None:
    logits = torch.randn(4, 10)
    bad = logits.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits hold NaN"):
        objective(bad, logits, 2.0)
    with pytest.raises(ValueError, match=r"teacher_logits hold NaN"):
        objective(logits, bad, 2.0)
