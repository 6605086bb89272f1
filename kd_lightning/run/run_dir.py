"""The run directory (``paths.output_dir``): what a run may find there, and what it writes there first.

A run is refused before it writes anything when the directory holds another run's results or checkpoints
(unless ``ckpt_path=last`` resumes it or ``overwrite=true`` replaces it), and a resumed run is refused when
its settings differ from the ones the run was made with (``.hydra/config.yaml``), unless the changes are
named in ``changed_on_resume``. Only a run that was accepted writes: :func:`start` removes an earlier run's
files (``overwrite=true``), records the settings (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``,
and ``resumes.yaml`` for the changes a resume accepted) and opens the log file (``cli.log``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from pathlib import Path
from typing import Any, Iterator

import yaml
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write_text, remove, restore_replaced

log = logging.getLogger(__name__)

RESULTS_FILE = "metrics.json"
SAVED_CONFIG = Path(".hydra") / "config.yaml"
RESUMES_FILE = Path(".hydra") / "resumes.yaml"
TOKENIZER_DIR = "tokenizer"  # a text run's tokenizer, saved with save_pretrained (export --format hf copies it)
STAGES = ("teacher", "distilled", "baseline")
# what a run of the library writes in a stage's folder (overwrite=true replaces these, and only these)
STAGE_OUTPUTS = (
    "checkpoints/*.ckpt",
    "checkpoints/.*.ckpt.partial",
    "checkpoints/.*.ckpt.replaced",
    "metrics.csv",
    "hparams.yaml",
    "results.json",
    "events.out.tfevents.*",
)
RUN_OUTPUTS = (RESULTS_FILE, "curves.png")
# settings that say where and how visibly a run works, not what it computes: they may change on a resume
WHERE_AND_HOW_SHOWN = (
    "ckpt_path",
    "overwrite",
    "changed_on_resume",
    "paths",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.strategy.save_distributed_checkpoint",  # either kind of checkpoint resumes
    "speed.generate_whole",
)  # the same tokens, generated another way

# groups a later release added whose settings, at these values, compute what the run did without them
INERT_WHEN_ADDED = {
    "distill.on_policy": lambda node: (
        isinstance(node, dict) and not (node.get("fraction") or node.get("teacher_fraction"))
    ),
    "teacher.shard": lambda value: value is True,
}  # sharding came with trainer=fsdp
# values a later release renamed that compute what they did
RENAMED = {
    "trainer.strategy._target_": {
        "lightning.pytorch.strategies.ModelParallelStrategy": "kd_lightning.sharding.ShardedStrategy"
    }
}
# modules 0.5 moved: a saved ``_target_`` under the old path names what the new one does
MOVED_MODULES = {
    "kd_lightning.losses": "kd_lightning.loss.objectives",
    "kd_lightning.schedules": "kd_lightning.loss.schedules",
    "kd_lightning.loss_mix": "kd_lightning.loss.mix",
    "kd_lightning.features": "kd_lightning.loss.features",
    "kd_lightning.chunked": "kd_lightning.loss.chunked",
    "kd_lightning.reduction": "kd_lightning.loss.reduction",
}


def moved(target: Any) -> Any:
    """A ``_target_`` written before its module moved, under today's path (anything else as it is)."""
    module, _, name = target.rpartition(".") if isinstance(target, str) else ("", "", "")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def is_global_zero() -> bool:
    """True in the process that writes shared outputs (rank 0, or the only process)."""
    return rank_zero_only.rank == 0


