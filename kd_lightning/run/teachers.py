"""Where a run's teacher comes from: a checkpoint, a teacher trained once and cached, or a recording.

All settings are in the ``teacher`` config (``conf/teacher.yaml``, parsed into
:class:`~kd_lightning.run.settings.TeacherSettings`):

- ``teacher.checkpoint``: weights to load (RepDistiller ``{'model': ...}``, Lightning ``.ckpt``,
  plain state_dict). Unset, the teacher is **trained once** with ``teacher.fit`` and its weights
  kept in the *trained-teacher cache*, ``paths.cache_dir/trained_teachers/<name>-<key>.pth``,
  the key a hash of the teacher, data, trainer settings and seed; every later run and sweep job
  with the same key loads it.
- ``teacher.mode=live`` runs those weights on every batch (:class:`~kd_lightning.teacher.LiveTeacher`);
  ``teacher.mode=recorded`` runs them once over the data and keeps a *recording*
  (:mod:`kd_lightning.teacher.format`), ``paths.cache_dir/recordings/<name>-<key>/``, the key a hash of
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

from torch import nn

from kd_lightning.checkpoints import load_weights, save_weights
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.files import content_key, job_lock, path_sha256, set_aside
from kd_lightning.loss.mix import LossMix
from kd_lightning.models.outputs import check_packing
from kd_lightning.models.pretrained import pretrained_fingerprint
from kd_lightning.progress import lightning_hushed
from kd_lightning.run.preflight import packs
from kd_lightning.run.settings import Settings
from kd_lightning.run.stages import is_global_zero, run_stage
from kd_lightning.teacher.format import FORMAT_VERSION, META_FILE, data_identity, describe_mismatch
from kd_lightning.teacher.interface import Teacher
from kd_lightning.teacher.live import LiveTeacher
from kd_lightning.teacher.recorded import RecordedTeacher
from kd_lightning.teacher.recorder import record_teacher

log = logging.getLogger(__name__)


def prepare_teacher(settings: Settings, datamodule: Any) -> Teacher:
    """The teacher of this run: live (loaded or trained once) or recorded (``teacher.mode``)."""
    if settings.teacher.mode == "live":
        return LiveTeacher(
            settings.speed.prepare(teacher_model(settings, datamodule)), trained_here=settings.teacher.trained_here
        )
    return recorded_teacher(settings, datamodule)


# -- weights: a checkpoint, or trained once and cached ----------------------------------------------


def trained_teacher_path(settings: Settings) -> Path:
    """Where the teacher trained for this teacher + data + seed config is cached; sweeps over distillation settings
    share it."""
    teacher = settings.teacher
    return settings.run.cache_dir / "trained_teachers" / f"{teacher.name}-{content_key(teacher.cache_identity)}.pth"


def teacher_model(settings: Settings, datamodule: Any) -> nn.Module:
    """The teacher network: loaded from ``teacher.checkpoint`` or the trained-teacher cache, or trained now."""
    teacher = settings.teacher
    if teacher.checkpoint is not None or not teacher.trains:
        if teacher.checkpoint is not None:
            log.info("teacher: loading %s", teacher.checkpoint)
            model = load_weights(teacher.model(), teacher.checkpoint)
        else:
            log.info("teacher: pretrained, read from %s; distilled from as it is", teacher.path)
            model = teacher.model()
        if packs(datamodule):  # a teacher trained here was checked by check_models, before its training
            check_packing(model, "teacher")
        return model
    cached = trained_teacher_path(settings)
    if not is_global_zero():  # the ranks of one DDP job train it together; rank 0 holds the lock and saves
        return (
            train_teacher(settings, datamodule, cached)
            if not cached.exists()
            else load_weights(teacher.model(), cached)
        )
    with job_lock(cached):
        if cached.exists():
            log.info("teacher: reusing %s", cached)
            try:
                return load_weights(teacher.model(), cached)
            except KDError as error:
                log.warning(
                    "teacher: the cached teacher is unusable (%s); set aside as %s, training it again",
                    error,
                    set_aside(cached).name,
                )
        return train_teacher(settings, datamodule, cached)


def teacher_view(datamodule: Any) -> contextlib.AbstractContextManager:
    """The datamodule's :meth:`~kd_lightning.data.InMemoryDataModule.teacher_view` block, if it has one."""
    return datamodule.teacher_view() if hasattr(datamodule, "teacher_view") else contextlib.nullcontext()


