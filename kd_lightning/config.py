"""Typed schemas for config groups, registered with Hydra's ConfigStore.

A group's YAML names its schema first in its defaults list; Hydra then rejects a wrong
type or an unknown key at composition time, before anything is built (ranges are checked
by :func:`kd_lightning.module.check_temperature_and_alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore


@dataclass
class DistillSchema:
    """``distill/``: ``loss = (1 − alpha)·CE + alpha·objective(T)`` + extra and feature terms."""

    temperature: float = 4.0
    alpha: float = 0.9
    loss: Any = None  # the logit objective (distill/loss group): a _target_ with _partial_: true
    extra_terms: Dict[str, Any] = field(default_factory=dict)
    features: List[Any] = field(default_factory=list)
    weights: Dict[str, float] = field(default_factory=dict)
    schedules: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    ConfigStore.instance().store(group="distill", name="schema", node=DistillSchema)
