"""Where a run's teacher comes from: a checkpoint, a teacher trained once and cached, or a recording.

All settings are in the ``teacher`` config (``conf/teacher.yaml``):

- ``teacher.checkpoint``: weights to load (RepDistiller ``{'model': ...}``, Lightning ``.ckpt``,
  plain state_dict). Unset, the teacher is **trained once** with ``teacher.fit`` and its weights
  kept in the *trained-teacher cache*, ``paths.cache_dir/trained_teachers/<name>-<key>.pth``,
  the key a hash of the teacher, data, trainer settings and seed; every later run and sweep job
  with the same key loads it.
- ``teacher.mode=live`` runs those weights on every batch (:class:`~kd_lightning.teacher.LiveTeacher`);
  ``teacher.mode=recorded`` runs them once over the data and keeps a *recording*
  (:mod:`kd_lightning.recording`), ``paths.cache_dir/recordings/<name>-<key>/``, the key a hash of
  the teacher's weights, the data, the views, top-k and precision, or uses
  ``teacher.recording.dir``. While training from a recording the teacher is never built.

Parallel sweep jobs serialise on a file lock per cached thing, so each is made once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning import __version__
from kd_lightning.checkpoints import existing_checkpoint, load_weights, save_weights
from kd_lightning.config import build
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.features import FeatureDistiller
from kd_lightning.files import content_key, file_sha256, job_lock, set_aside
from kd_lightning.loss_mix import LossMix
from kd_lightning.models.outputs import model_logits
from kd_lightning.progress import lightning_hushed
from kd_lightning.module import check_same_classes
from kd_lightning.recording import (FORMAT_VERSION, META_FILE, RecordedTeacher, RecordingSettings, data_identity,
                                    describe_mismatch, record_teacher)
from kd_lightning.stages import is_global_zero, run_stage
from kd_lightning.speed import SpeedSettings
from kd_lightning.teacher import LiveTeacher, Teacher
from kd_lightning.vocab import check_vocabularies

log = logging.getLogger(__name__)

MODES = ("live", "recorded")
FORWARD_KL = "kd_lightning.losses.kd_loss"
# Trainer settings that do not change what a trained teacher is; all others (fast_dev_run,
# limit_train_batches, precision, devices, ...) are part of the trained-teacher key.
DISPLAY_ONLY_TRAINER_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir"}


def check_teacher_settings(cfg: DictConfig) -> RecordingSettings | None:
    """Check ``cfg.teacher`` before anything runs; return the recording settings in recorded mode."""
    mode = cfg.teacher.get("mode", "live")
    if mode not in MODES:
        hint = " (teacher.mode=cached is now teacher.mode=recorded)" if mode == "cached" else ""
        raise KDError(f"teacher.mode must be live or recorded, got {mode!r}{hint}.")
    if mode == "live":
        return None
    if cfg.distill.get("features"):
        raise KDError("distill.features needs the live teacher's activations; set teacher.mode=live "
                      "(a recorded teacher has logits only).")
    settings = RecordingSettings(**OmegaConf.to_container(cfg.teacher.recording, resolve=True))
    settings.check_classes(cfg.data.num_classes)
    if settings.samples:
        objectives = {"distill.loss": cfg.distill.loss} | {
            f"distill.extra_terms.{name}.objective": term.get("objective") for name, term in (cfg.distill.get("extra_terms") or {}).items()}
        for where, objective in objectives.items():
            target = objective.get("_target_") if objective is not None else None
            if target != FORWARD_KL or objective.get("standardize"):
                what = "standardized" if target == FORWARD_KL else target
                raise KDError(f"teacher.recording.tail=sampled stands in for the teacher in forward KL only (distill/loss=kd, "
                              f"standardize=false), but {where} is {what}; use teacher.recording.tail=student.")
    return settings


def prepare_teacher(cfg: DictConfig, datamodule: Any) -> Teacher:
    """The teacher of this run: live (loaded or trained once) or recorded (``teacher.mode``)."""
    recording = check_teacher_settings(cfg)
    if recording is None:
        check_models_agree(cfg, datamodule)
        return LiveTeacher(SpeedSettings.from_config(cfg.get("speed")).prepare(teacher_model(cfg, datamodule)))
    return recorded_teacher(cfg, datamodule, recording)


def check_models_agree(cfg: DictConfig, datamodule: Any) -> None:
    """Before any training: the feature terms' layers exist, teacher and student predict the same classes."""
    teacher, student = build(cfg.teacher.model), build(cfg.student.model)
    if cfg.distill.get("features"):
        FeatureDistiller(OmegaConf.to_container(cfg.distill.features, resolve=True)).check_paths(student, teacher)
    if not hasattr(datamodule, "example_input"):
        return  # DistillationModule checks on the first batch instead
    batch = {"inputs": datamodule.example_input()}
    with torch.no_grad():
        student_logits, teacher_logits = model_logits(student.eval(), batch), model_logits(teacher.eval(), batch)
    if getattr(datamodule, "task", "classification") == "tokens":
        check_vocabularies(student_logits, teacher_logits, cfg.data.num_classes)
    else:
        check_same_classes(student_logits, teacher_logits)


