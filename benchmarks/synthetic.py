"""Shared by the benchmarks: CIFAR-shaped synthetic data, and device/precision helpers."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kd_lightning.data import InMemoryDataModule
from kd_lightning.data.augment import RandomCropFlip


class SyntheticCIFAR(InMemoryDataModule):
    """Random uint8 ``(N, 3, 32, 32)`` images held in memory, served like CIFARDataModule serves
    the real ones: crop + flip (optional) and normalisation batched on the device."""

    input_shape = (3, 32, 32)

    def __init__(
        self, size: int, num_classes: int, batch_size: int, augment: bool = True, channels_last: bool = False
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=512,
            drop_last=True,
            num_classes=num_classes,
            augment=RandomCropFlip(4, True) if augment else None,
        )
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)
        self.channels_last = channels_last

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        small = slice(0, min(512, len(self.labels)))
        return {
            "train": (self.images, self.labels),
            "val": (self.images[small], self.labels[small]),
            "test": (self.images[small], self.labels[small]),
        }

    def prepare_inputs(self, inputs: Tensor) -> Tensor:
        x = inputs.float().div_(255).sub_(0.5).div_(0.25)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def on_device(model: nn.Module, device: str, channels_last: bool) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class EpochTimer(L.Callback):
    """Wall time of each training epoch (the device synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)


class StepWindow(L.Callback):
    """Times a run from the start of step ``warmup`` (compilation and allocator warm-up left out) to its end;
    with a ``barrier``, concurrent jobs all start their window together."""

    def __init__(self, warmup: int, device: str, barrier: Any = None) -> None:
        self.warmup, self.device, self.barrier = warmup, device, barrier
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            synchronize(self.device)
            if self.barrier is not None:
                self.barrier.wait()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def quiet_lightning() -> None:
    """Keep Lightning's banners (GPU available, tips) out of the benchmark's output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
