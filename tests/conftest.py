"""Shared fixtures: compose configs with Hydra's compose API, on CPU, writing into tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from kd_lightning.run.cli import config_dir
from kd_lightning.run.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own teacher cache, so no test sees another's trained teacher."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("trainer.max_epochs=1", ...)`` -> a composed config writing into ``tmp_path/run``."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(
                "train",
                overrides=[f"paths.output_dir={output_dir or tmp_path / 'run'}", *QUIET, *overrides],
            )

    yield make
    GlobalHydra.instance().clear()


def settings_of(cfg: DictConfig) -> Settings:
    """The typed settings of a composed config, also of a run that has finished (its results are no refusal here)."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, "overwrite", True)
    return Settings.from_config(cfg)
