"""A new kind of teacher is one class: the module asks the :class:`~kd_lightning.teacher.Teacher` interface, never its
class. Here a teacher that is any function of the batch (no network in this process) trains the student exactly as a
live teacher running the same function does, and what needs a network is refused or skipped, not mistaken."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from kd_lightning import DistillationModule, KDError
from kd_lightning.data import DigitsDataModule
from kd_lightning.data.batch import Batch
from kd_lightning.loss.mix import LossMix
from kd_lightning.models import DigitsCNN
from kd_lightning.teacher import Teacher


class FunctionTeacher(Teacher):
    """The teacher's logits are ``fn(batch["inputs"])``: a rule, a cache, a remote call. It has no network here."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def logits(self, batch: Batch, split: str) -> Tensor:
        with torch.no_grad():
            return self.fn(batch["inputs"])


def fitted_student(teacher, tmp_path: Path) -> tuple[DistillationModule, dict[str, float]]:
    L.seed_everything(0)
    module = DistillationModule(DigitsCNN(width=4, hidden=8, dropout=0.0), teacher, num_classes=10)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return module, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_teacher_that_is_a_function_of_the_batch_trains_like_the_same_function_live(tmp_path: Path) -> None:
    torch.manual_seed(1)
    network = DigitsCNN().eval()
    live, live_metrics = fitted_student(network, tmp_path / "live")
    function, function_metrics = fitted_student(FunctionTeacher(network), tmp_path / "function")
    for key, value in live.student.state_dict().items():
        torch.testing.assert_close(function.student.state_dict()[key], value, rtol=0, atol=0)
    assert function_metrics == live_metrics  # the teacher's own accuracy and the agreement metrics too
    assert "val/teacher_acc" in function_metrics


def test_what_needs_the_teachers_network_is_refused_for_a_teacher_without_one() -> None:
    teacher = FunctionTeacher(nn.Linear(64, 10))
    assert teacher.network is None and not teacher.scores_new_sequences
    features = [{"student": "features", "teacher": "features"}]
    with pytest.raises(KDError, match="needs the live teacher's activations"):
        DistillationModule(
            DigitsCNN(width=4, hidden=8),
            teacher,
            num_classes=10,
            loss_mix=LossMix(temperature=4.0, alpha=0.9, features=features),
        )
