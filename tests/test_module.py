"""DistillationModule: the frozen teacher, the loss mix, checkpoints, hooks and argument checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import DistillationModule, KDError, kd_loss
from kd_lightning.data import DigitsDataModule
from kd_lightning.models import DigitsCNN


def small_student() -> DigitsCNN:
    return DigitsCNN(width=4, hidden=8, dropout=0.0)


def fit(module: DistillationModule, tmp_path: Path, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def test_teacher_weights_and_batchnorm_buffers_never_change(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = DigitsCNN()  # has BatchNorm and dropout: both would change it in train mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(small_student(), teacher, num_classes=10)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    fit(module, tmp_path)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())


class RecordingModule(DistillationModule):
    """Records the teacher's mode and grad state at every training step."""

    seen: list

    def teacher_forward(self, batch):
        out = super().teacher_forward(batch)
        if self.trainer.training:
            self.seen.append((self.teacher.training, out.requires_grad, torch.is_grad_enabled()))
        return out


def test_teacher_stays_in_eval_mode_and_outside_autograd(tmp_path: Path) -> None:
    module = RecordingModule(small_student(), DigitsCNN(), num_classes=10)
    module.seen = []
    module.train()  # even an explicit .train() leaves the teacher in eval mode
    assert not module.teacher.training and module.student.training
    fit(module, tmp_path)
    assert module.seen and all(mode == (False, False, True) for mode in module.seen)


def test_teacher_is_not_in_the_optimizer(tmp_path: Path) -> None:
    module = DistillationModule(small_student(), DigitsCNN(), num_classes=10)
    trainer = fit(module, tmp_path)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.student.parameters()}


def test_checkpoint_holds_the_student_only_and_reloads_without_teacher(tmp_path: Path) -> None:
    module = DistillationModule(small_student(), DigitsCNN(), num_classes=10, temperature=3.0, alpha=0.7)
    trainer = fit(module, tmp_path)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["state_dict"] and not any(k.startswith("teacher.") for k in saved["state_dict"])
    reloaded = DistillationModule.load_from_checkpoint(path, student=small_student())
    assert reloaded.teacher is None
    assert (reloaded.temperature, reloaded.alpha) == (3.0, 0.7)
    for key, value in module.student.state_dict().items():
        assert torch.equal(reloaded.student.state_dict()[key], value)


def test_checkpoint_of_another_student_is_refused(tmp_path: Path) -> None:
    trainer = fit(DistillationModule(small_student(), DigitsCNN(), num_classes=10), tmp_path)
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    with pytest.raises(Exception, match="student"):
        DistillationModule.load_from_checkpoint(
            tmp_path / "s.ckpt", student=nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        )


def batch_of(n: int = 8, classes: int = 10):
    torch.manual_seed(0)
    return torch.rand(n, 1, 8, 8), torch.randint(0, classes, (n,)), torch.arange(n)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_mixes_ce_and_kd_by_alpha(alpha: float) -> None:
    student, teacher = small_student(), DigitsCNN().eval()
    module = DistillationModule(student, teacher, num_classes=10, temperature=2.0, alpha=alpha)
    x, y, _ = batch = batch_of()
    loss = module.training_step(batch, 0)
    s, t = student(x), teacher(x)
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, t, 2.0)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_alpha_zero_never_runs_the_teacher() -> None:
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("teacher called")

    module = DistillationModule(small_student(), Exploding(), num_classes=10, alpha=0.0)
    module.training_step(batch_of(), 0)


