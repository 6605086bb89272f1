"""``train(cfg)``: the teacher, the student distilled from it, the same student alone, a summary."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from kd_lightning.files import atomic_write_text
from kd_lightning.loss.mix import LossMix
from kd_lightning.run import run_dir
from kd_lightning.run.plots import plot_curves
from kd_lightning.run.preflight import check_models
from kd_lightning.run.run_dir import RESULTS_FILE, TOKENIZER_DIR, is_global_zero
from kd_lightning.run.settings import Settings
from kd_lightning.run.stages import run_stage
from kd_lightning.run.teachers import prepare_teacher
from kd_lightning.sequences import Sequences

__all__ = ["RESULTS_FILE", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the recipe described by ``cfg``; return (and write) the metrics summary.

    0. the settings, parsed once and checked before anything is built or trained (:mod:`kd_lightning.run.settings`),
       and only then the run directory written to (:func:`kd_lightning.run.run_dir.start`);
    1. the teacher: loaded, trained once and cached, or recorded (:mod:`kd_lightning.run.teachers`);
    2. the student distilled from it, tested (and again in each stage of ``distill.on_policy_stages``);
    3. with ``baseline=true``, the same student trained alone (same seed, init and schedule), tested;
    4. ``metrics.json`` (and ``curves.png``) in ``paths.output_dir``. ``results["distilled_val_acc"]``, the
       distilled student's validation accuracy (token accuracy for text), is what ``python -m kd_lightning`` hands
       a sweeper. For text, ``results["ppl_ratio"]`` is the distilled student's test perplexity over the student
       alone's.
    """
    settings = Settings.from_config(cfg)
    datamodule = settings.data()
    datamodule.setup("fit")
    check_models(settings, datamodule)
    with run_dir.start(cfg, settings.run.output_dir, resume=settings.run.resume, overwrite=settings.run.overwrite):
        return distil(settings, datamodule)


def distil(settings: Settings, datamodule: Any) -> dict[str, Any]:
    """Steps 1-4 of :func:`train`, in a run directory that was accepted."""
    if is_global_zero() and hasattr(
        datamodule, "save_tokenizer"
    ):  # text: what export --format hf writes beside the model
        datamodule.save_tokenizer(settings.run.output_dir / TOKENIZER_DIR)
    teacher = prepare_teacher(settings, datamodule)

    distilled, _ = run_stage(
        settings,
        "distilled",
        settings.student,
        teacher,
        settings.loss_mix,
        datamodule,
        sequences=Sequences.of(settings.on_policy, datamodule),
    )
    results: dict[str, Any] = {"distilled": distilled}
    for stage, on_policy in settings.on_policy_stages.items():  # the same student, its completions from elsewhere
        results[stage], _ = run_stage(
            settings,
            stage,
            settings.student,
            teacher,
            settings.loss_mix,
            datamodule,
            sequences=Sequences.of(on_policy, datamodule),
        )
    if settings.on_policy_stages:
        results["on_policy_stages"] = list(settings.on_policy_stages)
    results["teacher"] = {
        f"test/{k.removeprefix('test/teacher_')}": v for k, v in distilled.items() if k.startswith("test/teacher_")
    }
    if settings.run.baseline:
        # CE alone: the teacher never runs in training, it is only scored against for the fidelity metrics
        baseline, _ = run_stage(settings, "baseline", settings.student, teacher, LossMix.task_only(), datamodule)
        results["baseline"] = baseline
        results["gain"] = distilled["test/acc"] - baseline["test/acc"]
        if "test/ppl" in distilled:  # language models: the distilled student's perplexity relative to alone's
            results["ppl_ratio"] = distilled["test/ppl"] / baseline["test/ppl"]
    results["distilled_val_acc"] = distilled.get("val/acc")  # what a sweeper maximises: never the test split
    results["output_dir"] = str(settings.run.output_dir.resolve())

    if is_global_zero():  # under DDP every rank runs train(); one writes
        atomic_write_text(settings.run.output_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        plot_curves(settings.run.output_dir, teacher_acc=distilled.get("val/teacher_acc"))
    return results
