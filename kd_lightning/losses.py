"""Distillation objectives as pure functions.

Every objective takes raw logits, ``(N, C)`` for classification or ``(N, L, C)`` for
sequences, and returns a scalar: the per-position divergence averaged over the kept
positions (``batchmean`` for ``(N, C)``), optionally times ``T²``. The maths runs in at least
float32 whatever the autocast dtype (float64 stays float64), and the distributions come from
``log_softmax`` so a very confident teacher never produces ``log(0)``.

Shared keyword arguments:
    temperature: ``T > 0``; both sides are divided by it before the softmax.
    mask: optional bool ``(N,)`` / ``(N, L)``, True where a position counts.
    labels, ignore_index: positions whose label equals ``ignore_index`` are dropped.
    scale_by_t2: multiply by ``T²`` so gradient magnitudes do not shrink as ``1/T²``.
    num_kept: divide the sum over kept positions by this count instead of the number kept in
        this call: the kept tokens of a whole optimizer step (all micro-batches of a gradient
        accumulation, all ranks), so that the loss and its gradients do not depend on the split.
    standardize: z-score each row of both logits before the temperature (logit
        standardisation, Sun et al. 2024); ``T`` then acts as a base temperature.

Any callable ``f(student_logits, teacher_logits, temperature=T, labels=y) -> scalar`` can
serve as an objective (``distill.loss._target_``); these all accept that call.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDError

__all__ = ["kd_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "dkd_loss", "standardize_logits", "KDLoss", "positions_to_keep", "check_temperature"]

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


def mean_over_positions(per_position: Tensor, keep: Tensor | None, num_kept: Tensor | float | None = None) -> Tensor:
    """Sum of ``per_position`` over kept positions divided by ``num_kept`` (default: how many are kept
    here, at least 1); masked positions contribute exactly zero."""
    if keep is None and num_kept is None:
        return per_position.mean()
    kept = per_position if keep is None else torch.where(keep, per_position, torch.zeros_like(per_position))
    if num_kept is None:
        num_kept = keep.sum().clamp_min(1)
    return kept.sum() / num_kept


# Beyond these the T²-scaled divergence is numerically meaningless: at large T the float32
# rounding of KL (about 1e-7 of log C) times T² swamps the term (≈ Var(s − t)/2), at T = 100
# already about 1%; at small T the T² factor (1e-4 at T = 0.01) makes it vanish.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def check_temperature(temperature: float) -> None:
    """Raise :class:`~kd_lightning.KDError` (a ``ValueError``) unless ``0.01 <= temperature <= 100``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise KDError(f"distill.temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}, got {temperature} "
                      "(beyond them the T²-scaled term is rounding noise or vanishes). The usual values are 1-8 "
                      "(4 in the CIFAR recipe); set e.g. distill.temperature=4.")


def at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row over its classes: ``(z − mean) / (std + eps)`` (unbiased std, as in Sun et al. 2024).

    ``-inf`` entries (masked classes) are left out of the mean and std and stay ``-inf``.
    """
    finite = torch.isfinite(logits)
    count = finite.sum(-1, keepdim=True)
    kept = torch.where(finite, logits, torch.zeros_like(logits))
    mean = kept.sum(-1, keepdim=True) / count
    centred = torch.where(finite, logits - mean, torch.zeros_like(logits))
    std = (centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    return torch.where(finite, centred / (std + eps), logits)


def tempered_log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, standardize: bool) -> tuple[Tensor, Tensor]:
    """Check shapes and ``T``; return ``log softmax(s/T)``, ``log softmax(t/T)`` (teacher detached)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; teacher and student must "
            "predict the same number of classes."
        )
    check_temperature(temperature)
    s, t = at_least_float32(student_logits), at_least_float32(teacher_logits.detach())
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ_c p (log p − log q)`` per row, from log-probabilities; never below 0 (rounding).

    A class with ``p = 0`` (a ``-inf`` logit: a masked or padded vocabulary row) contributes
    exactly 0, also where ``q = 0`` too, and no NaN reaches the gradient.
    """
    p = log_p.exp()
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * log_ratio).sum(-1).clamp_min(0)


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(weight·p + (1 − weight)·q)`` elementwise, finite gradients where both are 0 (``-inf``)."""
    a = log_p + (math.log(weight) if weight > 0 else -math.inf)
    b = log_q + (math.log1p(-weight) if weight < 1 else -math.inf)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros_like(a)
    mixed = torch.logaddexp(torch.where(both_zero, zero, a), torch.where(both_zero, zero, b))
    return torch.where(both_zero, torch.full_like(a, -math.inf), mixed)


