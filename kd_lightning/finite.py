"""A training step that went non-finite stops the run, said in one line, before a checkpoint can keep it.

:class:`NonFiniteWatch` records on the device, without reading it in the step, the first step whose loss, a loss
term or a gradient was NaN or infinite; :meth:`NonFiniteWatch.check` reads that record where the host reads anyway
(a step the loggers write, an epoch's last batch, before its validation and checkpoint) and raises
:class:`~kd_lightning.KDError` naming the step and what went non-finite, and the last checkpoint to resume from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDError


class NonFiniteWatch:
    """The first step at which the loss, a term or the gradients went non-finite, kept on the device."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.first_step: Tensor | None = None  # () long: -1 while every step was finite
        self.bad: Tensor | None = None  # (len(names),) bool: what was non-finite at that step

    def watch(self, step: int, values: Mapping[str, Tensor]) -> None:
        """Record ``values`` (``{"loss": ..., term: ..., "gradients": ...}``, tensors) of training step ``step``."""
        device = next(iter(values.values())).device
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=device)
            self.bad = torch.zeros(0, dtype=torch.bool, device=device)
        for name in values:
            if name not in self.names:
                self.names.append(name)
                self.bad = torch.cat([self.bad, self.bad.new_zeros(1)])
        fine = torch.zeros((), dtype=torch.bool, device=device)
        bad = torch.stack(
            [~torch.isfinite(values[name].detach()).all() if name in values else fine for name in self.names]
        )
        new = ((self.first_step < 0) | (self.first_step == step)) & bad.any()  # the gradients come after the loss
        self.first_step = torch.where(new, step, self.first_step)
        self.bad = torch.where(new, self.bad | bad, self.bad)

    def watch_gradients(self, step: int, parameters: Iterable[nn.Parameter]) -> None:
        """Record whether the gradients of ``parameters`` are finite (this process's shards, under ``trainer=fsdp``)."""
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
        if grads:
            self.watch(step, {"gradients": torch.stack(torch._foreach_norm(grads)).sum()})

    def check(self, strategy: Any = None, checkpoint_dir: str | None = None) -> None:
        """Raise :class:`KDError` if a step went non-finite (on any process: one reduction, where ``strategy`` has
        several). A host read: call it where the host reads anyway."""
        if self.first_step is None:
            return
        step = self.first_step
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            worst = torch.where(step < 0, torch.full_like(step, torch.iinfo(torch.long).max), step)
            step = strategy.reduce(worst, reduce_op="min")
            step = torch.where(step == torch.iinfo(torch.long).max, torch.full_like(step, -1), step)
        first = int(step)
        if first < 0:
            return
        what = ", ".join(name for name, bad in zip(self.names, self.bad.tolist()) if bad) or "on another process"
        last = Path(checkpoint_dir) / "last.ckpt" if checkpoint_dir else None
        kept = (
            f"the last checkpoint, {last}, was written before it: fix the cause and resume from it with ckpt_path=last"
            if last is not None and last.exists()
            else "no checkpoint was written yet: fix the cause and run again"
        )
        raise KDError(
            f"training went non-finite at step {first} ({what}: NaN or infinite); the run stops here and {kept} "
            "(a lower learning rate, trainer.gradient_clip_val=1.0 or a lower distill.temperature are the usual "
            "fixes)."
        )
