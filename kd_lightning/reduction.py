"""The reduction: the sum over the positions that count, and what it is divided by.

Every loss term of the library is a value per position (a sample, or a token) reduced here:
the sum over the positions that count (the batch says which: :func:`kd_lightning.data.batch.counted`,
``batch["kept"]``), divided by a count. That count is the number of
positions kept in the call, or ``num_kept`` when given: the kept positions of a whole optimizer
step (all micro-batches of a gradient accumulation, all ranks), so that the loss and its
gradients do not depend on how the same examples were split. The loss mix, the public
objectives (:mod:`kd_lightning.losses`) and the chunked loss (:mod:`kd_lightning.chunked`) all
reduce through :func:`reduce`.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def reduce(per_position: Tensor, keep: Tensor | None = None, num_kept: Tensor | float | None = None,
           scale: float = 1.0) -> Tensor:
    """``scale · Σ_kept per_position / count``; positions that do not count contribute exactly 0 (their NaN too).

    Args:
        per_position: ``(N,)`` or ``(N, L)`` values, one per position.
        keep: bool of the same shape, True where a position counts; ``None``: all.
        num_kept: the divisor (see :func:`count`); default the positions kept here.
        scale: a constant factor (``T²`` for the objectives that ask for it).
    """
    if keep is not None and keep.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match the logits' positions "
                         f"{tuple(per_position.shape)}; it must have one entry per row of logits.")
    kept = per_position if keep is None else torch.where(keep, per_position, torch.zeros_like(per_position))
    loss = kept.sum() / count(keep, per_position, num_kept)
    return loss * scale if scale != 1 else loss