def reduce_positions(per_position: Tensor, logits: Tensor, mask: Tensor | None, labels: Tensor | None,
                     ignore_index: int | None, temperature: float, scale_by_t2: bool,
                     num_kept: Tensor | float | None = None) -> Tensor:
    loss = mean_over_positions(per_position, positions_to_keep(logits, mask, labels, ignore_index), num_kept)
    return loss * temperature**2 if scale_by_t2 else loss


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Forward KL, Hinton KD (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    Args:
        student_logits: ``(N, C)`` or ``(N, L, C)``.
        teacher_logits: same shape as ``student_logits``; no gradient flows into it.
        temperature, mask, labels, ignore_index, scale_by_t2, standardize: see the module docstring.

    Returns:
        Scalar: the sum over classes of ``p_t (log p_t − log p_s)``, averaged over kept
        positions (``batchmean`` for ``(N, C)`` input), times ``T²`` by default.
    """
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    per_position = kl_rows(log_p_teacher, log_p_student)
    return reduce_positions(per_position, student_logits, mask, labels, ignore_index, temperature, scale_by_t2, num_kept)


def reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = False,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Reverse KL: ``KL(softmax(s/T) ‖ softmax(t/T)) = Σ p_s (log p_s − log p_t)``, mode-seeking.

    Used for generative students (MiniLLM, Gu et al. 2024). ``T²`` scaling is off by default.
    """
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    per_position = kl_rows(log_p_student, log_p_teacher)
    return reduce_positions(per_position, student_logits, mask, labels, ignore_index, temperature, scale_by_t2, num_kept)


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = False,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence between teacher and student, ``beta ∈ [0, 1]``.

    Convention used here: the mixture is ``M = beta·p_t + (1−beta)·p_s`` and

        ``JSD_beta = (1−beta)·KL(p_t ‖ M) + beta·KL(p_s ‖ M)``

    so ``beta=0`` is exactly forward KL ``KL(p_t ‖ p_s)``, ``beta=1`` exactly reverse KL
    ``KL(p_s ‖ p_t)``, ``beta=0.5`` the symmetric JSD, and the loss is continuous in between.
    GKD (Agarwal et al. 2024) and TRL weight the two terms the other way round,
    ``beta·KL(p_t ‖ M) + (1−beta)·KL(p_s ‖ M)``, which tends to 0 at both ends (TRL then
    special-cases beta=0 and beta=1); the two agree at 0.5. ``T²`` scaling is off by default.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}: 0 is forward KL, 1 reverse KL, 0.5 symmetric JSD.")
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    log_m = log_mixture(log_p_teacher, log_p_student, beta)
    per_position = torch.zeros_like(log_m[..., 0])
    if beta < 1:
        per_position = per_position + (1 - beta) * kl_rows(log_p_teacher, log_m)
    if beta > 0:
        per_position = per_position + beta * kl_rows(log_p_student, log_m)
    return reduce_positions(per_position, student_logits, mask, labels, ignore_index, temperature, scale_by_t2, num_kept)


