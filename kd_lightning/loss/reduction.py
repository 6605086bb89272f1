"""The reduction: the sum over the positions that count, and what it is divided by.

Every loss term of the library is a value per position (a sample, or a token) reduced here:
the sum over the positions that count (the batch says which: :func:`kd_lightning.data.batch.counted`,
``batch["kept"]``), divided by a count. That count is the number of
positions kept in the call, or ``num_kept`` when given: the kept positions of a whole optimizer
step (all micro-batches of a gradient accumulation, all ranks), so that the loss and its
gradients do not depend on how the same examples were split. The loss mix, the public
objectives (:mod:`kd_lightning.loss.objectives`) and the chunked loss (:mod:`kd_lightning.loss.chunked`) all
reduce through :func:`reduce`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn


def both(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """The positions kept by both masks (``None``: all positions)."""
    if first is None or second is None:
        return second if first is None else first
    return first & second


def count(keep: Tensor | None, like: Tensor, num_kept: Tensor | float | None = None) -> Tensor:
    """The divisor: ``num_kept`` when given, else the number of kept positions of ``like`` (all, without ``keep``);
    at least 1, so a step where nothing counts gives 0, not NaN."""
    if num_kept is None:
        num_kept = like.numel() if keep is None else keep.sum()
    dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
    return torch.as_tensor(num_kept, dtype=dtype, device=like.device).clamp_min(1)


def reduce(
    per_position: Tensor, keep: Tensor | None = None, num_kept: Tensor | float | None = None, scale: float = 1.0
) -> Tensor:
    """``scale · Σ_kept per_position / count``; positions that do not count contribute exactly 0 (their NaN too).

    Args:
        per_position: ``(N,)`` or ``(N, L)`` values, one per position.
        keep: bool of the same shape, True where a position counts; ``None``: all.
        num_kept: the divisor (see :func:`count`); default the positions kept here.
        scale: a constant factor (``T²`` for the objectives that ask for it).
    """
    if keep is not None and keep.shape != per_position.shape:
        raise ValueError(
            f"mask shape {tuple(keep.shape)} does not match the logits' positions "
            f"{tuple(per_position.shape)}; it must have one entry per row of logits."
        )
    kept = per_position if keep is None else torch.where(keep, per_position, torch.zeros_like(per_position))
    loss = kept.sum() / count(keep, per_position, num_kept)
    return loss * scale if scale != 1 else loss


class StepTokens:
    """One normaliser per optimizer step, when a step spans several micro-batches (gradient accumulation) or processes.

    Each micro-batch's loss is a mean over its kept positions; averaging those (as Lightning's accumulation and DDP's
    gradient averaging do) weighs a position of a short micro-batch more than one of a long one. Instead the module
    returns each micro-batch's *sum* (its mean times its count, :meth:`add`), and before the optimizer steps
    (:meth:`finish`) the gradients are multiplied by ``micro_batches · world_size / N``, ``N`` the kept positions of
    the whole step on every process: the gradient is the one of the mean over all of the step's positions, whatever
    the split. Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` (also in an epoch's last,
    shorter step) and DDP averages over the processes; the factor undoes exactly those. The logged loss and terms are
    the same step means.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    @property
    def pending(self) -> bool:
        return bool(self.sums)

    def add(self, loss: Tensor, terms: dict[str, Tensor], kept: Tensor) -> Tensor:
        """Count one micro-batch (``kept``: its number of kept positions); return the sum to back-propagate."""
        kept = kept.detach().to(torch.float32)
        values = {"positions": kept, "loss": loss.detach() * kept} | {
            name: value.detach() * kept for name, value in terms.items()
        }
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        return loss * kept.to(loss.dtype)

    def finish(
        self, strategy: Any, parameters: Iterable[nn.Parameter], micro_batches: int, world_size: int
    ) -> dict[str, Tensor]:
        """Scale the accumulated gradients to the step's mean (one all-reduce); return ``{"loss": ..., term: ...}``, the
        step's means, and start the next step."""
        names = list(self.sums)
        totals = strategy.reduce(torch.stack([self.sums[name].float() for name in names]), reduce_op="sum")
        positions = totals[0].clamp(min=1)
        factor = (micro_batches * world_size / positions).to(torch.float32)
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(factor.to(parameter.grad.dtype))
        self.sums = {}
        return {name: (total / positions).to(torch.float32) for name, total in zip(names[1:], totals[1:])}
