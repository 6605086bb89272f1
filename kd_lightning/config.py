"""What Hydra needs beyond ``conf/``: where ``conf/`` is, typed schemas, and the model group.

- :func:`config_dir`: ``conf/`` inside the installed package, or at the top of a checkout.
- Typed schemas: a group's YAML names its schema first in its defaults list; Hydra then
  rejects a wrong type or an unknown key at composition time, before anything is built
  (value ranges are checked where the values enter: :class:`~kd_lightning.loss_mix.LossMix`,
  :class:`~kd_lightning.recording.RecordingSettings`).
- One model group for teacher and student: every ``conf/model/NAME.yaml`` and every model of
  the CIFAR zoo (``kd_lightning.models.cifar.MODELS``) is an option of both the ``teacher``
  and the ``student`` group, so ``teacher=resnet56 student=resnet20`` works and adding a model
  to the zoo is one edit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import KDError

MODEL_ROLES = ("teacher", "student")


def config_dir() -> str:
    """``conf/`` inside the installed package, or at the top of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kd_lightning's conf/ was found neither in {package} nor in {package.parent}.")


@dataclass
class DistillSchema:
    """``distill/``: ``loss = (1 − alpha)·CE + alpha·objective(T)`` + extra and feature terms."""

    temperature: float = 4.0
    alpha: Optional[float] = 0.9  # null when ce and the objective have their own weights (distill/loss=dkd)
    loss: Any = None  # the logit objective (distill/loss group): a _target_ with _partial_: true
    extra_terms: Dict[str, Any] = field(default_factory=dict)
    features: List[Any] = field(default_factory=list)
    weights: Dict[str, float] = field(default_factory=dict)
    schedules: Dict[str, Any] = field(default_factory=dict)
    chunk_rows: Optional[int] = None  # moved to speed.chunk_rows; still read, with a one-line hint


def model_configs() -> dict[str, Any]:
    """``{name: model config}``: the files of ``conf/model/`` and the CIFAR zoo."""
    from kd_lightning.models.cifar import MODELS

    configs: dict[str, Any] = {name: {"_target_": "kd_lightning.models.cifar.build_cifar_model", "name": name,
                                      "num_classes": "${data.num_classes}"} for name in MODELS}
    for path in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        configs[path.stem] = OmegaConf.load(path)
    return configs


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, except that a :class:`KDError` raised while building stays itself
    (Hydra wraps it in an ``InstantiationException`` with a traceback's worth of context)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, KDError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse settings added with ``+`` where nothing reads them: at the top level and in ``teacher``.

    The other groups take free keys on purpose: ``data``, ``teacher.model``/``student.model``,
    ``optim``, ``trainer``, ``callbacks`` and ``logger`` pass them to the object they build,
    ``distill.loss`` to the objective, ``distill.extra_terms/weights/schedules`` name terms.
    """
    for where, allowed in closed_settings().items():
        node = OmegaConf.select(cfg, where) if where else cfg
        unknown = sorted(set(node) - allowed) if isinstance(node, DictConfig) else []
        if unknown:
            raise unknown_setting(f"{where}.{unknown[0]}" if where else unknown[0], allowed)


def closed_settings() -> dict[str, set[str]]:
    """``{where: the settings there}`` for the nodes whose keys are all read by the library (no free keys)."""
    conf = Path(config_dir())
    run, teacher = OmegaConf.load(conf / "train.yaml"), OmegaConf.load(conf / "teacher.yaml")
    groups = {name for entry in run.defaults for name in ([entry] if isinstance(entry, str) else entry)} - {"_self_"}
    return {"": set(run) - {"defaults"} | groups, "distill": {f.name for f in fields(DistillSchema)},
            "teacher": set(teacher) | {"model"}, "teacher.fit": set(teacher.fit), "teacher.recording": set(teacher.recording),
            "speed": set(run.speed)}


def unknown_setting(key: str, allowed: set[str] | None = None) -> KDError:
    """The one line for a setting nothing reads, with the known names closest to it (``trainer``'s from its defaults)."""
    where, _, name = key.rpartition(".")
    closed = allowed if allowed is not None else closed_settings().get(where)
    known = closed
    if known is None and where == "trainer":
        known = set(OmegaConf.load(Path(config_dir()) / "trainer" / "default.yaml")) - {"_target_", "defaults"}
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(name, sorted(known or ()), n=2, cutoff=0.75)
    hint = f"did you mean {' or '.join(prefix + c for c in close)}? Otherwise remove it" if close else "remove it"
    listing = f" (the settings here are {', '.join(sorted(closed))})" if closed else ""
    return KDError(f"unknown setting {key}: nothing reads it; {hint}{listing}.")


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="distill", name="schema", node=DistillSchema)
    for name, model in model_configs().items():
        for role in MODEL_ROLES:
            store.store(group=role, name=name, node={"model": model})
