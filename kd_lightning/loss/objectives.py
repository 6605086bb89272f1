"""Distillation objectives: a divergence per position, reduced once.

Each divergence (:func:`forward_kl`, :func:`reverse_kl`, :func:`jsd`, :func:`skew_kl`,
:func:`tvd`, :func:`dkd`, :func:`sampled_kl`) is a pure function of the two models' logits divided by the
temperature, ``(..., C) -> (...)``: one value per row (a sample) or per token position. What
happens around it is done in one place, :class:`Objective`: both logits in at least float32
(float64 stays float64) whatever the autocast dtype, optionally z-scored (``standardize``) and
divided by ``T``; then the values of the positions that count are summed and divided by their
count (:func:`kd_lightning.loss.reduction.reduce`), times ``T²`` when asked. Every KL, plain or against
a mixture (JSD, skew KL), is one function, :func:`mixture_kl`, which works from differences of logits:
finite for confident models at any logit scale, and as accurate as float32 allows for close ones.

The public functions (:func:`kd_loss`, :func:`reverse_kl_loss`, :func:`jsd_loss`,
:func:`skew_kl_loss`, :func:`tvd_loss`, :func:`dkd_loss`, :func:`sampled_kl_loss`) take raw logits, ``(N, C)`` for
classification or ``(N, L, C)`` for sequences, and return that scalar. Their shared keywords:

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
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.data.batch import kept_labels
from kd_lightning.errors import KDError, is_number
from kd_lightning.loss.reduction import both, reduce

__all__ = [
    "kd_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "skew_kl_loss",
    "tvd_loss",
    "dkd_loss",
    "sampled_kl_loss",
    "standardize_logits",
    "kept_positions_of",
    "check_temperature",
    "mixture_kl",
    "Objective",
]

# Beyond these the T²-scaled divergence is numerically meaningless: at large T the float32
# rounding of KL (about 1e-7 of log C) times T² swamps the term (≈ Var(s − t)/2), at T = 100
# already about 1%; at small T the T² factor (1e-4 at T = 0.01) makes it vanish.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def check_temperature(temperature: float) -> None:
    """Raise :class:`~kd_lightning.KDError` (a ``ValueError``) unless ``0.01 <= temperature <= 100``."""
    if not is_number(temperature) or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise KDError(
            f"distill.temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}, got {temperature} "
            "(beyond them the T²-scaled term is rounding noise or vanishes). The usual values are 1-8 "
            "(4 in the CIFAR recipe); set e.g. distill.temperature=4."
        )


def kept_positions_of(
    logits: Tensor, mask: Tensor | None = None, labels: Tensor | None = None, ignore_index: int | None = None
) -> Tensor | None:
    """Boolean mask of the positions that count, shape ``logits.shape[:-1]``, or ``None`` for all.

    ``mask`` is True where a position is kept; ``labels == ignore_index`` drops a position.
    """
    keep = None if mask is None else mask.to(torch.bool)
    if ignore_index is not None:
        if labels is None:
            raise ValueError("ignore_index needs labels: pass labels=... of shape logits.shape[:-1].")
        keep = both(keep, labels != ignore_index)
    if keep is not None and keep.shape != logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(keep.shape)} does not match the logits' positions "
            f"{tuple(logits.shape[:-1])}; it must have one entry per row of logits."
        )
    return keep


def _at_least_float32(x: Tensor) -> Tensor:
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


# -- divergences per position, from tempered logits (..., C) -> (...) --------------------------------


def _log_ratio(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, r, correction)`` for ``(..., C)`` logits: ``p = softmax(first)``, the log-ratio ``r = log(q/p)`` per class
    from differences of max-shifted logits, and the row's correction ``log Σ p·e^r`` (0 in exact arithmetic, no
    gradient): ``r − correction`` is the log-ratio as exact as float32 allows (:func:`mixture_kl`)."""
    first, second = first - first.amax(-1, keepdim=True).detach(), second - second.amax(-1, keepdim=True).detach()
    exp_first, exp_second = first.exp(), second.exp()
    sum_first, sum_second = exp_first.sum(-1, keepdim=True), exp_second.sum(-1, keepdim=True)
    p = exp_first / sum_first
    ratio = (second - first) - (sum_second.log() - sum_first.log())
    with torch.no_grad():  # Σ (q − p), each class where it does not cancel; q alone where p = 0
        q_minus_p = torch.where(ratio <= 1, p * ratio.expm1(), exp_second / sum_second - p)
        correction = q_minus_p.sum(-1, keepdim=True).clamp_min(-0.5).log1p()
    return p, ratio, correction