def check(cfg: DictConfig, output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that holds another run (results or checkpoints) unless it is resumed or replaced,
    and a resume whose settings differ from the run's saved ones unless each change is named in ``changed_on_resume``."""
    if (output_dir / RESULTS_FILE).exists() and not overwrite:
        raise KDError(
            f"{output_dir} already holds the results of a run ({RESULTS_FILE}). Choose another "
            "directory (hydra.run.dir=...) or pass overwrite=true to replace them."
        )
    earlier = sorted([*output_dir.glob("*/checkpoints/*.ckpt"), *output_dir.glob("*/checkpoints/.*.ckpt.replaced")])
    if earlier and not (resume or overwrite):
        raise KDError(
            f"{output_dir} holds the checkpoints of an earlier run ({earlier[0].relative_to(output_dir)}); pass "
            "ckpt_path=last to resume it, overwrite=true to replace it, or choose another hydra.run.dir."
        )
    accepted = cfg.get("changed_on_resume") or []
    if not OmegaConf.is_list(accepted) and not isinstance(accepted, list):
        raise KDError(
            f"changed_on_resume must be a list of settings, got {accepted!r}; e.g. changed_on_resume=[trainer.max_epochs]."
        )
    if resume and earlier and not (output_dir / SAVED_CONFIG).is_file():
        raise KDError(
            f"ckpt_path=last: {output_dir} holds checkpoints but not {SAVED_CONFIG}, the record of the settings "
            "they were trained with, so a resume could not tell a changed setting; restore that file, or start "
            "afresh with overwrite=true."
        )
    if resume and is_global_zero():  # the other processes start after rank 0 recorded the resumed settings
        check_named_settings(accepted, cfg, output_dir)
        unaccepted = {
            key: change for key, change in resume_changes(cfg, output_dir).items() if not named(key, accepted)
        }
        if unaccepted:
            listed = ", ".join(f"{key}: {describe(was)} -> {describe(now)}" for key, (was, now) in unaccepted.items())
            raise KDError(
                f"ckpt_path=last: the settings differ from those the run in {output_dir} was made with "
                f"({SAVED_CONFIG}): {listed}; resume with its settings, or name the changes to resume with them "
                f"anyway: changed_on_resume=[{','.join(unaccepted)}]."
            )


def check_named_settings(accepted: Any, cfg: DictConfig, output_dir: Path) -> None:
    """Each entry of ``changed_on_resume`` names a setting of this run or of the run resumed (one removed since)."""
    saved_file = output_dir / SAVED_CONFIG
    saved = OmegaConf.load(saved_file) if saved_file.is_file() else OmegaConf.create()
    for key in map(str, accepted):
        if OmegaConf.select(cfg, key, default=UNSET) is UNSET and OmegaConf.select(saved, key, default=UNSET) is UNSET:
            raise KDError(
                f"changed_on_resume names {key}, a setting neither this run nor the one in {output_dir} has; "
                "name the settings that changed, as the refusal of the resume listed them."
            )


def resume_changes(cfg: DictConfig, output_dir: Path) -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved value, value now)}`` for the settings that changed since the run was made (none when it
    has no saved configuration); where and how visibly it works (:data:`WHERE_AND_HOW_SHOWN`) is not compared."""
    saved_file = output_dir / SAVED_CONFIG
    if not saved_file.is_file():
        return {}
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception as error:  # noqa: BLE001 -- OmegaConf raises several types for a damaged file
        raise KDError(
            f"{saved_file} is unreadable ({' '.join(str(error).split())}); it records the settings of the run "
            "being resumed: restore it, or start afresh with overwrite=true."
        ) from None
    return differences(saved, OmegaConf.to_container(cfg, resolve=False))


UNSET = object()


def differences(saved: Any, now: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved, now)}`` where two configs differ, at the outermost setting that differs (a group added
    or removed is one entry); :data:`WHERE_AND_HOW_SHOWN` is skipped, and so is a setting a later release added
    that the run's saved config lacks while it holds its off value (null, false, empty, or an interpolation), a
    group of :data:`INERT_WHEN_ADDED` at values that change nothing, or a value :data:`RENAMED` (or whose module
    :data:`MOVED_MODULES`) since."""
    if key and named(key, WHERE_AND_HOW_SHOWN):
        return {}
    if saved is UNSET and (now in (None, False, [], {}) or (isinstance(now, str) and now.startswith("${"))):
        return {}
    if saved is UNSET and key in INERT_WHEN_ADDED and INERT_WHEN_ADDED[key](now):
        return {}  # e.g. distill.on_policy sampling nothing: the data set's completions, as before
    if key in RENAMED and RENAMED[key].get(saved) == now:
        return {}
    if key.endswith("._target_") and moved(saved) == now != saved:
        return {}
    if isinstance(saved, dict) and isinstance(now, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for name in sorted(saved.keys() | now.keys(), key=str):
            found.update(
                differences(saved.get(name, UNSET), now.get(name, UNSET), f"{key}.{name}" if key else str(name))
            )
        return found
    return {} if saved == now else {key: (saved, now)}


def named(key: str, names: Any) -> bool:
    """``key`` is one of ``names`` or lies under one (``distill`` names ``distill.temperature``)."""
    return any(key == name or key.startswith(f"{name}.") for name in map(str, names))


def describe(value: Any) -> str:
    return "(unset)" if value is UNSET else str(value)


def stage_names(cfg: Any) -> list[str]:
    """The stages a run with ``cfg`` has: :data:`STAGES` and those of ``distill.on_policy_stages``."""
    more = OmegaConf.select(cfg, "distill.on_policy_stages", default=None) if cfg is not None else None
    return [*STAGES, *(str(name) for name in (more or {}))]


def clear_earlier_run(output_dir: Path, cfg: DictConfig | None = None) -> None:
    """``overwrite=true``: remove what an earlier run wrote in ``output_dir`` (its stages' checkpoints, logs and
    results, ``metrics.json``, ``curves.png``), so that the new run's files are one consistent set (no
    ``last-v1.ckpt`` beside a stale ``last.ckpt``); files the library did not write stay. The stages are those of
    the earlier run's saved settings and of ``cfg``."""
    saved = OmegaConf.load(output_dir / SAVED_CONFIG) if (output_dir / SAVED_CONFIG).is_file() else None
    stages = sorted(set(stage_names(saved) + stage_names(cfg)))
    earlier = [path for stage in stages for pattern in STAGE_OUTPUTS for path in (output_dir / stage).glob(pattern)] + [
        output_dir / name for name in RUN_OUTPUTS
    ]
    removed = [path for path in earlier if path.exists()]  # a distributed checkpoint is a folder
    for path in removed:
        remove(path)
    for folder in [output_dir / stage / "checkpoints" for stage in stages] + [output_dir / stage for stage in stages]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # an empty stage folder left behind would make the loggers warn that it is not empty
    if removed:
        log.info("overwrite: removed %d files and checkpoints of the earlier run in %s", len(removed), output_dir)


def record_settings(cfg: DictConfig, output_dir: Path, resume: bool) -> None:
    """Write the run's settings as Hydra would (``.hydra/config.yaml``, and under Hydra ``overrides.yaml`` and
    ``hydra.yaml``); on a resume that accepted changes, append them to ``.hydra/resumes.yaml``."""
    changes = resume_changes(cfg, output_dir) if resume else {}
    if changes:
        log.warning(
            "ckpt_path=last with changed settings (changed_on_resume): %s; recorded in %s",
            ", ".join(f"{key}: {describe(was)} -> {describe(now)}" for key, (was, now) in changes.items()),
            output_dir / RESUMES_FILE,
        )
        history = (
            (yaml.safe_load((output_dir / RESUMES_FILE).read_text()) or [])
            if (output_dir / RESUMES_FILE).is_file()
            else []
        )
        history.append(
            {
                "resumed": datetime.datetime.now().isoformat(timespec="seconds"),
                "changed": {
                    key: {"was": None if was is UNSET else was, "now": None if now is UNSET else now}
                    for key, (was, now) in changes.items()
                },
            }
        )
        atomic_write_text(output_dir / RESUMES_FILE, yaml.safe_dump(history, sort_keys=False))
    atomic_write_text(output_dir / SAVED_CONFIG, OmegaConf.to_yaml(cfg))
    hydra = hydra_config()
    if hydra is not None:
        atomic_write_text(output_dir / ".hydra" / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra}))
        atomic_write_text(output_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(hydra.overrides.task))


def hydra_config() -> DictConfig | None:
    """Hydra's own settings when the run was started by ``python -m kd_lightning``, else ``None``."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


@contextlib.contextmanager
def start(cfg: DictConfig, output_dir: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Take the accepted run directory: clear an earlier run (``overwrite=true``), record the settings and, for a
    run of the command line, log to ``<run dir>/cli.log`` until the run ends. Writes in rank 0 only."""
    if not is_global_zero():
        yield
        return
    if overwrite and not resume:
        clear_earlier_run(output_dir, cfg)
    if resume:  # a checkpoint moved aside by a process killed while putting a new one in its place
        for aside in output_dir.glob("*/checkpoints/.*.ckpt.replaced"):
            restore_replaced(aside.with_name(aside.name[1:].removesuffix(".replaced")))
    record_settings(cfg, output_dir, resume)
    handler = None
    if hydra_config() is not None:
        handler = logging.FileHandler(output_dir / "cli.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