def test_subclass_can_replace_one_hook() -> None:
    class ReverseKD(DistillationModule):
        def distillation_loss(self, student_out, teacher_out, batch):
            return kd_loss(teacher_out, student_out, self.temperature)

    student, teacher = small_student(), DigitsCNN().eval()
    module = ReverseKD(student, teacher, num_classes=10, temperature=2.0, alpha=1.0)
    x, _, _ = batch = batch_of()
    assert torch.allclose(module.training_step(batch, 0), kd_loss(teacher(x), student(x), 2.0), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be between 0.01 and 100"),
        ({"temperature": -1.0}, "temperature must be between 0.01 and 100"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"num_classes": 100}, "built for 10 classes but the data has 100"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    args = {"student": small_student(), "teacher": DigitsCNN(), "num_classes": 10, **kwargs}
    with pytest.raises(KDError, match=message):
        DistillationModule(**args)


def test_class_count_mismatch_is_caught_on_the_first_batch() -> None:
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))  # no num_classes attribute to check early
    module = DistillationModule(student, teacher, num_classes=10)
    with pytest.raises(KDError, match="teacher 7, student 10"):
        module.training_step(batch_of(), 0)


def test_nan_teacher_logits_stop_training() -> None:
    class NaNTeacher(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float("nan"))

    module = DistillationModule(small_student(), NaNTeacher(), num_classes=10)
    with pytest.raises(KDError, match="NaN or Inf"):
        module.training_step(batch_of(), 0)


def test_kd_without_a_teacher_fails_when_fit_starts(tmp_path: Path) -> None:
    with pytest.raises(KDError, match="needs a teacher"):
        fit(DistillationModule(small_student(), None, num_classes=10, alpha=0.5), tmp_path)


def test_validation_and_test_log_teacher_accuracy_and_agreement(tmp_path: Path) -> None:
    module = DistillationModule(small_student(), DigitsCNN(), num_classes=10)
    trainer = fit(module, tmp_path)
    assert {
        "val/acc",
        "val/loss",
        "val/teacher_acc",
        "val/agreement",
        "train/loss",
        "train/ce",
        "train/kd",
    } <= trainer.callback_metrics.keys()
    (test,) = trainer.test(module, datamodule=DigitsDataModule(batch_size=64), verbose=False)
    assert {"test/acc", "test/teacher_acc", "test/agreement"} <= test.keys()


def test_fidelity_metrics_match_a_direct_computation(tmp_path: Path) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    torch.manual_seed(0)
    module = DistillationModule(small_student(), DigitsCNN(), num_classes=10)
    trainer = fit(module, tmp_path)
    dm = DigitsDataModule(batch_size=64)
    (test,) = trainer.test(module, datamodule=dm, verbose=False)
    dm.setup()
    x, y = dm.splits["test"].inputs, dm.splits["test"].targets
    with torch.no_grad():
        s, t = module.student.eval()(x), module.teacher(x)
    p_t = t.softmax(-1)
    kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    assert test["test/kl_t1"] == pytest.approx(kl.item(), rel=1e-4)
    assert test["test/agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).float().mean().item(), abs=1e-6)
    assert test["test/ece"] == pytest.approx(
        multiclass_calibration_error(s.softmax(-1), y, 10, n_bins=15).item(), abs=1e-5
    )
    assert test["test/teacher_ece"] == pytest.approx(
        multiclass_calibration_error(p_t, y, 10, n_bins=15).item(), abs=1e-5
    )


def test_a_ce_of_weight_zero_is_not_computed() -> None:
    """alpha=1: the CE term weighs 0, so training does not compute it (a tenth of a large-vocabulary step); the loss is
    the objective alone, and validation still reports val/loss (the CE)."""
    calls = []

    class Counting(DistillationModule):
        def task_loss(self, student_logits, batch):
            calls.append(1)
            return super().task_loss(student_logits, batch)

    torch.manual_seed(0)
    module = Counting(
        DigitsCNN(width=4, hidden=8, dropout=0.0), DigitsCNN(), num_classes=10, alpha=1.0, temperature=2.0
    )
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss = module.training_step((x, y), 0)
    assert not calls
    with torch.no_grad():
        expected = kd_loss(module.student(x), module.teacher(x), 2.0)
    torch.testing.assert_close(loss, expected)
    module.validation_step((x, y), 0)
    assert calls == [1]
