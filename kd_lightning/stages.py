"""Fit and test one stage of a run (``teacher``, ``distilled``, ``baseline``) from the config.

Each stage writes its logs and ``checkpoints/last.ckpt`` under ``<output_dir>/<stage>`` and
starts from the same seed, so the distilled student and the baseline begin alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.checkpoints import AtomicCheckpointIO, check_resumable
from kd_lightning.config import build
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.loss_mix import LossMix
from kd_lightning.models.outputs import output_head
from kd_lightning.module import DistillationModule, check_chunk_rows
from kd_lightning.progress import StageProgress, lightning_hushed
from kd_lightning.speed import SpeedSettings
from kd_lightning.teacher import Teacher

log = logging.getLogger(__name__)


def leave_process_group() -> None:
    """After the last stage of a DDP run: the ranks wait for each other, then close the process group (a rank that
    exits with it open can abort in the destructors of its communication threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_global_zero() -> bool:
    """True in the process that writes shared outputs (rank 0, or the only process)."""
    return rank_zero_only.rank == 0


def build_loss_mix(cfg: DictConfig) -> LossMix:
    """The distilled stage's :class:`LossMix` from ``cfg.distill`` (every setting checked here)."""
    distill = cfg.distill

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    extra_terms = {name: {**plain(spec), "objective": build(spec.objective)} if spec.get("objective") else plain(spec)
                   for name, spec in (distill.get("extra_terms") or {}).items()}
    return LossMix(objective=build(distill.loss) if distill.get("loss") else None, temperature=distill.temperature,
                   alpha=distill.alpha, extra_terms=extra_terms, features=plain(distill.get("features")),
                   weights=plain(distill.get("weights")), schedules=plain(distill.get("schedules")))


def check_chunked(cfg: DictConfig, task: str, loss_mix: LossMix) -> None:
    """``distill.chunk_rows`` fits this run, and the models it trains give final hidden states and an output head:
    the student, and the teacher when it may be trained here (no ``teacher.checkpoint``)."""
    chunk_rows = cfg.distill.get("chunk_rows")
    check_chunk_rows(chunk_rows, task, loss_mix.features is not None)
    if chunk_rows is None:
        return
    for role in ("student",) if cfg.teacher.get("checkpoint") else ("student", "teacher"):
        model = build(cfg[role].model)
        if output_head(model) is None:
            raise KDError(f"distill.chunk_rows trains from final hidden states and an output head, but the {role} "
                          f"({type(model).__name__}) has neither hidden_states() and head (as kd_lightning.models.GPT) nor "
                          "get_output_embeddings() (as transformers causal LMs); unset distill.chunk_rows.")


def check_trainer_settings(cfg: DictConfig) -> None:
    """Every stage trains for a positive, finite number of epochs (``trainer`` and ``teacher.fit``)."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps == 0 or max_steps < -1:
        raise KDError(f"trainer.max_steps must be -1 (no limit) or a positive integer, got {max_steps!r}.")
    for key, epochs in (("trainer.max_epochs", cfg.trainer.get("max_epochs")), ("teacher.fit.max_epochs", cfg.teacher.fit.max_epochs)):
        if epochs is None or (epochs == -1 and max_steps > 0):
            continue  # Lightning's default, or bounded by max_steps
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise KDError(f"{key} must be a positive integer, got {epochs!r}" + (" (-1 trains forever unless trainer.max_steps "
                          "is set)" if epochs == -1 else "") + f"; set e.g. {key}=30.")


class ReseedEveryEpoch(L.Callback):
    """Seed all RNGs with ``seed + epoch`` when an epoch starts.

    Shuffling, augmentation and dropout of epoch ``e`` then depend on ``(seed, e)`` only, so a
    run resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


def make_trainer(cfg: DictConfig, stage: str, **overrides: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` writing logs and checkpoints under ``<output_dir>/<stage>``."""
    stage_dir = Path(cfg.paths.output_dir) / stage
    callbacks = [ReseedEveryEpoch(cfg.seed)] + ([StageProgress(stage)] if cfg.trainer.get("enable_progress_bar", True) else []) + [
        build(conf, dirpath=str(stage_dir / "checkpoints")) if "ModelCheckpoint" in conf._target_ else build(conf)
        for conf in (cfg.get("callbacks") or {}).values()
        if conf is not None
    ]
    return build(cfg.trainer, default_root_dir=str(stage_dir), callbacks=callbacks, logger=make_logger(cfg, stage),
                 plugins=[AtomicCheckpointIO()], **overrides)


def end_logger_runs(trainer: L.Trainer) -> None:
    """Close each stage's W&B run, so the next stage starts its own instead of writing into it."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()


def make_logger(cfg: DictConfig, stage: str) -> Any:
    """The ``logger`` of ``cfg`` writing under ``<output_dir>/<stage>``; a ``name`` or ``group`` left null
    becomes the stage's name and the run directory's name. ``False`` without a logger."""
    if not cfg.get("logger"):
        return False
    if "WandbLogger" in cfg.logger._target_:
        os.environ.setdefault("WANDB_SILENT", "true")  # its banners; WANDB_SILENT=false shows them
    filled = {"save_dir": str(Path(cfg.paths.output_dir) / stage)}
    for key, value in (("name", stage), ("group", Path(cfg.paths.output_dir).name)):
        if key in cfg.logger and cfg.logger[key] is None:
            filled[key] = value
    return build(cfg.logger, **filled)


def run_stage(cfg: DictConfig, stage: str, model: DictConfig, teacher: Teacher | None, loss_mix: LossMix, datamodule: Any,
              optim: DictConfig | None = None, **trainer_overrides: Any) -> tuple[dict[str, float], nn.Module]:
    """Build ``model`` from the seed, fit it with ``loss_mix`` against ``teacher``, test it.

    Returns the stage's ``val/...`` and ``test/...`` metrics and the trained model.
    ``ckpt_path=last`` resumes the stage from its ``last.ckpt`` when there is one.
    """
    optim = optim if optim is not None else cfg.optim
    speed = SpeedSettings.from_config(cfg.get("speed"))
    if isinstance(datamodule, InMemoryDataModule):
        datamodule.memory_format = speed.memory_format()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillationModule(speed.prepare(build(model)), teacher, num_classes=cfg.data.num_classes, loss_mix=loss_mix,
                                optimizer=build(optim.optimizer),
                                scheduler=build(optim.scheduler) if optim.get("scheduler") else None,
                                task=getattr(datamodule, "task", "classification"), chunk_rows=cfg.distill.get("chunk_rows"))
    chunked = f", the chunked loss ({module.chunk_rows} tokens per block)" if module.chunk_rows else ""
    log.info("stage %s: %s%s", stage, loss_mix.extra_repr(), chunked)
    last = Path(cfg.paths.output_dir) / stage / "checkpoints" / "last.ckpt"
    resume = str(last) if cfg.get("ckpt_path") == "last" and last.is_file() else None
    if resume:
        check_resumable(last, stage)
        log.info("stage %s: resuming from %s", stage, resume)
    with lightning_hushed():
        trainer = make_trainer(cfg, stage, **trainer_overrides)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
        end_logger_runs(trainer)
    return {**val, **{k: float(v) for k, v in test.items()}}, module.student
