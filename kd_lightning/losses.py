"""Distillation objectives as pure functions.

Every function takes raw logits, ``(N, C)`` for classification or ``(N, L, C)`` for
sequences, and returns a scalar. The maths runs in float32 whatever the autocast dtype,
and both distributions come from ``log_softmax`` so a very confident teacher never
produces ``log(0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_loss", "KDLoss", "positions_to_keep"]


def positions_to_keep(
    logits: Tensor,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor | None:
    """Boolean mask of the positions that count, shape ``logits.shape[:-1]``, or ``None`` for all.

    ``mask`` is True where a position is kept; ``labels == ignore_index`` drops a position.
    """
    keep = None
    if mask is not None:
        keep = mask.to(torch.bool)
    if ignore_index is not None:
        if labels is None:
            raise ValueError("ignore_index needs labels: pass labels=... of shape logits.shape[:-1].")
        by_label = labels != ignore_index
        keep = by_label if keep is None else keep & by_label
    if keep is not None and keep.shape != logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(keep.shape)} does not match the logits' positions "
            f"{tuple(logits.shape[:-1])}; it must have one entry per row of logits."
        )
    return keep


def mean_over_positions(per_position: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``per_position`` over kept positions; masked positions contribute exactly zero."""
    if keep is None:
        return per_position.mean()
    kept = torch.where(keep, per_position, torch.zeros_like(per_position))
    return kept.sum() / keep.sum().clamp_min(1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = True,
) -> Tensor:
    """Hinton KD: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over positions.

    Args:
        student_logits: ``(N, C)`` or ``(N, L, C)``.
        teacher_logits: same shape as ``student_logits``; no gradient flows into it.
        temperature: ``T > 0``; both sides are divided by it before the softmax.
        mask: optional bool ``(N,)`` / ``(N, L)``, True where a position counts.
        labels, ignore_index: positions whose label equals ``ignore_index`` are dropped.
        scale_by_t2: multiply by ``T²`` so gradient magnitudes do not shrink as ``1/T²``.

    Returns:
        Scalar: the sum over classes of ``p_t (log p_t − log p_s)``, averaged over kept
        positions (``batchmean`` for ``(N, C)`` input), times ``T²``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; teacher and student must "
            "predict the same number of classes."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    keep = positions_to_keep(student_logits, mask, labels, ignore_index)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    loss = mean_over_positions(per_position, keep)
    return loss * temperature**2 if scale_by_t2 else loss


class KDLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`kd_loss` with a fixed temperature."""

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.scale_by_t2 = scale_by_t2

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
        return kd_loss(
            student_logits, teacher_logits, self.temperature, scale_by_t2=self.scale_by_t2, **kwargs
        )
