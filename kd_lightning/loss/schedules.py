"""Schedules for the temperature, alpha and any loss-term weight (``distill.schedules``).

A schedule maps training progress, counted in epochs or optimizer steps, to a value::

    distill.schedules.temperature: {kind: cosine, start: 8, end: 2, length: 30}       # per epoch
    distill.schedules.alpha:       {kind: linear, start: 0, end: 0.9, length: 500, interval: step}
    distill.schedules.dkd:         {kind: warmup, start: 0, end: 1, length: 20}       # a term's weight
    distill.schedules.temperature: {kind: step, start: 8, milestones: [10, 20], gamma: 0.5}

:class:`WarmupCosineLR` is the learning-rate schedule of the language-model recipe (``optim=adamw_warmup_cosine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from kd_lightning.errors import KDError

KINDS = ("constant", "linear", "warmup", "cosine", "step")


@dataclass
class Schedule:
    """``value(progress)`` for progress ``p`` in epochs (``interval=epoch``) or steps (``interval=step``).

    - constant: ``start``;
    - linear: ``start → end`` over ``length``, then ``end`` (``start`` at ``p = 0``);
    - warmup: the same ramp counted from 1, ``start + (end − start)·min((p + 1)/length, 1)``: the
      first epoch already gets ``1/length`` of the way (DKD's warm-up, as published);
    - cosine: ``end + (start − end)·(1 + cos(π·p/length))/2``, then ``end``;
    - step: ``start · gamma^(number of milestones ≤ p)``.
    """

    kind: str = "constant"
    start: float = 0.0
    end: float | None = None
    length: int | None = None
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    interval: str = "epoch"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KDError(f"schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.interval not in ("epoch", "step"):
            raise KDError(f"schedule interval must be epoch or step, got {self.interval!r}.")
        if self.kind in ("linear", "warmup", "cosine") and (self.end is None or not self.length or self.length <= 0):
            raise KDError(
                f"a {self.kind} schedule needs end=... and length=... (> 0, in {self.interval}s), "
                f"e.g. {{kind: {self.kind}, start: 8, end: 2, length: 30}}."
            )

    def extremes(self) -> tuple[float, float]:
        """The smallest and largest value the schedule ever takes (it is monotone between them)."""
        if self.kind == "constant":
            values = [self.start]
        elif self.kind == "step":
            values = [self.start * self.gamma**k for k in range(len(self.milestones) + 1)]
        else:
            values = [self.start, self.end]
        return min(values), max(values)

    def value(self, epoch: int, step: int) -> float:
        progress = epoch if self.interval == "epoch" else step
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return self.start * self.gamma ** sum(progress >= m for m in self.milestones)
        fraction = min((progress + (self.kind == "warmup")) / self.length, 1.0)
        if self.kind in ("linear", "warmup"):
            return self.start + (self.end - self.start) * fraction
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * fraction)) / 2


def build_schedules(config: Mapping[str, Any] | None) -> dict[str, Schedule]:
    """``{name: Schedule}`` from ``{name: {kind: ..., ...}}`` (or already-built schedules)."""
    schedules = {}
    for name, spec in (config or {}).items():
        if spec is None:
            continue
        if isinstance(spec, Schedule):
            schedules[name] = spec
            continue
        try:
            schedules[name] = Schedule(**dict(spec))
        except TypeError as exc:
            raise KDError(
                f"distill.schedules.{name}: {exc}; a schedule takes kind, start, end, length, "
                "milestones, gamma, interval."
            ) from None
    return schedules


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Learning rate: a linear warm-up over ``warmup_steps``, then a cosine to ``min_lr_ratio``·lr at
    ``total_steps``; stepped after every optimizer step (``interval = "step"``), as language models train.

    ``total_steps=None`` means the whole run: :class:`~kd_lightning.DistillationModule` sets it from
    ``trainer.estimated_stepping_batches`` when it builds the optimizer.
    """

    interval = "step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1) or not 0 <= min_lr_ratio <= 1:
            raise KDError(
                f"WarmupCosineLR needs warmup_steps >= 0, total_steps >= 1 (or null) and min_lr_ratio in [0, 1]; "
                f"got {warmup_steps}, {total_steps}, {min_lr_ratio}."
            )
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps if self.total_steps is not None else step + 1
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def optimizer_config(
    optimizer: torch.optim.Optimizer, scheduler_factory: Any, stepping_batches: Callable[[], int]
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, with its scheduler stepped once per epoch or once per
    optimizer step (a scheduler whose ``interval`` is ``"step"``); a :class:`WarmupCosineLR` without ``total_steps``
    lasts ``stepping_batches()``, the whole run."""
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if getattr(scheduler, "total_steps", 0) is None:
        scheduler.total_steps = int(stepping_batches())
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": getattr(scheduler, "interval", "epoch")},
    }
