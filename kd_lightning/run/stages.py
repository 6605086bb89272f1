"""Fit and test one stage of a run (``teacher``, ``distilled``, ``baseline``) from the config.

Each stage writes its logs and ``checkpoints/last.ckpt`` under ``<output_dir>/<stage>`` and
starts from the same seed, so the distilled student and the baseline begin alike.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn

from kd_lightning.checkpoints import AtomicCheckpointIO, check_resumable, load_weights
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.files import atomic_write_text
from kd_lightning.loss.mix import LossMix
from kd_lightning.module import DistillationModule
from kd_lightning.progress import StageProgress, lightning_hushed
from kd_lightning.run.run_dir import is_global_zero
from kd_lightning.run.settings import Factory, Optimization, RunSettings, Settings
from kd_lightning.sequences import Answers, SampleScores, Sequences
from kd_lightning.sharding import full_state_dict, is_sharded
from kd_lightning.teacher import Teacher

log = logging.getLogger(__name__)

STAGE_RESULTS = "results.json"  # a stage's val/test metrics, written when it has finished


def read_stage_results(path: Path) -> dict[str, float] | None:
    """A finished stage's metrics (``results.json``); ``None`` when it has none, or one a kill left unreadable."""
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning(
            "stage results %s are unreadable (%s); the stage is resumed from its checkpoint instead", path, error
        )
        return None
    return results if isinstance(results, dict) else None


def leave_process_group() -> None:
    """After the last stage of a DDP run: the ranks wait for each other, then close the process group (a rank that
    exits with it open can abort in the destructors of its communication threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class LeaveProcessGroupAtTeardown(L.Callback):
    """Under ``ddp_spawn`` and ``ddp_fork`` each ``fit`` and ``test`` runs in processes started for it alone: they
    close the process group (:func:`leave_process_group`) before they exit, else they can abort as they exit."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            leave_process_group()


class ReseedEveryEpoch(L.Callback):
    """Seed all RNGs with ``seed + epoch`` when an epoch starts.

    Shuffling, augmentation and dropout of epoch ``e`` then depend on ``(seed, e)`` only, so a
    run resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


def make_trainer(run: RunSettings, stage: str, **overrides: Any) -> L.Trainer:
    """A Trainer from ``trainer`` writing logs and checkpoints under ``<output_dir>/<stage>``."""
    stage_dir = run.output_dir / stage
    progress = [StageProgress(stage)] if run.progress_bar else []
    callbacks = [ReseedEveryEpoch(run.seed), LeaveProcessGroupAtTeardown(), *progress] + [
        callback(dirpath=str(stage_dir / "checkpoints")) if "ModelCheckpoint" in callback.target else callback()
        for callback in run.callbacks.values()
    ]
    return run.trainer(
        default_root_dir=str(stage_dir),
        callbacks=callbacks,
        logger=make_logger(run, stage),
        plugins=[AtomicCheckpointIO()],
        **overrides,
    )


def end_logger_runs(trainer: L.Trainer) -> None:
    """Close each stage's W&B run, so the next stage starts its own instead of writing into it."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()


def make_logger(run: RunSettings, stage: str) -> Any:
    """The ``logger`` writing under ``<output_dir>/<stage>``; a ``name`` or ``group`` left null becomes the stage's name
    and the run directory's name. ``False`` without a logger."""
    if run.logger is None:
        return False
    if "WandbLogger" in run.logger.target:
        os.environ.setdefault("WANDB_SILENT", "true")  # its banners; WANDB_SILENT=false shows them
    filled = {"save_dir": str(run.output_dir / stage)}
    for key, value in (("name", stage), ("group", run.output_dir.name)):
        if key in run.logger.settings and run.logger.settings[key] is None:
            filled[key] = value
    return run.logger(**filled)


def unsharded(trained: nn.Module, model: Factory) -> nn.Module:
    """``trained`` itself, or a fresh ``model`` with its weights when it is sharded (``trainer=fsdp``): whole on every
    rank, for the trained-teacher cache and the stages after."""
    if not is_sharded(trained):
        return trained
    weights = full_state_dict(trained)  # every rank takes part in gathering them
    fresh = model()
    fresh.load_state_dict(weights)
    return fresh