def mixture_kl(first: Tensor, second: Tensor, weight: float = 0.0) -> Tensor:
    """``KL(p ‖ weight·p + (1 − weight)·q)`` per row of ``(..., C)`` logits, ``p = softmax(first)``,
    ``q = softmax(second)``; ``weight = 0`` is plain ``KL(p ‖ q)``.

    Each class's ``log(p / M) = −log1p((1 − weight)·expm1(r))`` comes from the log-ratio ``r = log(q/p)``, formed
    from differences of logits, ``(second − first) − (lse(second) − lse(first))``, each row shifted by its maximum
    first: nothing is exponentiated before it is subtracted, so confident models (probabilities that underflow, gaps
    of hundreds of nats) give finite values and gradients. The row's constant ``lse(second) − lse(first)`` is then
    corrected so that ``r`` gives ``q`` a total of exactly 1 against this ``p`` (the correction, ``log Σ p·e^r``,
    summed as ``p·expm1(r)`` where that does not cancel): its float32 rounding (~1e-7 times ``log C``) would
    otherwise bias every class of the row, as large as 1e-5 of the divergence of close models at a high
    temperature. The correction is 0 in exact arithmetic, so it carries no gradient. A class with ``p = 0`` (a
    ``-inf`` logit) contributes exactly 0; ``q = 0`` where ``p > 0`` makes plain KL truly infinite and the mixture
    ``log(1/weight)`` for that class. Never below 0 (rounding).
    """
    p, ratio, correction = _log_ratio(first, second)
    ratio = torch.where(p > 0, ratio, 0.0)
    if weight == 0:
        return (correction.squeeze(-1) - (p * ratio).sum(-1)).clamp_min(0)
    # beyond r = 80 expm1 would overflow; there p < e^-80 and the clamp changes nothing float32 can hold
    log_p_over_m = -torch.log1p((1 - weight) * torch.expm1((ratio - correction).clamp(max=80)))
    return (p * log_p_over_m).sum(-1).clamp_min(0)


