"""``train(cfg)``: teacher stage, distillation, baseline, summary. The CLI is a thin shell over it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning import __version__
from kd_lightning.checkpoints import load_weights, save_weights
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.module import DistillationModule, check_same_classes, check_temperature_and_alpha
from kd_lightning.plots import plot_curves
from kd_lightning.teacher_cache import (FORMAT_VERSION, META_FILE, VIEW_SEED, TeacherOutputs, data_identity,
                                        describe_mismatch, file_sha256, record_teacher_outputs)

log = logging.getLogger(__name__)

RESULTS_FILE = "metrics.json"
# Trainer settings that do not change what a trained teacher is; all others (fast_dev_run,
# limit_train_batches, precision, devices, ...) are part of the teacher cache key.
DISPLAY_ONLY_TRAINER_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir"}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole recipe described by ``cfg``; return (and write) the metrics summary.

    1. the teacher: ``teacher.checkpoint``, or trained once and cached under ``paths.cache_dir``;
       with ``teacher.mode=cached``, its recorded outputs instead (recorded once per teacher + data);
    2. the student distilled from it, tested;
    3. with ``baseline=true``, the same student trained alone (alpha=0, same seed), tested;
    4. ``metrics.json`` in ``paths.output_dir``.
    """
    check_temperature_and_alpha(cfg.distill.temperature, cfg.distill.alpha)
    if cfg.get("ckpt_path") not in (None, "last"):
        raise KDError(f"ckpt_path must be null or 'last', got {cfg.ckpt_path!r}: 'last' resumes every stage of the "
                      "run in hydra.run.dir from <stage>/checkpoints/last.ckpt.")
    output_dir = Path(cfg.paths.output_dir)
    refuse_to_overwrite(output_dir, cfg.get("overwrite", False))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data needs none
    warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")  # the frozen teacher

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    mode = cfg.teacher.get("mode", "live")
    if mode == "live":
        check_models_agree(cfg, datamodule)
        teacher: nn.Module | TeacherOutputs = prepare_teacher(cfg, datamodule)
    elif mode == "cached":
        if cfg.distill.get("features"):
            raise KDError("distill.features needs the live teacher's activations; set teacher.mode=live "
                          "(a cached teacher records logits only).")
        teacher = prepare_teacher_outputs(cfg, datamodule)
        datamodule.replay_views(teacher)
    else:
        raise KDError(f"teacher.mode must be live or cached, got {mode!r}.")

    results: dict[str, Any] = {"distilled": fit_student(cfg, datamodule, teacher, cfg.distill.alpha, "distilled")}
    results["teacher"] = {f"test/{k}": results["distilled"].get(f"test/teacher_{k}") for k in ("acc", "ece")}
    if cfg.get("baseline", False):
        # alpha=0: the teacher is never run in training, only scored against for the fidelity metrics
        results["baseline"] = fit_student(cfg, datamodule, teacher, 0.0, "baseline")
        results["gain"] = results["distilled"]["test/acc"] - results["baseline"]["test/acc"]
    results["output_dir"] = str(output_dir.resolve())

    if is_global_zero():  # under DDP every rank runs train(); one writes
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        plot_curves(output_dir, teacher_acc=results["distilled"].get("val/teacher_acc"))
    return results


def is_global_zero() -> bool:
    """True in the process that writes shared outputs (rank 0, or the only process)."""
    return rank_zero_only.rank == 0


def refuse_to_overwrite(output_dir: Path, overwrite: bool) -> None:
    if (output_dir / RESULTS_FILE).exists() and not overwrite:
        raise KDError(
            f"{output_dir} already holds the results of a run ({RESULTS_FILE}). Choose another "
            "directory (hydra.run.dir=...) or pass overwrite=true to replace them."
        )


def check_models_agree(cfg: DictConfig, datamodule: Any) -> None:
    """Fail before any training if teacher and student disagree on the number of classes."""
    if not hasattr(datamodule, "example_input"):
        return  # DistillationModule checks on the first batch instead
    x = datamodule.example_input()
    with torch.no_grad():
        teacher_out = instantiate(cfg.teacher.model).eval()(x)
        student_out = instantiate(cfg.student.model).eval()(x)
    check_same_classes(student_out, teacher_out)


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
    callbacks = [ReseedEveryEpoch(cfg.seed)] + [
        instantiate(conf, dirpath=str(stage_dir / "checkpoints")) if "ModelCheckpoint" in conf._target_ else instantiate(conf)
        for conf in (cfg.get("callbacks") or {}).values()
        if conf is not None
    ]
    logger = instantiate(cfg.logger, save_dir=str(stage_dir), name="", version="") if cfg.get("logger") else False
    return instantiate(cfg.trainer, default_root_dir=str(stage_dir), callbacks=callbacks, logger=logger, **overrides)


