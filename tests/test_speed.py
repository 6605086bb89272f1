"""Speed switches change how the step runs, not what it computes: compiled and channels-last steps equal
the eager step within float rounding; bad settings are one line."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning import DistillationModule, KDError
from kd_lightning.data import DigitsDataModule
from kd_lightning.models import DigitsCNN
from kd_lightning.speed import SpeedSettings


def trained_student(settings: SpeedSettings, tmp_path: Path, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    student, teacher = (
        DigitsCNN(width=8, hidden=16, dropout=0.0),
        DigitsCNN(),
    )  # no dropout: compiled code draws other masks
    data = DigitsDataModule(batch_size=64, drop_last=True)
    data.memory_format = settings.memory_format()
    module = DistillationModule(settings.prepare(student), settings.prepare(teacher), num_classes=10)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    return copy.deepcopy(student.state_dict())


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()  # parameter names unchanged: checkpoints load either way
    for key in a:
        torch.testing.assert_close(b[key].contiguous(), a[key].contiguous(), rtol=1e-4, atol=1e-5, msg=key)


def test_channels_last_trains_the_same_student(tmp_path: Path) -> None:
    eager = trained_student(SpeedSettings(), tmp_path)
    assert_same_training(eager, trained_student(SpeedSettings(channels_last=True), tmp_path))


def test_a_compiled_step_trains_the_same_student(tmp_path: Path) -> None:
    eager = trained_student(SpeedSettings(), tmp_path)
    try:
        compiled = trained_student(SpeedSettings(compile=True), tmp_path)
    except Exception as error:  # no C++ toolchain for inductor on this machine
        if "compiler" in str(error).lower() or "InductorError" in type(error).__name__:
            pytest.skip(f"torch.compile cannot build here: {error}")
        raise
    assert_same_training(eager, compiled)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compile_mode": "fast"}, "speed.compile_mode must be one of default, reduce-overhead"),
        ({"compile": "yes"}, "speed.compile must be true or false"),
    ],
)
def test_bad_speed_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(KDError, match=message):
        SpeedSettings(**settings)


def test_speed_settings_from_the_command_line(make_cfg) -> None:
    from kd_lightning.run.train import train

    results = train(make_cfg("speed.channels_last=true", "trainer.fast_dev_run=true"))
    assert 0 <= results["distilled"]["test/acc"] <= 1
    with pytest.raises(KDError, match="unknown setting speed.jit"):
        train(make_cfg("+speed.jit=true"))
