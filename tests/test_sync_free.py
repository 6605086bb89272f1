"""The training step never waits for the device: no host read of a device value in the step, the loss
composition, the schedules or the logging path (progress bar included).

On a GPU a few steps run under ``torch.cuda.set_sync_debug_mode("error")``. On a CPU every tensor is on
the host, so the test watches the operations that are host reads on a GPU instead: a dispatch mode
records ``item()`` / ``float()`` / ``bool()`` of a tensor (``aten::_local_scalar_dense``), data-dependent
shapes (``nonzero``, ``masked_select``, boolean indexing) and ``equal``, with the Python frames that
called them, and fails on any called from kd_lightning or from Lightning's logging of our values.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd_lightning import DistillationModule, LossMix
from kd_lightning.data import DigitsDataModule
from kd_lightning.loss.objectives import dkd_loss
from kd_lightning.models import GPT, DigitsCNN
from kd_lightning.progress import StageProgress

HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::equal",
    "aten::is_nonzero",
    "aten::unique_consecutive",
    "aten::_unique2",
}
WATCHED = (
    "kd_lightning",
    "logger_connector",
    "test_sync_free",
)  # our code, Lightning turning logged values into numbers


class HostReadWatch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            frames = [
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()
                if any(part in f.filename for part in WATCHED)
            ]
            if frames:
                self.reads.append(f"{func._schema.name} from " + " <- ".join(reversed(frames)))
        return func(*args, **(kwargs or {}))


class WatchSteps(L.Callback):
    """Watch from the start of step ``first`` to the start of step ``last`` (the first step's one-time checks are
    allowed their host reads); everything Lightning does in between, logging included, is inside the window."""

    def __init__(self, first: int = 1, last: int = 4) -> None:
        self.first, self.last = first, last
        self.mode = HostReadWatch()
        self.watched_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.mode.__enter__()
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("error")
        elif trainer.global_step == self.last:
            self.stop()
        if self.first <= trainer.global_step < self.last:
            self.watched_steps += 1

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self.mode.__exit__(None, None, None)


def run_steps(module: DistillationModule, data: L.LightningDataModule, tmp_path: Path) -> WatchSteps:
    watch = WatchSteps()
    trainer = L.Trainer(
        max_steps=5,
        accelerator="auto",
        devices=1,
        log_every_n_steps=50,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[watch, StageProgress("distilled", terminal=True, refresh_steps=100)],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    assert watch.watched_steps == 3
    return watch


@pytest.mark.parametrize("mix", ["kd", "dkd_with_schedules"])
def test_a_distillation_step_makes_no_host_reads(mix: str, tmp_path: Path) -> None:
    if mix == "kd":
        loss_mix = LossMix(temperature=4.0, alpha=0.9)
    else:  # a labelled objective, a scheduled temperature and a scheduled term weight
        loss_mix = LossMix(
            objective=dkd_loss,
            alpha=None,
            weights={"ce": 1.0},
            schedules={
                "temperature": {"kind": "cosine", "start": 8, "end": 2, "length": 10, "interval": "step"},
                "dkd": {"kind": "warmup", "start": 0, "end": 1, "length": 3, "interval": "step"},
            },
        )
    module = DistillationModule(DigitsCNN(width=8, hidden=16), DigitsCNN(), num_classes=10, loss_mix=loss_mix)
    watch = run_steps(module, DigitsDataModule(batch_size=32, labeled_fraction=0.5), tmp_path)
    assert watch.mode.reads == []


@pytest.mark.parametrize("chunk_rows", [None, 12])
def test_a_token_step_makes_no_host_reads(chunk_rows: int | None, tmp_path: Path) -> None:
    class Tokens(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 64, (40, 9), generator=g)
            labels = ids[:, 1:].clone()
            labels[::3, :2] = -100
            mask = torch.ones(40, 8, dtype=torch.long)
            mask[::4, 6:] = 0
            rows = [{"inputs": ids[i, :-1], "labels": labels[i], "attention_mask": mask[i]} for i in range(40)]
            return torch.utils.data.DataLoader(rows, batch_size=8)

    torch.manual_seed(0)
    module = DistillationModule(
        GPT(64, 8, dim=16, depth=1, heads=2),
        GPT(72, 8, dim=32, depth=1, heads=2),
        num_classes=64,
        task="tokens",
        loss_mix=LossMix(temperature=1.0, alpha=0.5),
        chunk_rows=chunk_rows,
    )
    with torch.no_grad():
        module.teacher.model.head.weight[64:] = 0  # padding rows the teacher never predicts ...
    module.teacher.model.head = torch.nn.Linear(32, 72)
    with torch.no_grad():
        module.teacher.model.head.bias[64:] = -1e4  # ... so the vocabularies are aligned on every step
    module.teacher.model.requires_grad_(False)
    watch = run_steps(module, Tokens(), tmp_path)
    assert watch.mode.reads == []


def test_the_watch_sees_a_host_read(tmp_path: Path) -> None:
    """The check can fail: a step that reads its loss on the host is caught."""

    class Reads(DistillationModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if loss > 100:  # data-dependent Python branching on a device value
                raise AssertionError
            return loss

    module = Reads(DigitsCNN(width=8, hidden=16), DigitsCNN(), num_classes=10)
    watch = run_steps(module, DigitsDataModule(batch_size=32), tmp_path)
    assert len(watch.mode.reads) == 3  # once per watched step
    assert "_local_scalar_dense from" in watch.mode.reads[0] and "training_step" in watch.mode.reads[0]
