"""A callback that kills a run part-way, as a pre-emption would (used by tests/test_resume.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class Preempted(RuntimeError):
    pass


class CrashAtStep(L.Callback):
    """Raise at global step ``step`` of the stage whose directory is named ``stage``."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if Path(trainer.default_root_dir).name == self.stage and trainer.global_step == self.step:
            raise Preempted(f"simulated pre-emption at step {self.step} of stage {self.stage}")


class PoisonAtStep(L.Callback):
    """Make the student's weights NaN at global step ``step`` of the stage whose directory is named ``stage``, as a
    diverging run does."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if Path(trainer.default_root_dir).name == self.stage and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.student.parameters()).fill_(float("nan"))