def fit_and_test(cfg: DictConfig, module: DistillationModule, datamodule: Any, stage: str, **trainer_overrides: Any) -> dict[str, float]:
    trainer = make_trainer(cfg, stage, **trainer_overrides)
    last = Path(cfg.paths.output_dir) / stage / "checkpoints" / "last.ckpt"
    resume = str(last) if cfg.get("ckpt_path") == "last" and last.is_file() else None
    if resume:
        log.info("stage %s: resuming from %s", stage, resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {**val, **{k: float(v) for k, v in test.items()}}


def build_module(cfg: DictConfig, student: nn.Module, teacher: nn.Module | TeacherOutputs | None, alpha: float,
                 optim: DictConfig, distill: bool = False) -> DistillationModule:
    """A DistillationModule with ``optim``'s optimizer and scheduler (``cfg.optim``, or ``teacher.fit``).

    ``teacher`` is a live model, recorded :class:`TeacherOutputs`, or ``None``. With ``distill``,
    the objective, extra and feature terms and schedules of ``cfg.distill``; otherwise CE alone
    weighted ``1 − alpha`` (the teacher and baseline stages).
    """
    recorded = isinstance(teacher, TeacherOutputs)
    terms: dict[str, Any] = {}
    if distill:
        plain = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else None  # noqa: E731
        terms = {"objective": instantiate(cfg.distill.loss) if cfg.distill.get("loss") else None,
                 "extra_terms": {name: {"objective": instantiate(spec.objective), "weight": spec.get("weight", 1.0)}
                                 for name, spec in (cfg.distill.get("extra_terms") or {}).items()},
                 "features": plain(cfg.distill.get("features")), "weights": plain(cfg.distill.get("weights")),
                 "schedules": plain(cfg.distill.get("schedules"))}
    return DistillationModule(
        **terms,
        student=student,
        teacher=None if recorded else teacher,
        teacher_outputs=teacher if recorded else None,
        num_classes=cfg.data.num_classes,
        temperature=cfg.distill.temperature,
        alpha=alpha,
        optimizer=instantiate(optim.optimizer),
        scheduler=instantiate(optim.scheduler) if optim.get("scheduler") else None,
    )


def fit_student(cfg: DictConfig, datamodule: Any, teacher: nn.Module | TeacherOutputs | None, alpha: float,
                stage: str) -> dict[str, float]:
    """Train a fresh student (same seed every stage, so KD and baseline start alike); return its metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, instantiate(cfg.student.model), teacher, alpha, cfg.optim, distill=stage == "distilled")
    log.info("stage %s: alpha=%s temperature=%s%s", stage, alpha, cfg.distill.temperature,
             f" objective={module.objective_name}" if alpha > 0 else "")
    return fit_and_test(cfg, module, datamodule, stage)


def teacher_cache_path(cfg: DictConfig) -> Path:
    """Where the teacher trained for this teacher + data + seed config lives; sweeps over
    distillation settings share it."""
    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True)

    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in DISPLAY_ONLY_TRAINER_KEYS}
    identity = {"model": plain(cfg.teacher.model), "fit": plain(cfg.teacher.fit), "data": plain(cfg.data),
                "trainer": trainer, "seed": cfg.seed, "kd_lightning": __version__}  # a new release retrains
    return Path(cfg.paths.cache_dir) / "teachers" / f"{teacher_name(cfg)}-{config_key(identity)}.pth"


def config_key(identity: dict[str, Any]) -> str:
    """16 hex digits identifying a JSON-able description (a cache key)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def teacher_name(cfg: DictConfig) -> str:
    """The teacher model's name (zoo name, else class name), for cache file names."""
    return cfg.teacher.model.get("name") or cfg.teacher.model._target_.rsplit(".", 1)[-1]


def given_teacher_checkpoint(cfg: DictConfig) -> Path | None:
    """``teacher.checkpoint`` as a path (``None`` if unset); refused if the file is missing."""
    if not cfg.teacher.get("checkpoint"):
        return None
    path = Path(cfg.teacher.checkpoint)
    if not path.is_file():
        raise KDError(f"teacher checkpoint {path} does not exist; fix teacher.checkpoint.")
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes (parallel sweep jobs) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_teacher(cfg: DictConfig, datamodule: Any) -> nn.Module:
    """The teacher for this run: loaded from ``teacher.checkpoint``, from the cache, or trained now."""
    if cfg.teacher.get("checkpoint"):
        log.info("teacher: loading %s", cfg.teacher.checkpoint)
        return load_weights(instantiate(cfg.teacher.model), cfg.teacher.checkpoint)
    cached = teacher_cache_path(cfg)
    # Sweep jobs serialise on the lock; the ranks of one DDP job must not (they train together).
    with file_lock(cached.with_suffix(".lock")) if is_global_zero() else contextlib.nullcontext():
        if cached.exists():
            log.info("teacher: reusing %s", cached)
            return load_weights(instantiate(cfg.teacher.model), cached)
        log.info("teacher: no checkpoint given, training one (cached at %s)", cached)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        teacher = instantiate(cfg.teacher.model)
        fit = cfg.teacher.fit
        module = build_module(cfg, teacher, None, 0.0, fit)
        metrics = fit_and_test(cfg, module, datamodule, "teacher", max_epochs=fit.max_epochs)
        if is_global_zero():
            save_weights(teacher, cached, epoch=fit.max_epochs, metrics=metrics)
        return teacher


def teacher_outputs_identity(cfg: DictConfig, datamodule: Any, teacher_file: Path | None) -> dict[str, Any]:
    """What recorded teacher outputs depend on: teacher weights, data, views, top-k, precision."""
    cache = cfg.teacher.get("cache") or {}
    return {"teacher": file_sha256(teacher_file)[:16] if teacher_file else None, "data": data_identity(datamodule),
            "views_per_sample": cache.get("views_per_sample", 16), "top_k": cache.get("top_k"),
            "precision": str(cfg.trainer.get("precision", "32-true")), "view_seed": VIEW_SEED, "format": FORMAT_VERSION}


def prepare_teacher_outputs(cfg: DictConfig, datamodule: Any) -> TeacherOutputs:
    """The teacher's recorded outputs for this run (``teacher.mode=cached``).

    ``teacher.cache.dir`` names a recording to use, checked against this run's teacher and data.
    Otherwise the recording lives under ``paths.cache_dir/teacher_outputs/<teacher>-<key>``, the
    key a hash of everything the outputs depend on; the first run records it (the teacher is
    loaded or trained for that only), later runs and sweep jobs just open it.
    """
    if not isinstance(datamodule, InMemoryDataModule):
        raise KDError(f"teacher.mode=cached needs a datamodule derived from kd_lightning.data.InMemoryDataModule (batches "
                      f"carry each sample's index to look its logits up); {type(datamodule).__name__} is not. Use teacher.mode=live.")
    cache = cfg.teacher.get("cache") or {}
    explicit = cache.get("dir")
    if explicit:
        outputs = TeacherOutputs(explicit)
        wanted = teacher_outputs_identity(cfg, datamodule, given_teacher_checkpoint(cfg))
        recorded = outputs.meta["identity"]
        problems = describe_mismatch({k: recorded.get(k) for k in ("teacher", "data")}, {k: wanted[k] for k in ("teacher", "data")})
        if problems:
            raise KDError(f"the teacher outputs in {explicit} were recorded for another " + "; ".join(problems)
                          + ". Unset teacher.cache.dir to record outputs for this teacher and data.")
        return check_outputs_fit(outputs, cfg, datamodule)

    teacher_file = given_teacher_checkpoint(cfg) or teacher_cache_path(cfg)
    if not teacher_file.is_file():
        prepare_teacher(cfg, datamodule)  # trains and caches it; recorded below from that file
    identity = teacher_outputs_identity(cfg, datamodule, teacher_file)
    directory = Path(cfg.paths.cache_dir) / "teacher_outputs" / f"{teacher_name(cfg)}-{config_key(identity)}"
    if is_global_zero():
        with file_lock(directory.with_name(directory.name + ".lock")):
            if (directory / META_FILE).is_file():
                log.info("teacher outputs: reusing %s", directory)
            else:
                teacher = prepare_teacher(cfg, datamodule)
                record_teacher_outputs(teacher, datamodule, directory, identity, cache.get("views_per_sample", 16),
                                       cache.get("top_k"), accelerator=cfg.trainer.get("accelerator", "auto"),
                                       precision=cfg.trainer.get("precision", "32-true"))
    else:
        while not (directory / META_FILE).is_file():  # rank 0 is recording
            time.sleep(1)
    return check_outputs_fit(TeacherOutputs(directory), cfg, datamodule)


def check_outputs_fit(outputs: TeacherOutputs, cfg: DictConfig, datamodule: Any) -> TeacherOutputs:
    """Refuse recorded outputs whose classes or split sizes do not match this run's data."""
    if outputs.num_classes != cfg.data.num_classes:
        raise KDError(f"the teacher outputs in {outputs.directory} have {outputs.num_classes} classes but the data has "
                      f"{cfg.data.num_classes}; record them for this data (unset teacher.cache.dir).")
    for split, data in datamodule.splits.items():
        if split not in outputs.meta["splits"] or outputs.num_samples(split) != len(data):
            raise KDError(f"the teacher outputs in {outputs.directory} do not cover split {split!r} of this data "
                          f"({len(data)} samples); record them for this data (unset teacher.cache.dir).")
    return outputs