# -- weights: a checkpoint, or trained once and cached ----------------------------------------------

def teacher_name(cfg: DictConfig) -> str:
    """The teacher model's name (zoo name, else class name), for cache file names."""
    return cfg.teacher.model.get("name") or cfg.teacher.model._target_.rsplit(".", 1)[-1]


def trained_teacher_path(cfg: DictConfig) -> Path:
    """Where the teacher trained for this teacher + data + seed config is cached; sweeps over
    distillation settings share it."""
    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True)

    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in DISPLAY_ONLY_TRAINER_KEYS}
    data = {k: v for k, v in plain(cfg.data).items() if k != "labeled_fraction"}  # the teacher trains on every label
    identity = {"model": plain(cfg.teacher.model), "fit": plain(cfg.teacher.fit), "data": data,
                "trainer": trainer, "seed": cfg.seed, "kd_lightning": __version__}  # a new release retrains
    return Path(cfg.paths.cache_dir) / "trained_teachers" / f"{teacher_name(cfg)}-{content_key(identity)}.pth"


def given_checkpoint(cfg: DictConfig) -> Path | None:
    """``teacher.checkpoint`` as a path (``None`` if unset); refused if it is not a file."""
    return existing_checkpoint(cfg.teacher.checkpoint) if cfg.teacher.get("checkpoint") else None


def teacher_model(cfg: DictConfig, datamodule: Any) -> nn.Module:
    """The teacher network: loaded from ``teacher.checkpoint`` or the trained-teacher cache, or trained now."""
    checkpoint = given_checkpoint(cfg)
    if checkpoint is not None:
        log.info("teacher: loading %s", checkpoint)
        return load_weights(build(cfg.teacher.model), checkpoint)
    cached = trained_teacher_path(cfg)
    if not is_global_zero():  # the ranks of one DDP job train it together; rank 0 holds the lock and saves
        return train_teacher(cfg, datamodule, cached) if not cached.exists() else load_weights(build(cfg.teacher.model), cached)
    with job_lock(cached):
        if cached.exists():
            log.info("teacher: reusing %s", cached)
            try:
                return load_weights(build(cfg.teacher.model), cached)
            except KDError as error:
                log.warning("teacher: the cached teacher is unusable (%s); set aside as %s, training it again",
                            error, set_aside(cached).name)
        return train_teacher(cfg, datamodule, cached)


def every_label(datamodule: Any) -> contextlib.AbstractContextManager:
    """The datamodule's :meth:`~kd_lightning.data.InMemoryDataModule.every_label` block, if it has one."""
    return datamodule.every_label() if hasattr(datamodule, "every_label") else contextlib.nullcontext()