def rollouts(datamodule: Any, student: nn.Module, teacher: Teacher | None) -> dict[str, float]:
    """The task's environment metrics (``datamodule.rollouts``, e.g. the slippery walk's success with slips) of the
    trained student, ``test/<name>``, and of a teacher in this process, ``test/teacher_<name>``; none for a sharded
    model or a task without an environment."""
    if not hasattr(datamodule, "rollouts") or is_sharded(student):
        return {}
    found = {f"test/{name}": value for name, value in datamodule.rollouts(student).items()}
    network = teacher.network if teacher is not None else None
    if network is not None and not is_sharded(network):
        found |= {f"test/teacher_{name}": value for name, value in datamodule.rollouts(network).items()}
    return found


def run_stage(
    settings: Settings,
    stage: str,
    model: Factory,
    teacher: Teacher | None,
    loss_mix: LossMix,
    datamodule: Any,
    optim: Optimization | None = None,
    sequences: Sequences | None = None,
    **trainer_overrides: Any,
) -> tuple[dict[str, float], nn.Module]:
    """Build ``model`` from the seed, fit it with ``loss_mix`` against ``teacher`` (on the completions of
    ``sequences``: the data set's by default), test it.

    Returns the stage's ``val/...`` and ``test/...`` metrics (also written to ``<stage>/results.json``) and the
    trained model. ``ckpt_path=last`` resumes the stage from its ``last.ckpt`` when there is one, and reads a finished
    stage (its ``results.json``) back instead of fitting it again.
    """
    run, speed = settings.run, settings.speed
    optim = optim if optim is not None else run.optim
    if isinstance(datamodule, InMemoryDataModule):
        datamodule.memory_format = speed.memory_format()
        datamodule.serve_steps = speed.generate_per_step and sequences is not None and sequences.settings.samples
    L.seed_everything(run.seed, workers=True, verbose=False)
    scores = SampleScores.of(settings.on_policy, datamodule, settings.samples) if teacher is not None else None
    module = DistillationModule(
        speed.prepare(model()),
        teacher,
        num_classes=run.num_classes,
        loss_mix=loss_mix,
        optimizer=optim.optimizer,
        scheduler=optim.scheduler,
        task=getattr(datamodule, "task", "classification"),
        chunk_rows=speed.chunk_rows,
        sequences=sequences,
        answers=Answers.of(datamodule),
        sample_scores=scores,
        shard_teacher=settings.teacher.shard,
        shard_dtype=speed.shard_dtype,
        generate_whole=speed.generate_whole,
    )
    how = []
    if module.chunk_rows:
        rows = "tokens per block from the vocabulary" if module.chunk_rows == "auto" else "tokens per block"
        how.append(f"the chunked loss ({module.chunk_rows} {rows})")
    if sequences is not None and sequences.settings.samples:
        how.append(f"completions sampled: {sequences.describe()}")
        if speed.generate_per_step:
            how.append("each optimizer step's completions in one call per model (speed.generate_per_step)")
    if speed.generate_whole:
        how.append("the student generating through a whole copy (speed.generate_whole)")
    log.info("stage %s: %s", stage, ", ".join([loss_mix.extra_repr(), *how]))
    last = run.output_dir / stage / "checkpoints" / "last.ckpt"
    results = run.output_dir / stage / STAGE_RESULTS
    resume = str(last) if run.resume and last.exists() else None  # a file, or a distributed checkpoint's folder
    if resume:
        check_resumable(last, stage)
        finished = read_stage_results(results)
        if finished is not None:  # read back, neither fitted nor logged again
            log.info("stage %s: finished earlier; its results and weights are read back from %s", stage, results.parent)
            return finished, load_weights(module.student, last)
        log.info("stage %s: resuming from %s", stage, resume)
    elif run.resume:
        log.warning(
            "stage %s: ckpt_path=last, but there is no %s to resume from; training the stage from its start",
            stage,
            last,
        )
    with lightning_hushed():
        trainer = make_trainer(run, stage, **trainer_overrides)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
        end_logger_runs(trainer)
    metrics = {**val, **{k: float(v) for k, v in test.items()}, **rollouts(datamodule, module.student, teacher)}
    if is_global_zero():
        atomic_write_text(results, json.dumps(metrics, indent=2) + "\n")
    return metrics, unsharded(module.student, model)