def train_teacher(settings: Settings, datamodule: Any, cached: Path) -> nn.Module:
    """The teacher stage: train with ``teacher.fit``, keep the weights at ``cached``."""
    log.info("teacher: no checkpoint given, training one (cached at %s)", cached)
    fit = settings.teacher.fit
    with teacher_view(datamodule):  # the teacher's training data: every label (data.labeled_fraction), or its own
        metrics, model = run_stage(
            settings,
            "teacher",
            settings.teacher.model,
            None,
            LossMix.task_only(),
            datamodule,
            optim=fit,
            max_epochs=fit.max_epochs,
        )
    if is_global_zero():
        save_weights(model, cached, epoch=fit.max_epochs, metrics=metrics)
    return model


# -- recorded --------------------------------------------------------------------------------------


def recording_identity(settings: Settings, datamodule: InMemoryDataModule, teacher_file: Path | None) -> dict[str, Any]:
    """What a recording depends on: teacher weights, data, views, top-k, precision."""
    recording = settings.teacher.recording
    tail = {"tail_samples": recording.samples} if recording.samples else {}  # the other tails are not recorded
    weights = (
        path_sha256(Path(teacher_file))[:16]
        if teacher_file
        else pretrained_fingerprint(settings.teacher.model.settings)
        if not settings.teacher.trains
        else None
    )
    return {
        "teacher": weights,
        "data": data_identity(datamodule),
        "views_per_sample": recording.views_per_sample,
        "top_k": recording.top_k,
        **tail,
        "precision": settings.run.precision,
        "format": FORMAT_VERSION,
    }


def recorded_teacher(settings: Settings, datamodule: Any) -> RecordedTeacher:
    """The teacher's recording for this run; training views replayed by ``datamodule``.

    ``teacher.recording.dir`` names a recording to use, checked against this run's teacher and
    data. Otherwise it lives under ``paths.cache_dir/recordings/<teacher>-<key>``; the first
    run records it (the teacher is loaded or trained for that only), later runs just open it.
    """
    recording, checkpoint = settings.teacher.recording, settings.teacher.checkpoint
    if not isinstance(datamodule, InMemoryDataModule):
        raise KDError(
            f"teacher.mode=recorded needs a datamodule derived from kd_lightning.data.InMemoryDataModule (batches "
            f"carry each sample's index to look its logits up); {type(datamodule).__name__} is not. Use teacher.mode=live."
        )
    if recording.dir:
        teacher = RecordedTeacher(recording.dir, recording.tail)
        wanted = recording_identity(settings, datamodule, checkpoint)
        recorded = teacher.meta["identity"]
        problems = describe_mismatch(
            {k: recorded.get(k) for k in ("teacher", "data")}, {k: wanted[k] for k in ("teacher", "data")}
        )
        if problems:
            raise KDError(
                f"the teacher recording in {recording.dir} was recorded for another "
                + "; ".join(problems)
                + ". Unset teacher.recording.dir to record the teacher for this run."
            )
    else:
        directory = record_once(
            settings, datamodule, checkpoint or (trained_teacher_path(settings) if settings.teacher.trains else None)
        )
        teacher = RecordedTeacher(directory, recording.tail)
    teacher.check_covers(datamodule, settings.run.num_classes)
    datamodule.replay_views(teacher.views)
    return teacher


def record_once(settings: Settings, datamodule: InMemoryDataModule, teacher_file: Path | None) -> Path:
    """The recording of the teacher in ``teacher_file`` (trained and cached first if needed; ``None``: a pretrained
    teacher used as it is) for this data, made by the first job that needs it (rank 0, under a lock) and reused by
    every later one; its directory."""
    if teacher_file is not None and not teacher_file.is_file():
        teacher_model(settings, datamodule)  # trains and caches it; recorded below from that file
    if teacher_file is not None:
        wait_for_rank_zero(teacher_file)
    identity = recording_identity(settings, datamodule, teacher_file)
    directory = settings.run.cache_dir / "recordings" / f"{settings.teacher.name}-{content_key(identity)}"
    if is_global_zero():
        with job_lock(directory):
            if (directory / META_FILE).is_file():
                log.info("teacher recording: reusing %s", directory)
            else:
                model = teacher_model(settings, datamodule)
                with lightning_hushed():
                    record_teacher(
                        model,
                        datamodule,
                        directory,
                        identity,
                        settings.teacher.recording,
                        accelerator=settings.run.accelerator,
                        precision=settings.run.precision,
                        vocab_size=settings.run.num_classes if getattr(datamodule, "task", None) == "tokens" else None,
                        trained_here=settings.teacher.trained_here,
                    )
    wait_for_rank_zero(directory / META_FILE)
    return directory


def wait_for_rank_zero(path: Path) -> None:
    """In the other ranks of a DDP job: wait until rank 0 has written ``path`` (atomically)."""
    while not is_global_zero() and not path.is_file():
        time.sleep(1)
