"""The loss mix: named loss terms, their weights and their schedules, validated once.

    loss = w_ce·CE + w_obj·objective(student, teacher; T) + Σ w_i·extra_i + Σ w_j·feature_j

Each term is logged as ``train/<name>``: ``ce``, the objective under its own name (``kd``,
``reverse_kl``, ``jsd``, ``skew_kl``, ``tvd``, ``dkd``, or your function's), each extra term and feature
term under its key. The library's objectives are divergences per position; the mix reduces them
over the positions that count (:meth:`LossMix.evaluate`, :mod:`kd_lightning.loss.reduction`). A term's
weight comes from exactly one place:

1. ``schedules[name]`` (a :class:`~kd_lightning.loss.schedules.Schedule`, updated every step), else
2. ``weights[name]``, else
3. its default: ``ce`` takes ``1 − alpha``, the objective ``alpha``, an extra or feature term
   its own ``weight``.

Setting one weight in two of these places, a weight or schedule for a term that does not
exist, or an ``alpha`` that no term takes its weight from is refused when the mix is built.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.errors import KDError
from kd_lightning.loss.features import FeatureDistiller, FeatureTerm
from kd_lightning.loss.objectives import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    Objective,
    check_objective_settings,
    check_temperature,
    kd_loss,
    objective_name,
)
from kd_lightning.loss.schedules import Schedule, build_schedules

ObjectiveFn = Callable[..., Tensor]  # (student_logits, teacher_logits, *, temperature, labels) -> scalar
SCHEDULABLE_SETTINGS = ("temperature", "alpha")


class Terms(dict):
    """Named, weighted loss terms of one step; :attr:`total` is the loss.

    Evaluated whole, the loss is the sum of the terms. Evaluated block by block (:mod:`kd_lightning.loss.chunked`), the
    terms are the detached values for the log and :attr:`total` the one value that carries the gradient."""

    def __init__(self, terms: Mapping[str, Tensor], total: Tensor | None = None) -> None:
        super().__init__(terms)
        self.total = total if total is not None else torch.stack(list(terms.values())).sum()


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise KDError(
            f"distill.alpha must be in [0, 1], got {alpha}: loss = (1 - alpha) * CE + alpha * KD, "
            "so alpha=0 is plain training and alpha=1 pure distillation; set e.g. distill.alpha=0.9."
        )


class LossMix(nn.Module):
    """Named, weighted loss terms; an ``nn.Module`` because feature terms own trainable adapters.

    Args:
        objective: the logit objective ``f(student_logits, teacher_logits, temperature=T, labels=y)``;
            default :func:`~kd_lightning.loss.objectives.kd_loss`. Its term is named after it (``kd_loss`` -> ``kd``).
        temperature: ``T > 0`` passed to every logit objective.
        alpha: the CE/objective mix, ``ce`` weighted ``1 − alpha`` and the objective ``alpha``;
            ``None`` when both take their weights from ``weights`` or ``schedules``.
        extra_terms: more logit objectives, ``{name: {"objective": f, "weight": w}}``.
        features: feature terms (:class:`~kd_lightning.loss.features.FeatureTerm` or dicts such as
            ``{"student": "layer3", "teacher": "layer3", "loss": "fitnet", "weight": 100}``).
        weights: ``{term name: weight}`` replacing a term's default weight.
        schedules: ``{"temperature" | "alpha" | <term name>: Schedule or dict}``.
    """

    def __init__(
        self,
        objective: ObjectiveFn | None = None,
        temperature: float = 4.0,
        alpha: float | None = 0.9,
        extra_terms: Mapping[str, Mapping[str, Any]] | None = None,
        features: list[FeatureTerm | Mapping[str, Any]] | None = None,
        weights: Mapping[str, float] | None = None,
        schedules: Mapping[str, Schedule | Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if alpha is not None:
            _check_alpha(alpha)
        self.objective = objective if objective is not None else kd_loss
        self.objective_name = objective_name(self.objective)
        self.temperature = float(temperature)
        self.alpha = None if alpha is None else float(alpha)
        self.extra_terms: dict[str, ObjectiveFn] = {}
        self.defaults: dict[str, float | None] = {"ce": None, self.objective_name: None}  # None: from alpha
        feature_terms = FeatureDistiller(features).terms if features else []
        names = ["ce", self.objective_name, *(extra_terms or {}), *(t.name for t in feature_terms)]
        if len(set(names)) != len(names):
            raise KDError(f"two loss terms share a name ({names}); rename the extra or feature term.")
        for name, spec in (extra_terms or {}).items():
            if "objective" not in spec:
                raise KDError(
                    f"distill.extra_terms.{name} needs an objective: {{objective: {{_target_: ..., _partial_: true}}, weight: w}}."
                )
            self.extra_terms[name] = spec["objective"]
            self.defaults[name] = float(spec.get("weight", 1.0))
        self.features = (
            FeatureDistiller(feature_terms) if features else None
        )  # a submodule: adapters train and checkpoint
        for term in feature_terms:
            self.defaults[term.name] = float(term.weight)
        self.weights = {name: float(w) for name, w in (weights or {}).items()}
        self.schedules = build_schedules(schedules)
        self._check_names_and_sources(extra_terms or {})
        for name, weight in [*self.weights.items(), *((n, w) for n, w in self.defaults.items() if w is not None)]:
            if not (math.isfinite(weight) and weight >= 0):
                raise KDError(f"the weight of loss term {name!r} must be a finite number >= 0, got {weight}.")
        check_objective_settings("distill.loss", self.objective)
        for name, objective in self.extra_terms.items():
            check_objective_settings(f"distill.extra_terms.{name}.objective", objective)
        self.scheduled: dict[str, float] = {}
        # the library's objectives, as divergences per position reduced here (your own functions: called as they are)
        self.built_in = {
            name: Objective.of(f) for name, f in ((self.objective_name, self.objective), *self.extra_terms.items())
        }

    @classmethod
    def task_only(cls) -> LossMix:
        """CE alone, weight 1: the teacher stage and the student trained without KD."""
        return cls(alpha=0.0)

    # -- validation: once, here ----------------------------------------------------------------

    def _check_names_and_sources(self, extra_terms: Mapping[str, Mapping[str, Any]]) -> None:
        names = self.term_names
        unknown = self.weights.keys() - set(names)
        if unknown:
            raise KDError(f"distill.weights has {sorted(unknown)}, which is not a loss term; the terms are {names}.")
        unknown = self.schedules.keys() - {*SCHEDULABLE_SETTINGS, *names}
        if unknown:
            raise KDError(
                f"distill.schedules has {sorted(unknown)}, which is not a schedulable quantity; use "
                f"temperature, alpha or a loss term's name: {names}."
            )
        twice = sorted(self.weights.keys() & self.schedules.keys())
        twice += sorted(name for name in self.weights.keys() & extra_terms.keys() if "weight" in extra_terms[name])
        if twice:
            raise KDError(
                f"the weight of {twice} is set twice (distill.weights and distill.schedules or the term's own weight); "
                "set each weight in one place."
            )
        for name, schedule in self.schedules.items():
            low, high = schedule.extremes()
            if name == "temperature" and not MIN_TEMPERATURE <= low <= high <= MAX_TEMPERATURE:
                raise KDError(
                    f"distill.schedules.temperature spans [{low}, {high}]; the temperature must stay between "
                    f"{MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}."
                )
            if name == "alpha" and not (0 <= low and high <= 1):
                raise KDError(f"distill.schedules.alpha spans [{low}, {high}]; alpha must stay in [0, 1].")
            if name not in SCHEDULABLE_SETTINGS and not (low >= 0 and math.isfinite(high)):
                raise KDError(
                    f"distill.schedules.{name} spans [{low}, {high}]; a loss term's weight must stay a finite number >= 0."
                )
        takes_alpha = self.terms_taking_alpha
        if self.alpha is None and takes_alpha:
            raise KDError(
                f"distill.alpha is null but {takes_alpha} take their weight from it; set distill.alpha, or "
                f"give {takes_alpha} weights in distill.weights."
            )
        if not takes_alpha and (self.alpha is not None or "alpha" in self.schedules):
            raise KDError(
                f"distill.alpha has no effect here: ce and {self.objective_name} take their weights from "
                "distill.weights / distill.schedules; set distill.alpha=null (or drop those weights)."
            )

    @property
    def term_names(self) -> list[str]:
        return list(self.defaults)

    @property
    def terms_taking_alpha(self) -> list[str]:
        return [name for name in ("ce", self.objective_name) if name not in self.weights and name not in self.schedules]

    # -- weights -------------------------------------------------------------------------------

    def weight(self, name: str) -> float:
        """The weight of term ``name`` this step."""
        if name in self.scheduled:
            return self.scheduled[name]
        if name in self.weights:
            return self.weights[name]
        default = self.defaults[name]
        if default is not None:
            return default
        return 1 - self.alpha if name == "ce" else self.alpha

    def is_active(self, name: str) -> bool:
        """Whether the term can be non-zero at some step (a scheduled weight always counts)."""
        return name in self.schedules or self.weight(name) != 0

    @property
    def uses_teacher(self) -> bool:
        """Whether training needs the teacher at all: some term other than ``ce`` can be non-zero."""
        return any(self.is_active(name) for name in self.term_names if name != "ce")

    def advance(self, epoch: int, step: int) -> dict[str, float]:
        """Move the schedules to ``(epoch, step)``; return the scheduled values (python floats, for logging)."""
        if self.schedules:
            self.scheduled = {name: s.value(epoch, step) for name, s in self.schedules.items()}
            self.temperature = self.scheduled.get("temperature", self.temperature)
            self.alpha = self.scheduled.get("alpha", self.alpha)
        return self.scheduled

    def scheduled_values(self) -> dict[str, float]:
        """This step's scheduled values by their logged names: ``temperature``, ``alpha``, ``weight/<term>``."""
        return {
            name if name in SCHEDULABLE_SETTINGS else f"weight/{name}": value for name, value in self.scheduled.items()
        }

    # -- the terms -----------------------------------------------------------------------------

    def evaluate(self, name: str, student_logits: Tensor, teacher_logits: Tensor, batch: Batch) -> Tensor:
        """Logit term ``name`` (the objective or an extra term), unweighted, at this step's temperature: the library's
        objectives as a divergence per position reduced over the kept positions (:mod:`kd_lightning.loss.reduction`); your
        own called with ``temperature``, ``labels`` and, for tokens, ``mask`` (the kept tokens)."""
        keep, labels = batch.get("kept"), batch.get("labels")
        built_in = self.built_in[name]
        if built_in is not None:
            return built_in(student_logits, teacher_logits, self.temperature, keep=keep, labels=labels)
        objective = self.objective if name == self.objective_name else self.extra_terms[name]
        mask = {} if keep is None else {"mask": keep}
        return objective(student_logits, teacher_logits, temperature=self.temperature, labels=labels, **mask)

    def extra_losses(self, student_logits: Tensor, teacher_logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The extra logit terms, unweighted."""
        return {name: self.evaluate(name, student_logits, teacher_logits, batch) for name in self.extra_terms}

    @contextlib.contextmanager
    def capturing_features(self) -> Iterator[None]:
        """Within the block, the feature terms' hooks keep the activations of the forward passes."""
        if self.features is None:
            yield
            return
        self.features.capturing = True
        try:
            yield
        finally:
            self.features.capturing = False

    def feature_losses(self) -> dict[str, Tensor]:
        """The feature terms, unweighted, from the activations captured in this step (then cleared)."""
        if self.features is None:
            return {}
        losses = self.features.losses_from_captured()
        self.features.clear()
        return losses

    def weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: weight · loss}`` with this step's weights."""
        return {name: self.weight(name) * loss for name, loss in losses.items()}

    def extra_repr(self) -> str:
        if not self.uses_teacher:  # the teacher stage and the student alone: T and zero weights say nothing
            return f"ce={round(self.weight('ce'), 6)}, no teacher term"
        weights = ", ".join(
            f"{n}={'scheduled' if n in self.schedules else round(self.weight(n), 6)}" for n in self.term_names
        )
        return f"T={self.temperature}, {weights}"