def train_teacher(cfg: DictConfig, datamodule: Any, cached: Path) -> nn.Module:
    """The teacher stage: train with ``teacher.fit``, keep the weights at ``cached``."""
    log.info("teacher: no checkpoint given, training one (cached at %s)", cached)
    fit = cfg.teacher.fit
    with every_label(datamodule):  # data.labeled_fraction hides labels from the students only
        metrics, model = run_stage(cfg, "teacher", cfg.teacher.model, None, LossMix.task_only(), datamodule, optim=fit,
                                   max_epochs=fit.max_epochs)
    if is_global_zero():
        save_weights(model, cached, epoch=fit.max_epochs, metrics=metrics)
    return model


# -- recorded --------------------------------------------------------------------------------------

def recording_identity(cfg: DictConfig, datamodule: InMemoryDataModule, settings: RecordingSettings,
                       teacher_file: Path | None) -> dict[str, Any]:
    """What a recording depends on: teacher weights, data, views, top-k, precision."""
    tail = {"tail_samples": settings.samples} if settings.samples else {}  # the other tails are not recorded
    return {"teacher": file_sha256(teacher_file)[:16] if teacher_file else None, "data": data_identity(datamodule),
            "views_per_sample": settings.views_per_sample, "top_k": settings.top_k, **tail,
            "precision": str(cfg.trainer.get("precision", "32-true")), "format": FORMAT_VERSION}


def recorded_teacher(cfg: DictConfig, datamodule: Any, settings: RecordingSettings) -> RecordedTeacher:
    """The teacher's recording for this run; training views replayed by ``datamodule``.

    ``teacher.recording.dir`` names a recording to use, checked against this run's teacher and
    data. Otherwise it lives under ``paths.cache_dir/recordings/<teacher>-<key>``; the first
    run records it (the teacher is loaded or trained for that only), later runs just open it.
    """
    if not isinstance(datamodule, InMemoryDataModule):
        raise KDError(f"teacher.mode=recorded needs a datamodule derived from kd_lightning.data.InMemoryDataModule (batches "
                      f"carry each sample's index to look its logits up); {type(datamodule).__name__} is not. Use teacher.mode=live.")
    if settings.dir:
        teacher = RecordedTeacher(settings.dir, settings.tail)
        wanted = recording_identity(cfg, datamodule, settings, given_checkpoint(cfg))
        recorded = teacher.meta["identity"]
        problems = describe_mismatch({k: recorded.get(k) for k in ("teacher", "data")}, {k: wanted[k] for k in ("teacher", "data")})
        if problems:
            raise KDError(f"the teacher recording in {settings.dir} was recorded for another " + "; ".join(problems)
                          + ". Unset teacher.recording.dir to record the teacher for this run.")
    else:
        teacher_file = given_checkpoint(cfg) or trained_teacher_path(cfg)
        if not teacher_file.is_file():
            teacher_model(cfg, datamodule)  # trains and caches it; recorded below from that file
        wait_for_rank_zero(teacher_file)
        identity = recording_identity(cfg, datamodule, settings, teacher_file)
        directory = Path(cfg.paths.cache_dir) / "recordings" / f"{teacher_name(cfg)}-{content_key(identity)}"
        if is_global_zero():
            with job_lock(directory):
                if (directory / META_FILE).is_file():
                    log.info("teacher recording: reusing %s", directory)
                else:
                    model = teacher_model(cfg, datamodule)
                    with lightning_hushed():
                        record_teacher(model, datamodule, directory, identity, settings,
                                       accelerator=cfg.trainer.get("accelerator", "auto"),
                                       precision=cfg.trainer.get("precision", "32-true"),
                                       vocab_size=cfg.data.num_classes if getattr(datamodule, "task", None) == "tokens" else None)
        wait_for_rank_zero(directory / META_FILE)
        teacher = RecordedTeacher(directory, settings.tail)
    teacher.check_covers(datamodule, cfg.data.num_classes)
    datamodule.replay_views(teacher.views)
    return teacher


def wait_for_rank_zero(path: Path) -> None:
    """In the other ranks of a DDP job: wait until rank 0 has written ``path`` (atomically)."""
    while not is_global_zero() and not path.is_file():
        time.sleep(1)
