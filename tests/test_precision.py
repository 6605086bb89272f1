"""Mixed precision: bf16-mixed runs on CPU, and the KD loss is computed in float32 regardless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_factory import make_image_tree

from kd_lightning import DistillationModule, kd_loss
from kd_lightning.models import DigitsCNN
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def test_kd_loss_under_bf16_autocast_is_float32_and_close_to_full_precision() -> None:
    torch.manual_seed(0)
    student, teacher = DigitsCNN(width=8, hidden=16, dropout=0.0).eval(), DigitsCNN().eval()
    module = DistillationModule(student, teacher, num_classes=10, temperature=4.0, alpha=0.9)
    batch = {"inputs": torch.rand(64, 1, 8, 8), "labels": torch.randint(0, 10, (64,))}
    full = module.training_step(batch, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.training_step(batch, 0)
        s, t = student(batch["inputs"]), teacher(batch["inputs"])
        kd = kd_loss(s, t, 4.0)
    assert s.dtype == torch.bfloat16  # the networks really ran in bf16
    assert mixed.dtype == torch.float32 and kd.dtype == torch.float32
    assert torch.equal(kd, kd_loss(s.float(), t.float(), 4.0))  # the loss maths itself is float32
    assert mixed.item() == pytest.approx(full.item(), rel=3e-2)


def test_digits_default_trains_in_bf16_mixed(make_cfg) -> None:
    results = train(make_cfg(*FAST, "trainer.precision=bf16-mixed"))
    assert 0 < results["distilled"]["test/acc"] <= 1


@pytest.mark.slow  # over 30 s on 2 cores
def test_cifar_recipe_fast_dev_run_in_bf16_mixed(make_cfg, tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "cifar", classes=4, per_class={"train": 12, "test": 4})
    results = train(
        make_cfg(
            "+recipe=cifar_resnet",
            f"data.data_dir={root}",
            "data.val_size=8",
            "trainer.fast_dev_run=true",
            "trainer.precision=bf16-mixed",
        )
    )
    assert "test/acc" in results["distilled"]
