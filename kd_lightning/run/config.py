"""What Hydra needs beyond ``conf/``: where ``conf/`` is, typed schemas, and the model group.

- :func:`config_dir`: ``conf/`` inside the installed package, or at the top of a checkout.
- Typed schemas: a group's YAML names its schema first in its defaults list; Hydra then
  rejects a wrong type or an unknown key at composition time, before anything is built
  (value ranges are checked where the values enter: :class:`~kd_lightning.loss.mix.LossMix`,
  :class:`~kd_lightning.teacher.format.RecordingSettings`).
- One model group for teacher and student: every ``conf/model/NAME.yaml`` and every model of
  the CIFAR zoo (``kd_lightning.models.cifar.MODELS``) is an option of both the ``teacher``
  and the ``student`` group, so ``teacher=resnet56 student=resnet20`` works and adding a model
  to the zoo is one edit.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra._internal.utils import _locate
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import KDError

MODEL_ROLES = ("teacher", "student")
RENAMED = {"distill.chunk_rows": "speed.chunk_rows"}  # {old name: new name}: refused with the new name, never read


def config_dir() -> str:
    """``conf/`` inside the installed package, or at the top of a source checkout."""
    package = Path(__file__).resolve().parents[1]
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
    on_policy: Dict[str, Any] = field(default_factory=dict)  # where completions come from (kd_lightning/sequences.py)
    on_policy_stages: Dict[str, Any] = field(default_factory=dict)  # more distilled stages, each its own on_policy


def model_configs() -> dict[str, Any]:
    """``{name: model config}``: the files of ``conf/model/`` and the CIFAR zoo."""
    from kd_lightning.models.cifar import MODELS

    configs: dict[str, Any] = {
        name: {
            "_target_": "kd_lightning.models.cifar.build_cifar_model",
            "name": name,
            "num_classes": "${data.num_classes}",
        }
        for name in MODELS
    }
    for path in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        configs[path.stem] = OmegaConf.load(path)
    return configs


def target_signature(node: Any) -> tuple[set[str], bool]:
    """``(argument names, whether it also takes any other keyword)`` of the ``_target_`` of ``node`` (``(set(), True)``
    when there is none or it cannot be imported)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        found = _locate(target) if isinstance(target, str) else None
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is None:
        return set(), True
    names: set[str] = set()
    for function in (
        [klass.__init__ for klass in found.__mro__ if "__init__" in vars(klass)] if inspect.isclass(found) else [found]
    ):
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return names, True
        names |= {
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names, False
    return names, True


def check_arguments(where: str, node: Any) -> None:
    """Refuse a setting of ``node`` (at ``where``) that what it builds takes no argument for, before anything is built."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    names, open_ended = target_signature(node)
    unknown = sorted(set(node) - names - {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
    if unknown and not open_ended:
        raise unknown_setting(f"{where}.{unknown[0]}", node=node)


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse settings added with ``+`` where nothing reads them: in the nodes the library reads whole
    (:func:`closed_settings`), and in those that build an object (``data``, the models, ``trainer``, ``logger``,
    ``callbacks``) a setting the object takes no argument for (unless it takes any keyword).

    ``distill.loss`` passes its keys to the objective (checked when it is built), ``distill.extra_terms/weights/
    schedules`` name terms (checked by :class:`~kd_lightning.loss.mix.LossMix`); the optimizer and scheduler are also
    tried on a placeholder (:func:`~kd_lightning.run.settings.optimization`).
    """
    for where, allowed in closed_settings().items():
        node = OmegaConf.select(cfg, where) if where else cfg
        unknown = sorted(set(node) - allowed) if isinstance(node, DictConfig) else []
        if unknown:
            raise unknown_setting(f"{where}.{unknown[0]}" if where else unknown[0], allowed)
    callbacks = cfg.get("callbacks") or {}
    for where in (
        "data",
        "student.model",
        "teacher.model",
        "trainer",
        "logger",
        *(f"callbacks.{name}" for name in callbacks),
        *(f"{optim}.{part}" for optim in ("optim", "teacher.fit") for part in ("optimizer", "scheduler")),
    ):
        check_arguments(where, OmegaConf.select(cfg, where))


def closed_settings() -> dict[str, set[str]]:
    """``{where: the settings there}`` for the nodes whose keys are all read by the library (no free keys)."""
    conf = Path(config_dir())
    run, teacher = OmegaConf.load(conf / "train.yaml"), OmegaConf.load(conf / "teacher.yaml")
    groups = {
        name
        for entry in run.defaults
        for name in ([entry] if isinstance(entry, str) else entry)
        if not name.startswith("override ")
    } - {"_self_"}
    return {
        "": set(run) - {"defaults", "hydra"} | groups,
        "distill": {f.name for f in fields(DistillSchema)},
        "teacher": set(teacher) | {"model"},
        "teacher.fit": set(teacher.fit),
        "teacher.recording": set(teacher.recording),
        "speed": set(run.speed),
    }


def unknown_setting(key: str, allowed: set[str] | None = None, node: Any = None) -> KDError:
    """The one line for a setting nothing reads, with the known names closest to it: those of a closed node
    (:func:`closed_settings`), else those of ``node`` (the config node it was added to) and the arguments its
    ``_target_`` takes (default: the node of the default config); an argument the target takes that the config does not
    list is to be added with ``+``."""
    if key in RENAMED:
        return KDError(f"{key} was renamed to {RENAMED[key]}; set {RENAMED[key]}=... instead.")
    where, _, name = key.rpartition(".")
    closed = allowed if allowed is not None else closed_settings().get(where)
    if closed is None and node is None:
        node = composed_node(where, [])  # the default config's node there
    listed = set(node) - {"_target_", "_partial_", "defaults"} if isinstance(node, DictConfig) else set()
    arguments = target_signature(node)[0]
    if closed is None and name in arguments - listed:
        return KDError(
            f"{key} is an argument of {node._target_.rpartition('.')[2]} that the config does not list: add it "
            f"with +{key}=VALUE."
        )
    known = closed if closed is not None else listed | arguments
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(name, sorted(known - {name}), n=2, cutoff=0.75)
    hint = f"did you mean {' or '.join(prefix + c for c in close)}? Otherwise remove it" if close else "remove it"
    listing = f" (the settings here are {', '.join(sorted(closed))})" if closed else ""
    built = f" ({node._target_.rpartition('.')[2]} takes no argument {name})" if closed is None and arguments else ""
    return KDError(f"unknown setting {key}: nothing reads it{built}; {hint}{listing}.")


def composed_node(where: str, overrides: list[str]) -> Any:
    """The node at ``where`` of the run's config composed from ``overrides`` (``None`` if it cannot be composed):
    what an override Hydra refused was meant to change."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return OmegaConf.select(compose("train", overrides=overrides), where)
    except Exception:  # noqa: BLE001 -- only suggestions are lost
        return None
    finally:
        GlobalHydra.instance().clear()


def unknown_override(arguments: list[str]) -> KDError | None:
    """Our unknown-setting line for the first plain override (``key=value``, without ``+``) of a setting the config
    lacks, which Hydra refuses to compose; ``None`` when each names a setting (or the overrides do not compose for
    another reason). The config is composed from the overrides that choose groups or add settings, and each plain
    override's key looked up in it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in arguments if not a.startswith("-")])
    except HydraException:
        return None
    groups = closed_settings()[""] - set(OmegaConf.load(Path(config_dir()) / "train.yaml"))

    def sets_a_value(override: Any) -> bool:
        key = override.key_or_group
        return (
            override.type == OverrideType.CHANGE
            and override.package is None
            and "/" not in key
            and key not in groups
            and not key.startswith("hydra.")
        )

    composed = composed_node("", [o.input_line for o in overrides if not sets_a_value(o)])
    if not isinstance(composed, DictConfig):
        return None
    for override in filter(sets_a_value, overrides):
        key = override.key_or_group
        where, _, name = key.rpartition(".")
        node = OmegaConf.select(composed, where) if where else composed
        if not isinstance(node, DictConfig) or name not in node:
            return unknown_setting(key, node=node if isinstance(node, DictConfig) else None)
    return None


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="distill", name="schema", node=DistillSchema)
    for name, model in model_configs().items():
        for role in MODEL_ROLES:
            store.store(group=role, name=name, node={"model": model})
