"""``train(cfg)``: the teacher, the student distilled from it, the same student alone, a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kd_lightning.config import build, check_known_keys
from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write_text
from kd_lightning.loss_mix import LossMix
from kd_lightning.plots import plot_curves
from kd_lightning.speed import SpeedSettings
from kd_lightning.stages import build_loss_mix, check_chunked, check_trainer_settings, is_global_zero, run_stage
from kd_lightning.teacher_source import check_teacher_settings, prepare_teacher

RESULTS_FILE = "metrics.json"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe described by ``cfg``; return (and write) the metrics summary.

    1. the teacher: loaded, trained once and cached, or recorded (:mod:`kd_lightning.teacher_source`);
    2. the student distilled from it, tested;
    3. with ``baseline=true``, the same student trained alone (same seed, init and schedule), tested;
    4. ``metrics.json`` (and ``curves.png``) in ``paths.output_dir``; ``results["objective"]``, the
       distilled student's validation accuracy (token accuracy for text), is what ``python -m kd_lightning``
       hands a sweeper. For text, ``results["ppl_ratio"]`` is the distilled student's test perplexity
       over the student alone's.
    """
    output_dir = Path(cfg.paths.output_dir)
    # every setting is checked before anything is built or trained
    check_known_keys(cfg)
    check_run_settings(cfg, output_dir)
    check_trainer_settings(cfg)
    SpeedSettings.from_config(cfg.get("speed"))
    loss_mix = build_loss_mix(cfg)
    check_teacher_settings(cfg)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    check_chunked(cfg, getattr(datamodule, "task", "classification"), loss_mix)
    teacher = prepare_teacher(cfg, datamodule)

    results: dict[str, Any] = {"distilled": run_stage(cfg, "distilled", cfg.student.model, teacher, loss_mix, datamodule)[0]}
    results["teacher"] = {f"test/{k}": results["distilled"][f"test/teacher_{k}"] for k in ("acc", "ece", "ppl")
                          if f"test/teacher_{k}" in results["distilled"]}
    if cfg.get("baseline", False):
        # CE alone: the teacher never runs in training, it is only scored against for the fidelity metrics
        results["baseline"] = run_stage(cfg, "baseline", cfg.student.model, teacher, LossMix.task_only(), datamodule)[0]
        results["gain"] = results["distilled"]["test/acc"] - results["baseline"]["test/acc"]
        if "test/ppl" in results["distilled"]:  # language models: the distilled student's perplexity relative to alone's
            results["ppl_ratio"] = results["distilled"]["test/ppl"] / results["baseline"]["test/ppl"]
    results["objective"] = results["distilled"].get("val/acc")  # what a sweeper maximises: never the test split
    results["output_dir"] = str(output_dir.resolve())

    if is_global_zero():  # under DDP every rank runs train(); one writes
        atomic_write_text(output_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        plot_curves(output_dir, teacher_acc=results["distilled"].get("val/teacher_acc"))
    return results


def check_run_settings(cfg: DictConfig, output_dir: Path) -> None:
    """An integer seed; ``ckpt_path`` null or ``last``; the run directory holds no results unless ``overwrite``."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise KDError(f"seed must be an integer, got {cfg.seed!r}; set e.g. seed=0.")
    if cfg.get("ckpt_path") not in (None, "last"):
        raise KDError(f"ckpt_path must be null or 'last', got {cfg.ckpt_path!r}: 'last' resumes every stage of the "
                      "run in hydra.run.dir from <stage>/checkpoints/last.ckpt.")
    if (output_dir / RESULTS_FILE).exists() and not cfg.get("overwrite", False):
        raise KDError(f"{output_dir} already holds the results of a run ({RESULTS_FILE}). Choose another "
                      "directory (hydra.run.dir=...) or pass overwrite=true to replace them.")
