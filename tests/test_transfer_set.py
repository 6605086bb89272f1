"""The default demo's setting: a transfer set, labels for a fixed share of the training images (students only)."""

from __future__ import annotations

import pytest
import torch
from conftest import settings_of

from kd_lightning import DistillationModule, KDError
from kd_lightning.data import DigitsDataModule
from kd_lightning.models import DigitsCNN
from kd_lightning.run.teachers import train_teacher, trained_teacher_path


def test_the_students_see_a_fixed_share_of_the_labels_and_the_teacher_all() -> None:
    data = DigitsDataModule(labeled_fraction=0.15)
    data.setup()
    every = DigitsDataModule()
    every.setup()
    labels = data.splits["train"].targets
    assert int((labels != -100).sum()) == round(0.15 * len(labels))
    kept = labels != -100
    assert torch.equal(labels[kept], every.splits["train"].targets[kept])  # the kept ones are the true labels
    again = DigitsDataModule(labeled_fraction=0.15)
    again.setup()
    assert torch.equal(again.splits["train"].targets, labels)  # the same images in every run
    with data.teacher_view():
        assert torch.equal(data.splits["train"].targets, every.splits["train"].targets)
    assert torch.equal(data.splits["train"].targets, labels)
    for split in ("val", "test"):
        assert torch.equal(data.splits[split].targets, every.splits[split].targets)


def test_a_batch_without_labels_trains_on_the_teacher_alone() -> None:
    student, teacher = DigitsCNN(width=8, hidden=16), DigitsCNN()
    batch = {"inputs": torch.rand(4, 1, 8, 8), "labels": torch.full((4,), -100)}
    module = DistillationModule(student, teacher, num_classes=10, temperature=4.0, alpha=0.9)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    alone = DistillationModule(student, None, num_classes=10, alpha=0.0)
    assert alone.training_step(batch, 0).item() == 0.0  # no label, no teacher: nothing to learn, and no NaN


def test_the_teacher_stage_trains_on_teacher_view(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg("data.labeled_fraction=0.15", "trainer.fast_dev_run=true")
    assert trained_teacher_path(settings_of(cfg)) == trained_teacher_path(
        settings_of(make_cfg("data.labeled_fraction=1.0", "trainer.fast_dev_run=true"))
    )
    data = DigitsDataModule(labeled_fraction=0.15)
    seen = []
    monkeypatch.setattr(
        "kd_lightning.run.teachers.run_stage",
        lambda *args, **kwargs: (seen.append(data.splits["train"].targets.clone()), ({}, DigitsCNN()))[1],
    )
    train_teacher(settings_of(cfg), data, trained_teacher_path(settings_of(cfg)))
    assert (seen[0] != -100).all()


@pytest.mark.parametrize("fraction", [0.0, 1.5, True])
def test_a_bad_labeled_fraction_is_one_line(fraction) -> None:
    with pytest.raises(KDError, match="data.labeled_fraction must be in \\(0, 1\\]"):
        DigitsDataModule(labeled_fraction=fraction)
