"""Typed schemas for config groups, registered with Hydra's ConfigStore.

A group's YAML names its schema first in its defaults list; Hydra then rejects a wrong
type or an unknown key at composition time, before anything is built (ranges are checked
by :func:`kd_lightning.module.check_temperature_and_alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class DistillSchema:
    """``distill/``: ``loss = (1 − alpha)·CE + alpha·T²·KL``."""

    temperature: float = 4.0
    alpha: float = 0.9


def register_configs() -> None:
    ConfigStore.instance().store(group="distill", name="schema", node=DistillSchema)