def forward_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(p_t ‖ p_s)`` per position: Hinton KD."""
    return mixture_kl(teacher, student)


def reverse_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """``KL(p_s ‖ p_t)`` per position: mode-seeking (MiniLLM)."""
    return mixture_kl(student, teacher)


JSD_WEIGHTS = ("gkd", "continuous")


def jsd(student: Tensor, teacher: Tensor, beta: float = 0.5, weights: str = "gkd") -> Tensor:
    """The generalised JSD per position, ``M = beta·p_t + (1−beta)·p_s``: ``beta·KL(p_t ‖ M) + (1−beta)·KL(p_s ‖ M)``
    (``weights="gkd"``: GKD's, TRL's and Liger-Kernel's; ``beta=0`` is forward KL and ``beta=1`` reverse KL, as TRL
    takes them), or ``(1−beta)·KL(p_t ‖ M) + beta·KL(p_s ‖ M)`` (``"continuous"``: from forward KL at 0 to reverse KL
    at 1 without a jump; kd_lightning's before 0.5)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}: 0 is forward KL, 1 reverse KL, 0.5 symmetric JSD.")
    if weights not in JSD_WEIGHTS:
        raise ValueError(f"weights must be gkd (GKD's and TRL's) or continuous, got {weights!r}.")
    if beta in (0, 1):
        return mixture_kl(teacher, student) if beta == 0 else mixture_kl(student, teacher)
    teacher_weight = beta if weights == "gkd" else 1 - beta
    return teacher_weight * mixture_kl(teacher, student, beta) + (1 - teacher_weight) * mixture_kl(
        student, teacher, 1 - beta
    )


def skew_kl(student: Tensor, teacher: Tensor, skew: float = 0.1, reverse: bool = False) -> Tensor:
    """``KL(p_t ‖ skew·p_t + (1−skew)·p_s)`` (reverse: the roles swapped) per position."""
    if not 0 <= skew < 1:
        raise ValueError(
            f"skew must be in [0, 1), got {skew}: 0 is plain KL, the DistiLLM default 0.1 (at 1 the loss is always 0)."
        )
    return mixture_kl(student, teacher, skew) if reverse else mixture_kl(teacher, student, skew)


def tvd(student: Tensor, teacher: Tensor) -> Tensor:
    """``½ Σ_c |p_t − p_s|`` per position."""
    return 0.5 * (teacher.softmax(-1) - student.softmax(-1)).abs().sum(-1)


def dkd(
    student: Tensor,
    teacher: Tensor,
    *,
    labels: Tensor | None = None,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
) -> Tensor:
    """``tckd_weight·TCKD + nckd_weight·NCKD`` per position, decoupled around each position's label."""
    if labels is None or labels.shape != student.shape[:-1]:
        raise ValueError(f"dkd_loss needs labels of shape {tuple(student.shape[:-1])} (one class per position).")
    for key, weight in (("tckd_weight", tckd_weight), ("nckd_weight", nckd_weight)):
        if not (is_number(weight) and math.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"{key} must be a finite number >= 0, got {weight!r} (a negative weight drives the loss to "
                "-inf; the paper's CIFAR values are tckd_weight=1, nckd_weight=8)."
            )
    target = torch.where(kept_labels(labels), labels, torch.zeros_like(labels)).long()[
        ..., None
    ]  # uncounted: any class

    def binary(log_p: Tensor) -> Tensor:  # log [p_g, 1 − p_g], the second as a log-sum-exp over the other classes
        return torch.cat(
            [log_p.gather(-1, target), log_p.scatter(-1, target, -math.inf).logsumexp(-1, keepdim=True)], -1
        )

    classes = torch.arange(student.shape[-1] - 1, device=target.device)
    others = classes + (classes >= target).long()  # the C − 1 classes other than the target, per position

    def non_target(log_p: Tensor) -> Tensor:  # log softmax over the other classes (renormalised)
        return F.log_softmax(log_p.gather(-1, others), dim=-1)

    log_p_student, log_p_teacher = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    tckd = mixture_kl(binary(log_p_teacher), binary(log_p_student))
    nckd = mixture_kl(non_target(log_p_teacher), non_target(log_p_student))
    return tckd_weight * tckd + nckd_weight * nckd


def sampled_kl(student: Tensor, teacher: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """The sampled-token estimate of ``KL(p_s ‖ p_t)`` per position, ``y`` the token there (``labels``) drawn from
    ``p_s``: its value is ``k = log p_s(y) − log p_t(y)`` (an unbiased estimate of the KL), its gradient
    ``k · ∇ log p_s(y)`` (the score-function estimate, whose mean over ``y ~ p_s`` is ``∇ KL(p_s ‖ p_t)``: the
    per-token reverse KL used as a reward, with ``−k`` the advantage)."""
    if labels is None or labels.shape != student.shape[:-1]:
        raise ValueError(
            f"sampled_kl_loss needs labels of shape {tuple(student.shape[:-1])}: the tokens the student drew."
        )
    token = torch.where(kept_labels(labels), labels, torch.zeros_like(labels)).long()[..., None]  # uncounted: any
    with torch.no_grad():  # log p_s(y) − log p_t(y) from the corrected log-ratio: no cancellation of two log-softmaxes
        _, ratio, correction = _log_ratio(student, teacher)
        estimate = (correction - ratio).gather(-1, token).squeeze(-1)
    log_p_student = F.log_softmax(student, -1).gather(-1, token).squeeze(-1)
    return estimate + estimate * (log_p_student - log_p_student.detach())


@functools.lru_cache(maxsize=None)
def _takes_labels(divergence: Callable[..., Tensor]) -> bool:
    """Whether ``divergence`` takes ``labels`` (read once per divergence, not in every step)."""
    return "labels" in inspect.signature(divergence).parameters


# -- an objective: a divergence with its settings, evaluated and reduced in one place ---------------


@dataclass(frozen=True)
class Objective:
    """A divergence of this module with its settings bound, and how it is reduced.

    Args:
        divergence: one of the per-position divergences above.
        settings: its own settings (``beta``, ``skew``, ``tckd_weight``, ...).
        scale_by_t2: multiply the reduced value by ``T²``.
        standardize: z-score both logits before the temperature.
        temperature: a temperature bound to the objective (``None``: the caller's).
    """

    divergence: Callable[..., Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    scale_by_t2: bool = False
    standardize: bool = False
    temperature: float | None = None

    @property
    def by_label(self) -> bool:
        """Whether the divergence is defined around each position's label (DKD): unlabelled positions then do not count."""
        return _takes_labels(self.divergence)

    @classmethod
    def of(cls, objective: Callable[..., Tensor]) -> Objective | None:
        """The :class:`Objective` behind a public function of this module, or a ``functools.partial`` of one with
        settings bound (what Hydra's ``_partial_: true`` builds); ``None`` for anything else (your own function)."""
        keywords: dict[str, Any] = {}
        while isinstance(objective, functools.partial):
            if objective.args:
                return None
            keywords = {**objective.keywords, **keywords}
            objective = objective.func
        built_in = next((built_in for function, built_in in DIVERGENCES.items() if function is objective), None)
        if built_in is None:
            return None
        unknown = keywords.keys() & {"mask", "labels", "ignore_index", "num_kept"}
        if unknown:
            raise TypeError(f"{objective.__name__} takes {sorted(unknown)} per call, not as a setting")
        reduction = {key: keywords.pop(key) for key in ("scale_by_t2", "standardize", "temperature") if key in keywords}
        _check_settings(objective.__name__, built_in.divergence, keywords)
        reduction = {"scale_by_t2": built_in.scale_by_t2, "temperature": built_in.temperature, **reduction}
        return cls(built_in.divergence, {**built_in.settings, **keywords}, **reduction)

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, labels: Tensor | None = None
    ) -> Tensor:
        """The divergence at each position ``(...)`` of ``(..., C)`` logits (the teacher's detached)."""
        shapes = f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)}"
        if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
            raise ValueError(
                f"{shapes} must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}; "
                "pass the models' logits, not class indices."
            )
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ValueError(
                f"{shapes} are for different positions (batch or sequence shapes differ); pass both models' "
                "logits of the same batch."
            )
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"{shapes} differ in classes; teacher and student must predict the same number of classes."
            )
        check_temperature(temperature)
        s, t = _at_least_float32(student_logits), _at_least_float32(teacher_logits.detach())
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        label = {"labels": labels} if self.by_label else {}
        return self.divergence(s / temperature, t / temperature, **self.settings, **label)

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        temperature: float | None = None,
        *,
        keep: Tensor | None = None,
        labels: Tensor | None = None,
        num_kept: Tensor | float | None = None,
    ) -> Tensor:
        """The scalar loss: the divergence summed over the kept positions (``keep``, and for DKD the labelled ones),
        divided by their count or ``num_kept``, times ``T²`` if :attr:`scale_by_t2`."""
        temperature = temperature if temperature is not None else self.temperature
        per_position = self.per_position(student_logits, teacher_logits, temperature, labels)
        if self.by_label:
            keep = both(keep, kept_labels(labels))
        return reduce(per_position, keep, num_kept, temperature**2 if self.scale_by_t2 else 1.0)


