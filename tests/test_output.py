"""What a run prints, and the loggers it writes to: quiet, one bar per stage, the same metric names everywhere."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import settings_of

from kd_lightning import DistillationModule
from kd_lightning.data import DigitsDataModule
from kd_lightning.models import DigitsCNN
from kd_lightning.progress import StageProgress
from kd_lightning.run.stages import make_logger, make_trainer
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def test_a_run_on_a_pipe_prints_plain_lines_and_no_lightning_chatter(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_lightning",
            "trainer.accelerator=cpu",
            *FAST,
            "trainer.log_every_n_steps=1",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert "\r" not in printed
    for noise in ("GPU available", "Tip:", "LeafSpec", "Trainer.fit` stopped", "Validation DataLoader", "Testing"):
        assert noise not in printed, noise
    for stage in ("teacher", "distilled", "baseline"):
        assert f"stage {stage}: epoch 2/2, loss " in printed and "val acc " in printed
    assert out.stderr == "" and len(out.stdout.splitlines()) < 25  # a glance: log lines, then the table


def test_on_a_terminal_each_stage_has_one_bar_with_loss_and_validation_accuracy(tmp_path: Path, capsys) -> None:
    module = DistillationModule(DigitsCNN(width=4, hidden=8, dropout=0.0), DigitsCNN(), num_classes=10)
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[StageProgress("distilled", terminal=True, refresh_steps=2)],
    ).fit(module, datamodule=DigitsDataModule())
    printed = capsys.readouterr().err
    final = printed.split("\r")[-1]
    assert final.startswith("distilled: 100%") and "8/8" in final and "loss=" in final and "val acc=" in final
    assert "Validation" not in printed and "Sanity" not in printed


def test_on_a_pipe_a_long_epoch_still_gets_a_line_every_so_often(tmp_path: Path, caplog) -> None:
    """A pipe heard of a run only at epoch boundaries: hours of silence in a long epoch. A line comes when the last is
    line_seconds old (here 0: every step), with the step, the loss and the rate."""
    module = DistillationModule(DigitsCNN(width=4, hidden=8, dropout=0.0), DigitsCNN(), num_classes=10)
    with caplog.at_level("INFO", logger="kd_lightning"):
        L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[StageProgress("distilled", terminal=False, line_seconds=0)],
        ).fit(module, datamodule=DigitsDataModule())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage distilled: step")]
    assert [line.split(",")[0] for line in lines] == [
        "stage distilled: step 1/3",
        "stage distilled: step 2/3",
        "stage distilled: step 3/3",
    ]
    assert all(", epoch 1, loss " in line and line.endswith(" steps/s") for line in lines)


def test_the_progress_bar_switch_still_works(make_cfg) -> None:
    def bars(*overrides: str) -> int:
        return sum(
            isinstance(c, StageProgress)
            for c in make_trainer(settings_of(make_cfg(*overrides)).run, "distilled").callbacks
        )

    assert bars("trainer.enable_progress_bar=true") == 1
    assert bars("trainer.enable_progress_bar=false") == 0


@pytest.mark.parametrize("name, package", [("csv", None), ("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_every_logger_config_constructs_under_the_stage_directory(
    make_cfg, tmp_path: Path, name: str, package: str | None
) -> None:
    if package:
        pytest.importorskip(package, reason=f'logger={name} needs pip install "kd_lightning[{name}]"')
    logger = make_logger(settings_of(make_cfg(f"logger={name}")).run, "distilled")
    assert Path(logger.save_dir) == tmp_path / "run" / "distilled"
    if name == "wandb":
        assert logger._offline and logger._wandb_init["name"] == "distilled" and logger._wandb_init["group"] == "run"


def test_the_metric_names_are_the_same_in_every_logger(make_cfg, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason='logger=tensorboard needs pip install "kd_lightning[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = {}
    for logger in ("csv", "tensorboard"):
        train(
            make_cfg(
                f"logger={logger}", "trainer.log_every_n_steps=1", "baseline=false", *FAST, output_dir=tmp_path / logger
            )
        )
    with open(tmp_path / "csv" / "distilled" / "metrics.csv") as handle:
        names["csv"] = set(next(csv.reader(handle))) - {"epoch", "step"}
    names["tensorboard"] = set()
    for events in (tmp_path / "tensorboard" / "distilled").glob("events.out.tfevents.*"):  # fit and test write one each
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        names["tensorboard"] |= set(accumulator.Tags()["scalars"]) - {"epoch"}
    assert names["csv"] == names["tensorboard"]
    assert {"train/loss", "train/kd", "val/acc", "test/acc", "test/agreement"} <= names["csv"]


def test_lightning_is_hushed_unless_hydra_verbose_asks() -> None:
    import logging

    from kd_lightning.progress import lightning_hushed

    pytorch_logger, asked = logging.getLogger("lightning.pytorch"), logging.getLogger("lightning")
    before = pytorch_logger.level, asked.level
    try:
        with lightning_hushed():
            assert not pytorch_logger.isEnabledFor(logging.INFO)
        asked.setLevel(logging.DEBUG)  # what hydra.verbose=lightning does
        with lightning_hushed():
            assert pytorch_logger.isEnabledFor(logging.INFO)
    finally:
        pytorch_logger.setLevel(before[0])
        asked.setLevel(before[1])
    assert pytorch_logger.level == before[0]