def skew_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    skew: float = 0.1,
    reverse: bool = False,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = False,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): KL against a mixture that keeps the student's side finite.

    Forward (``reverse=False``): ``KL(p_t ‖ skew·p_t + (1−skew)·p_s)``; reverse:
    ``KL(p_s ‖ skew·p_s + (1−skew)·p_t)``. ``skew ∈ [0, 1)``: 0 is plain forward / reverse KL;
    the paper's default is 0.1. Mixing in a little of the first distribution bounds the log-ratio
    by ``−log(skew)``, so a token the student gives almost no probability cannot blow the loss up.
    """
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}: 0 is plain KL, the DistiLLM default 0.1 (at 1 the loss is always 0).")
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    first, second = (log_p_student, log_p_teacher) if reverse else (log_p_teacher, log_p_student)
    per_position = kl_rows(first, log_mixture(first, second, skew))
    return reduce_positions(per_position, student_logits, mask, labels, ignore_index, temperature, scale_by_t2, num_kept)


def tvd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = False,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Total variation distance ``½ Σ_c |p_t − p_s|`` (in [0, 1]), bounded and symmetric (Wen et al. 2023)."""
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    per_position = 0.5 * (log_p_teacher.exp() - log_p_student.exp()).abs().sum(-1)
    return reduce_positions(per_position, student_logits, mask, labels, ignore_index, temperature, scale_by_t2, num_kept)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    *,
    labels: Tensor,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    mask: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``tckd_weight·TCKD + nckd_weight·NCKD`` (the paper's alpha, beta).

    With ``g`` the label's class, TCKD is the KL between the binary distributions
    ``[p_g, 1 − p_g]`` of teacher and student; NCKD the KL between their distributions over
    the other ``C − 1`` classes, renormalised (``softmax`` of the logits without class ``g``).
    Both at temperature ``T``, times ``T²`` by default, as in the reference code. The linear
    warm-up of the paper is a schedule on the term's weight (``distill/loss=dkd`` sets it).

    Args:
        labels: ``(N,)`` / ``(N, L)`` class indices; required. Unlabelled positions (a negative label, e.g.
            ``-100`` in a transfer set) do not count: DKD is defined around the label's class.
        tckd_weight, nckd_weight: the paper's alpha and beta, weights of TCKD and NCKD (1 and 8 in
            its CIFAR setting); named apart from ``distill.alpha``, the CE/objective mix.
    """
    log_p_student, log_p_teacher = tempered_log_probs(student_logits, teacher_logits, temperature, standardize)
    if labels is None or labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"dkd_loss needs labels of shape {tuple(student_logits.shape[:-1])} (one class per position).")
    num_classes = student_logits.shape[-1]
    keep = positions_to_keep(student_logits, mask, labels, ignore_index)
    labelled = labels >= 0  # an unlabelled position (-100) has no target class to decouple around: it does not count
    keep = labelled if keep is None else keep & labelled
    target = torch.where(keep, labels, torch.zeros_like(labels))  # rows that do not count: any valid class
    target = target.long()[..., None]

    def binary(log_p: Tensor) -> Tensor:  # log [p_g, 1 − p_g], the second as a log-sum-exp over the other classes
        log_target = log_p.gather(-1, target)
        log_rest = log_p.scatter(-1, target, -math.inf).logsumexp(-1, keepdim=True)
        return torch.cat([log_target, log_rest], dim=-1)

    classes = torch.arange(num_classes - 1, device=target.device)
    others = classes + (classes >= target).long()  # the C − 1 classes other than the target, per position

    def non_target(log_p: Tensor) -> Tensor:  # log softmax over the other classes (renormalised)
        return F.log_softmax(log_p.gather(-1, others), dim=-1)

    tckd = kl_rows(binary(log_p_teacher), binary(log_p_student))
    nckd = kl_rows(non_target(log_p_teacher), non_target(log_p_student))
    return reduce_positions(tckd_weight * tckd + nckd_weight * nckd, student_logits, keep, None, None, temperature, scale_by_t2,
                            num_kept)


class KDLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`kd_loss` with a fixed temperature."""

    def __init__(self, temperature: float = 4.0, scale_by_t2: bool = True) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = temperature
        self.scale_by_t2 = scale_by_t2

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
        return kd_loss(
            student_logits, teacher_logits, self.temperature, scale_by_t2=self.scale_by_t2, **kwargs
        )


def unwrap(objective):
    """The function behind ``functools.partial`` layers (what Hydra's ``_partial_: true`` makes)."""
    while isinstance(objective, functools.partial):
        objective = objective.func
    return objective


def objective_name(objective) -> str:
    """The name a loss term is logged under: ``kd_loss`` -> ``kd``, ``MyLoss`` -> ``MyLoss``."""
    objective = unwrap(objective)
    name = getattr(objective, "__name__", None) or type(objective).__name__
    return name.removesuffix("_loss") if name.endswith("_loss") else name
