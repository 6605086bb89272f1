"""Two processes on CPU (gloo): DDP from the command line, the digits default end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import run_cli

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.models import DigitsCNN

FAST = ["trainer.max_epochs=2", "trainer.limit_train_batches=4"]


def single_process_val_acc(checkpoint: Path) -> float:
    module = DistillationModule.load_from_checkpoint(checkpoint, student=DigitsCNN(width=16, hidden=64, dropout=0.0))
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.splits["val"].inputs, dm.splits["val"].targets
    with torch.no_grad():
        return (module.student.eval()(x).argmax(-1) == y).float().mean().item()


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_process_run_end_to_end(tmp_path: Path, strategy: str) -> None:
    out = run_cli(tmp_path, "trainer.devices=2", f"trainer.strategy={strategy}", *FAST, "hydra.run.dir=run")
    aborts = [line for line in out.stderr.splitlines() if "terminate called" in line or "what():" in line]
    assert out.returncode == 0, "\n".join([*aborts, out.stderr[-3000:]])
    run = tmp_path / "run"
    assert out.stdout.count("student distilled") == 1  # one summary, from rank 0
    results = json.loads((run / "metrics.json").read_text())
    # the teacher stage ran once, shared by both ranks, and was cached once
    assert (run / "teacher" / "checkpoints" / "last.ckpt").is_file()
    assert len(list((tmp_path / "cache" / "trained_teachers").glob("*.pth"))) == 1
    # metrics reduced over both ranks equal a one-process evaluation of the same weights
    expected = single_process_val_acc(run / "distilled" / "checkpoints" / "last.ckpt")
    assert results["distilled"]["val/acc"] == pytest.approx(expected, abs=1e-6)
    assert "train_ddp_process_1" not in {p.name for p in run.iterdir()}