def _check_settings(name: str, divergence: Callable[..., Tensor], settings: dict[str, Any]) -> None:
    """A misspelt or unknown setting of objective ``name``: ``TypeError`` naming it, before anything is computed."""
    try:
        inspect.signature(divergence).bind(None, None, **settings)
    except TypeError as error:
        raise TypeError(f"{name}() {error}") from None


def _loss(
    divergence: Callable[..., Tensor],
    settings: dict[str, Any],
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int | None,
    scale_by_t2: bool,
    standardize: bool,
    num_kept: Tensor | float | None,
) -> Tensor:
    """What every public objective does: its divergence over the kept positions, through :class:`Objective`; NaN logits
    at a kept position are named (a masked position may hold anything)."""
    keep = kept_positions_of(student_logits, mask, labels, ignore_index)
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not logits.is_floating_point() or logits.shape[:-1] != student_logits.shape[:-1]:
            continue  # refused with its own message by Objective
        nan = torch.isnan(logits.sum(-1))  # one reduction: a row's sum is NaN when it holds one (or +inf and -inf)
        nan = nan if keep is None else nan & keep
        if bool(nan.any()):
            raise ValueError(
                f"{name} hold NaN (at {nan.nonzero()[0].tolist()}): the model that made them diverged or read NaN "
                "input; check it before the loss."
            )
    objective = Objective(divergence, settings, scale_by_t2=scale_by_t2, standardize=standardize)
    return objective(student_logits, teacher_logits, temperature, keep=keep, labels=labels, num_kept=num_kept)


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
    """Forward KL, Hinton KD (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over kept
    positions (``batchmean`` for ``(N, C)`` input). The keywords are those of :mod:`kd_lightning.loss.objectives`."""
    return _loss(
        forward_kl,
        {},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


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
    """Reverse KL: ``KL(softmax(s/T) ‖ softmax(t/T)) = Σ p_s (log p_s − log p_t)``, mode-seeking. Used for generative
    students (MiniLLM, Gu et al. 2024). ``T²`` scaling is off by default."""
    return _loss(
        reverse_kl,
        {},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    weights: str = "gkd",
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = False,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence between teacher and student, ``beta ∈ [0, 1]``.

    The mixture is ``M = beta·p_t + (1−beta)·p_s`` and, as in GKD (Agarwal et al. 2024), TRL and Liger-Kernel,
    ``JSD_beta = beta·KL(p_t ‖ M) + (1−beta)·KL(p_s ‖ M)``; ``beta=0`` is forward KL ``KL(p_t ‖ p_s)`` and ``beta=1``
    reverse KL ``KL(p_s ‖ p_t)`` (TRL's special cases: the formula itself tends to 0 at both ends), ``beta=0.5`` the
    symmetric JSD. A configuration copied from them trains the same objective. ``weights="continuous"`` weighs the two
    terms the other way round, ``(1−beta)·KL(p_t ‖ M) + beta·KL(p_s ‖ M)``, continuous from forward KL at 0 to reverse
    KL at 1 (kd_lightning's ``jsd`` before 0.5; the same at ``beta=0.5``). ``T²`` scaling is off by default.
    """
    return _loss(
        jsd,
        {"beta": beta, "weights": weights},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


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

    Forward (``reverse=False``): ``KL(p_t ‖ skew·p_t + (1−skew)·p_s)``; reverse: ``KL(p_s ‖ skew·p_s + (1−skew)·p_t)``.
    ``skew ∈ [0, 1)``: 0 is plain forward / reverse KL; the paper's default is 0.1. Mixing in a little of the first
    distribution bounds the log-ratio by ``−log(skew)``, so a token the student gives almost no probability cannot blow
    the loss up.
    """
    return _loss(
        skew_kl,
        {"skew": skew, "reverse": reverse},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


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
    return _loss(
        tvd,
        {},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int | None = None,
    scale_by_t2: bool = True,
    standardize: bool = False,
    num_kept: Tensor | float | None = None,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): ``tckd_weight·TCKD + nckd_weight·NCKD`` (the paper's alpha, beta).

    With ``g`` the label's class, TCKD is the KL between the binary distributions ``[p_g, 1 − p_g]`` of teacher and
    student; NCKD the KL between their distributions over the other ``C − 1`` classes, renormalised (``softmax`` of the
    logits without class ``g``). Both at temperature ``T``, times ``T²`` by default, as in the reference code. The linear
    warm-up of the paper is a schedule on the term's weight (``distill/loss=dkd`` sets it).

    Args:
        labels: ``(N,)`` / ``(N, L)`` class indices; required. Unlabelled positions (``-100``, e.g. in a transfer set)
            do not count: DKD is defined around the label's class.
        tckd_weight, nckd_weight: the paper's alpha and beta, weights of TCKD and NCKD (1 and 8 in its CIFAR setting);
            named apart from ``distill.alpha``, the CE/objective mix.
    """
    return _loss(
        dkd,
        {"tckd_weight": tckd_weight, "nckd_weight": nckd_weight},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


def sampled_kl_loss(
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
    """Reverse KL from the sampled tokens alone: at each position only ``log p_s(y)`` and ``log p_t(y)`` of the token
    ``y`` the student drew (``labels``), as Thinking Machines' on-policy distillation (the per-token reverse KL as a
    reward) and NeMo RL's and ms-swift's ``advantage = log p_t(y) − log p_s(y)``.

    The value is the mean over kept positions of ``log p_s(y) − log p_t(y)``; the gradient the mean of
    ``(log p_s(y) − log p_t(y)) · ∇ log p_s(y)``. Both are unbiased for reverse KL and its gradient only when ``y``
    is drawn from ``p_s`` itself (on-policy samples at temperature ``T``, without top-k or top-p): in expectation over
    ``y`` the gradient is that of :func:`reverse_kl_loss`, but one sample per position has variance that
    :func:`reverse_kl_loss`, which sums over the whole vocabulary, does not. Use it when the teacher's distribution
    is not available beyond the sampled token; otherwise prefer :func:`reverse_kl_loss`.

    Args:
        labels: ``(N, L)`` the tokens drawn; required. Unlabelled positions (``-100``) do not count.
    """
    return _loss(
        sampled_kl,
        {},
        student_logits,
        teacher_logits,
        temperature,
        mask,
        labels,
        ignore_index,
        scale_by_t2,
        standardize,
        num_kept,
    )


# the divergence behind each public objective, with its defaults: what a configured ``distill.loss`` evaluates
DIVERGENCES: dict[Callable[..., Tensor], Objective] = {
    kd_loss: Objective(forward_kl, scale_by_t2=True, temperature=1.0),
    reverse_kl_loss: Objective(reverse_kl, temperature=1.0),
    jsd_loss: Objective(jsd, temperature=1.0),
    skew_kl_loss: Objective(skew_kl, temperature=1.0),
    tvd_loss: Objective(tvd, temperature=1.0),
    dkd_loss: Objective(dkd, scale_by_t2=True, temperature=4.0),
    sampled_kl_loss: Objective(sampled_kl, temperature=1.0),
}


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


def check_objective_settings(where: str, objective: Callable[..., Tensor]) -> None:
    """Evaluate one of this module's objectives on a tiny batch, so its own settings (JSD's beta, a misspelt keyword)
    are refused now, not after the teacher has trained. Your own objectives are first called in the first step."""
    try:
        built_in = Objective.of(objective)
        if built_in is not None:
            logits = torch.zeros(2, 3)
            built_in(logits, logits, built_in.temperature or 1.0, labels=torch.zeros(2, dtype=torch.long))
    except (TypeError, ValueError) as error:
        raise KDError(f"{where} is set wrong: {error}") from None
