"""A run's settings: the config read once, here, into typed parts and built objects; every value checked as it is read.

:func:`~kd_lightning.run.train.train` calls :meth:`Settings.from_config` first and hands its parts down; nothing below
this module reads the config:

- ``run`` (:class:`RunSettings`): seed, resume and overwrite, the baseline stage, where outputs and caches go,
  the trainer, callbacks and logger of a stage, the optimizer;
- ``teacher`` (:class:`TeacherSettings`): the network and where its weights come from (a checkpoint, trained once,
  recorded);
- ``loss_mix`` (:class:`~kd_lightning.loss.mix.LossMix`): ``distill``, the loss terms, weights and schedules;
- ``on_policy`` (:class:`~kd_lightning.sequences.OnPolicy`): ``distill.on_policy``, where completions come from;
- ``speed`` (:class:`~kd_lightning.speed.SpeedSettings`): how the networks run, not what they compute;
- ``data`` and ``student``: :class:`Factory` objects.

What is built once is built here (the objectives, the optimizer and scheduler factories). What each stage needs afresh
(a network, a Trainer, its callbacks and logger, the data module) is a :class:`Factory`: called, it builds its object.
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_lightning import __version__
from kd_lightning.checkpoints import existing_checkpoint
from kd_lightning.errors import KDError, is_integer
from kd_lightning.loss.features import check_live_teacher
from kd_lightning.loss.mix import LossMix
from kd_lightning.loss.objectives import Objective, forward_kl, sampled_kl, unwrap
from kd_lightning.models.pretrained import check_pretrained, is_pretrained, pretrained_tokenizer
from kd_lightning.run import run_dir
from kd_lightning.run.config import check_known_keys
from kd_lightning.sequences import OnPolicy
from kd_lightning.speed import SpeedSettings
from kd_lightning.teacher.format import RecordingSettings

log = logging.getLogger(__name__)

TEACHER_MODES = ("live", "recorded")
# Trainer settings that do not change what a trained teacher is; all others (fast_dev_run,
# limit_train_batches, precision, devices, ...) are part of the trained-teacher key.
DISPLAY_ONLY_TRAINER_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir"}


def plain(node: Any) -> Any:
    """A config node as plain Python values (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class Factory:
    """What a config node builds, built afresh at each call (a network, a Trainer, a logger per stage). The node stays
    here; what it says is read as plain values (:attr:`settings`), and what it builds receives plain values too
    (``_convert_="all"``: dicts and lists, never a config node)."""

    def __init__(self, node: DictConfig) -> None:
        self._node = node
        self.settings: dict[str, Any] = plain(node)

    @property
    def target(self) -> str:
        """The class or function it builds (``_target_``)."""
        return str(self.settings.get("_target_", ""))

    def __call__(self, **arguments: Any) -> Any:
        """The object, built by ``hydra.utils.instantiate``; a :class:`KDError` raised while building stays itself
        (Hydra wraps it in an ``InstantiationException`` with a traceback's worth of context)."""
        try:
            return instantiate(self._node, _convert_="all", **arguments)
        except InstantiationException as error:
            raise kd_error_within(error) or error from None


def kd_error_within(error: BaseException) -> KDError | None:
    """The :class:`KDError` that caused ``error``, if one did."""
    cause = error.__cause__
    while cause is not None and not isinstance(cause, KDError):
        cause = cause.__cause__
    return cause


def build(node: DictConfig, **arguments: Any) -> Any:
    """What ``node`` builds, once (an objective, an optimizer factory): :class:`Factory`'s object."""
    return Factory(node)(**arguments)


@dataclass(frozen=True)
class Optimization:
    """``optim`` (or ``teacher.fit``): the optimizer and scheduler, built once as factories (``_partial_: true``)."""

    optimizer: Callable[..., torch.optim.Optimizer]  # called with the parameters
    scheduler: Callable[..., Any] | None  # called with the optimizer
    optimizer_settings: dict[str, Any]  # what optim.optimizer says (its _target_, lr, ...)
    max_epochs: int | None = None  # teacher.fit: the teacher stage's epochs


def lightning_precisions() -> set[str]:
    """The ``trainer.precision`` values Lightning accepts (``32-true``, ``bf16-mixed``, ``16``, ...)."""
    from lightning.fabric import connector

    return {
        str(value)
        for name in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT")
        for value in typing.get_args(getattr(connector, name, None))
    }


def is_fsdp(trainer: DictConfig) -> bool:
    """Whether ``trainer`` shards with Lightning's ``ModelParallelStrategy`` (``trainer=fsdp``)."""
    strategy = trainer.get("strategy")
    return isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith(
        ("ModelParallelStrategy", "ShardedStrategy")
    )


def check_trainer(trainer: DictConfig) -> None:
    """``trainer``: a precision Lightning knows; on a CPU, no more processes than the machine has cores."""
    precision, known = trainer.get("precision", "32-true"), lightning_precisions()
    if known and str(precision) not in known:
        raise KDError(
            f"trainer.precision must be one of {', '.join(sorted(known))}, got {precision!r}; 32-true on a CPU, "
            "bf16-mixed on recent GPUs."
        )
    devices, accelerator = trainer.get("devices", 1), trainer.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if on_cpu and is_integer(devices) and devices > cores:
        raise KDError(
            f"trainer.devices={devices} starts {devices} CPU processes but this machine has {cores} cores; set "
            f"trainer.devices={cores} or fewer."
        )
    strategy = trainer.get("strategy")
    if is_fsdp(trainer):
        if strategy._target_ != "kd_lightning.sharding.ShardedStrategy":
            raise KDError(
                f"trainer.strategy._target_={strategy._target_}: kd_lightning shards through "
                "kd_lightning.sharding.ShardedStrategy (trainer=fsdp), Lightning's ModelParallelStrategy with "
                "checkpoints that leave the frozen teacher out; use trainer=fsdp, or set that _target_."
            )
        nodes = trainer.get("num_nodes", 1)
        if not is_integer(devices):
            raise KDError(f"trainer=fsdp needs trainer.devices as a number of devices per node, got {devices!r}.")
        shards, tensor = strategy.get("data_parallel_size"), strategy.get("tensor_parallel_size", 1)
        if tensor != 1:
            raise KDError(
                f"trainer.strategy.tensor_parallel_size={tensor}: kd_lightning shards by data parallelism only; "
                "set it to 1."
            )
        if shards != devices * nodes:
            raise KDError(
                f"trainer.strategy.data_parallel_size={shards}, but the run has {devices * nodes} processes "
                f"(trainer.devices={devices} x trainer.num_nodes={nodes}); set "
                f"trainer.strategy.data_parallel_size={devices * nodes}."
            )


def optimization(key: str, optim: DictConfig, max_epochs: int | None = None) -> Optimization:
    """``<key>.optimizer`` (and its scheduler) built once and tried on a placeholder parameter, so that a learning rate
    of NaN or below 0, a misspelt argument or a bad schedule is refused now, in one line, not in a stage's set-up."""

    def refused(what: str, error: Exception) -> KDError:
        return KDError(f"{key}.{what} is set wrong: {' '.join(str(error).split())}")

    optimizer = build(optim.optimizer)  # its arguments' names were checked with the config's (check_known_keys)
    scheduler = build(optim.scheduler) if optim.get("scheduler") else None
    try:
        placeholder = optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as error:
        raise refused("optimizer", error) from None
    try:
        if scheduler is not None:
            scheduler(placeholder)
    except (TypeError, ValueError) as error:
        raise refused("scheduler", error) from None
    return Optimization(optimizer, scheduler, plain(optim.optimizer), max_epochs)


def check_epochs(key: str, epochs: Any, max_steps: int) -> None:
    """A stage trains for a positive number of epochs (``None``: Lightning's default; -1 only with ``max_steps``)."""
    if epochs is None or (epochs == -1 and max_steps > 0):
        return
    if not is_integer(epochs) or epochs < 1:
        raise KDError(
            f"{key} must be a positive integer, got {epochs!r}"
            + (" (-1 trains forever unless trainer.max_steps is set)" if epochs == -1 else "")
            + f"; set e.g. {key}=30."
        )


@dataclass(frozen=True)
class RunSettings:
    """The run as a whole: what every stage shares."""

    seed: int
    output_dir: Path
    cache_dir: Path
    resume: bool  # ckpt_path=last: each stage continues from its last.ckpt
    overwrite: bool  # replace an earlier run's outputs in output_dir
    baseline: bool  # also train the student alone
    num_classes: int
    trainer: Factory  # a Trainer per stage
    optim: Optimization
    callbacks: dict[str, Factory]
    logger: Factory | None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        """An integer seed; ``ckpt_path`` null or ``last``; stages that train for a positive number of epochs or
        steps. (The run directory is checked last, by :meth:`Settings.from_config`.)"""
        if not is_integer(cfg.seed):
            raise KDError(f"seed must be an integer, got {cfg.seed!r}; set e.g. seed=0.")
        if cfg.get("ckpt_path") not in (None, "last"):
            raise KDError(
                f"ckpt_path must be null or 'last', got {cfg.ckpt_path!r}: 'last' resumes every stage of the "
                "run in hydra.run.dir from <stage>/checkpoints/last.ckpt."
            )
        output_dir, overwrite, resume = (
            Path(cfg.paths.output_dir),
            bool(cfg.get("overwrite", False)),
            cfg.get("ckpt_path") == "last",
        )
        max_steps = cfg.trainer.get("max_steps", -1)
        if not is_integer(max_steps) or max_steps == 0 or max_steps < -1:
            raise KDError(f"trainer.max_steps must be -1 (no limit) or a positive integer, got {max_steps!r}.")
        check_epochs("trainer.max_epochs", cfg.trainer.get("max_epochs"), max_steps)
        check_trainer(cfg.trainer)
        optim = optimization("optim", cfg.optim)
        return cls(
            seed=cfg.seed,
            output_dir=output_dir,
            cache_dir=Path(cfg.paths.cache_dir),
            resume=resume,
            overwrite=overwrite,
            baseline=bool(cfg.get("baseline", False)),
            num_classes=cfg.data.num_classes,
            trainer=Factory(cfg.trainer),
            optim=optim,
            callbacks={name: Factory(node) for name, node in (cfg.get("callbacks") or {}).items() if node is not None},
            logger=Factory(cfg.logger) if cfg.get("logger") else None,
        )

    @property
    def max_steps(self) -> int:
        return self.trainer.settings.get("max_steps", -1)

    @property
    def precision(self) -> str:
        return str(self.trainer.settings.get("precision", "32-true"))

    @property
    def accelerator(self) -> str:
        return str(self.trainer.settings.get("accelerator", "auto"))

    @property
    def progress_bar(self) -> bool:
        return bool(self.trainer.settings.get("enable_progress_bar", True))


@dataclass(frozen=True)
class TeacherSettings:
    """``teacher``: the network, and where its weights and logits come from (``conf/teacher.yaml``)."""

    model: Factory
    fit: Optimization  # the teacher stage's epochs, optimizer and scheduler
    mode: str
    checkpoint: Path | None
    recording: RecordingSettings | None  # recorded mode only
    cache_identity: dict[str, Any]  # what a teacher trained here depends on: the key of the trained-teacher cache
    pretrained: bool = False  # read with from_pretrained (teacher=hf)
    shard: bool = True  # trainer=fsdp: shard a live teacher across the ranks (false: a whole copy on each)
    fine_tune: bool = False  # teacher.fit.pretrained: fine-tune a pretrained teacher in the teacher stage

    @property
    def trains(self) -> bool:
        """Whether the run trains the teacher (the teacher stage): neither a checkpoint nor a pretrained model used as
        it is (``teacher.fit.pretrained=true`` fine-tunes a pretrained one)."""
        return self.checkpoint is None and (not self.pretrained or self.fine_tune)

    @property
    def trained_here(self) -> bool:
        """Trained from scratch by this run on its data: for tokens, its rows beyond the tokenizer are padding by construction."""
        return self.checkpoint is None and not self.pretrained

    @classmethod
    def from_config(cls, cfg: DictConfig, loss_mix: LossMix, max_steps: int) -> TeacherSettings:
        """Every rule of ``teacher``: a known mode, an existing checkpoint file, a positive number of epochs, and in
        recorded mode recording settings that fit the data and the loss (no feature terms; draws: forward KL only)."""
        teacher = cfg.teacher
        mode = teacher.get("mode", "live")
        if mode not in TEACHER_MODES:
            raise KDError(f"teacher.mode must be live or recorded, got {mode!r}.")
        check_epochs("teacher.fit.max_epochs", teacher.fit.max_epochs, max_steps)
        if not isinstance(teacher.fit.get("pretrained", False), bool):
            raise KDError(
                f"teacher.fit.pretrained must be true or false, got {teacher.fit.pretrained!r}: true fine-tunes a "
                "pretrained teacher (teacher=hf) on the run's data before distilling from it."
            )
        fit = optimization("teacher.fit", teacher.fit, teacher.fit.max_epochs)
        recording = None
        if mode == "recorded":
            check_live_teacher(loss_mix.features, live=False)
            recording = RecordingSettings(**plain(teacher.recording))
            recording.check_classes(cfg.data.num_classes)
            if recording.samples:
                check_forward_kl_only(loss_mix)
        trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in DISPLAY_ONLY_TRAINER_KEYS}
        data = {
            k: v for k, v in plain(cfg.data).items() if k != "labeled_fraction"
        }  # the teacher trains on every label
        identity = {
            "model": plain(teacher.model),
            "fit": plain(teacher.fit),
            "data": data,
            "trainer": trainer,
            "seed": cfg.seed,
            "kd_lightning": __version__,
        }  # a new release retrains
        if (cfg.get("speed") or {}).get("shard_dtype"):
            identity["shard_dtype"] = cfg.speed.shard_dtype  # the teacher stage computes in it
        checkpoint = existing_checkpoint(teacher.checkpoint) if teacher.get("checkpoint") else None
        if not isinstance(teacher.get("shard", True), bool):
            raise KDError(
                f"teacher.shard must be true or false, got {teacher.shard!r}: with trainer=fsdp, true shards the "
                "teacher across the processes, false keeps a whole copy on each."
            )
        return cls(
            model=Factory(teacher.model),
            fit=fit,
            mode=mode,
            checkpoint=checkpoint,
            recording=recording,
            cache_identity=identity,
            pretrained=is_pretrained(plain(teacher.model)),
            shard=teacher.get("shard", True),
            fine_tune=teacher.fit.get("pretrained", False),
        )

    @property
    def name(self) -> str:
        """The teacher model's name (zoo name, else class name), for cache file names."""
        return self.model.settings.get("name") or self.model.target.rsplit(".", 1)[-1]

    @property
    def path(self) -> str | None:
        """A pretrained teacher's folder or hub id (``teacher.model.path``)."""
        return self.model.settings.get("path")


def check_student_from_teacher(cfg: DictConfig, teacher: TeacherSettings) -> None:
    """``student=from_teacher`` takes its layers from a pretrained teacher (``teacher=hf``), the only teacher whose
    weights exist before the run."""
    if str(cfg.student.model.get("_target_", "")).endswith("student_from_teacher") and not teacher.pretrained:
        raise KDError(
            "student=from_teacher copies the layers of a pretrained teacher (teacher=hf teacher.model.path=...): a "
            "teacher trained or loaded in the run has no weights yet when the student is built."
        )


def check_forward_kl_only(loss_mix: LossMix) -> None:
    """Draws from the teacher's tail (``teacher.recording.tail=sampled``) stand in for it in forward KL only."""
    objectives = {"distill.loss": loss_mix.objective} | {
        f"distill.extra_terms.{name}.objective": objective for name, objective in loss_mix.extra_terms.items()
    }
    for where, objective in objectives.items():
        built_in = Objective.of(objective)
        if built_in is None or built_in.divergence is not forward_kl or built_in.standardize:
            function = unwrap(objective)
            what = (
                "standardized"
                if built_in is not None and built_in.divergence is forward_kl
                else f"{getattr(function, '__module__', '')}.{getattr(function, '__name__', type(function).__name__)}"
            )
            raise KDError(
                f"teacher.recording.tail=sampled stands in for the teacher in forward KL only (distill/loss=kd, "
                f"standardize=false), but {where} is {what}; use teacher.recording.tail=student."
            )


def on_policy_settings(distill: DictConfig, teacher: TeacherSettings, loss_mix: LossMix) -> OnPolicy:
    """``distill.on_policy``: sampled completions need a live teacher, which scores (or writes) them; the student's own
    samples are learned from the teacher's terms alone."""
    return checked_on_policy("distill.on_policy", plain(distill.get("on_policy")) or {}, teacher, loss_mix)


def on_policy_stages(
    distill: DictConfig, main: OnPolicy, teacher: TeacherSettings, loss_mix: LossMix
) -> dict[str, OnPolicy]:
    """``distill.on_policy_stages``: ``{stage: {setting: value}}``, the same student distilled again in a stage of its
    own with these ``distill.on_policy`` settings changed (e.g. ``{off_policy: {fraction: 0}}``)."""
    stages = plain(distill.get("on_policy_stages")) or {}
    if not isinstance(stages, dict):
        raise KDError(
            f"distill.on_policy_stages must map stage names to distill.on_policy settings, e.g. "
            f"{{off_policy: {{fraction: 0.0}}}}; got {stages!r}."
        )
    checked = {}
    for name, changes in stages.items():
        if not (isinstance(name, str) and name.isidentifier()) or name in run_dir.STAGES:
            raise KDError(
                f"distill.on_policy_stages: {name!r} cannot name a stage (a word, not one of "
                f"{', '.join(run_dir.STAGES)})."
            )
        if not isinstance(changes, dict):
            raise KDError(
                f"distill.on_policy_stages.{name} must be distill.on_policy settings, e.g. {{fraction: 0.0}}; "
                f"got {changes!r}."
            )
        checked[name] = checked_on_policy(f"distill.on_policy_stages.{name}", asdict(main) | changes, teacher, loss_mix)
    return checked


def checked_on_policy(where: str, given: dict[str, Any], teacher: TeacherSettings, loss_mix: LossMix) -> OnPolicy:
    known = [f.name for f in fields(OnPolicy)]
    for key in given:
        if key not in known:
            raise KDError(f"{where} has no setting {key!r}; its settings are {', '.join(known)}.")
    on_policy = OnPolicy(**given)
    check_own_samples(where, on_policy, loss_mix)
    if on_policy.samples and teacher.mode != "live":
        raise KDError(
            "distill.on_policy samples completions that no recording holds (it was made before they existed); "
            "use teacher.mode=live, or set distill.on_policy.fraction=0 and teacher_fraction=0."
        )
    if on_policy.fraction > 0 and loss_mix.is_active("ce"):
        raise KDError(
            "distill.on_policy.fraction > 0 trains on the student's own samples, whose labels are the tokens it "
            "drew: cross-entropy on them would teach it to repeat itself. Set distill.alpha=1 (the teacher's "
            "terms alone, as in GKD), or +distill.weights.ce=0."
        )
    return on_policy


def check_own_samples(where: str, on_policy: OnPolicy, loss_mix: LossMix) -> None:
    """``distill/loss=sampled_kl`` estimates reverse KL from tokens the student drew from ``p_s`` itself: every batch
    sampled by the student from the first step, at the loss's temperature, without greedy, top-k or top-p."""
    if not any(o is not None and o.divergence is sampled_kl for o in loss_mix.built_in.values()):
        return
    own = (
        on_policy.fraction == 1
        and on_policy.after_steps == 0
        and not on_policy.greedy
        and on_policy.top_k is None
        and on_policy.top_p in (None, 1)
        and on_policy.temperature == loss_mix.temperature
    )
    if not own:
        raise KDError(
            f"distill/loss=sampled_kl estimates reverse KL from tokens the student drew from its own distribution, "
            f"but {where} is {asdict(on_policy)}; set {where}.fraction=1 (teacher_fraction=0, after_steps=0) and "
            f"temperature={loss_mix.temperature} (distill.temperature), without greedy, top_k or top_p."
        )


def build_loss_mix(distill: DictConfig) -> LossMix:
    """The distilled stage's :class:`LossMix` from ``distill`` (every setting checked where the mix is built)."""
    extra_terms = {
        name: {**plain(term), "objective": build(term.objective)} if term.get("objective") else plain(term)
        for name, term in (distill.get("extra_terms") or {}).items()
    }
    return LossMix(
        objective=build(distill.loss) if distill.get("loss") else None,
        temperature=distill.temperature,
        alpha=distill.alpha,
        extra_terms=extra_terms,
        features=plain(distill.get("features")),
        weights=plain(distill.get("weights")),
        schedules=plain(distill.get("schedules")),
    )


def fill_vocab_size(cfg: DictConfig) -> None:
    """``data.vocab_size`` left null beside a ``data.tokenizer`` (chat data from a pretrained teacher's folder) is set,
    in ``cfg``, to the tokenizer's number of tokens, so that the models, the run's record and a resume all see it."""
    data = cfg.data
    if "vocab_size" not in data or data.vocab_size is not None or not data.get("tokenizer"):
        return
    tokenizer = pretrained_tokenizer(str(data.tokenizer))
    data.vocab_size = len(tokenizer)
    log.info(
        "data.vocab_size: %d, the number of tokens of the tokenizer %s (set data.vocab_size to fix it)",
        len(tokenizer),
        data.tokenizer,
    )


def check_generate_per_step(trainer: DictConfig, on_policy: OnPolicy, stages: dict[str, OnPolicy]) -> None:
    """``speed.generate_per_step`` samples the completions of an optimizer step's micro-batches together: it needs
    sampled completions and more than one micro-batch per step."""
    if not any(settings.samples for settings in (on_policy, *stages.values())):
        raise KDError(
            "speed.generate_per_step=true samples each optimizer step's completions in one call, but nothing is "
            "sampled: set distill.on_policy.fraction (or teacher_fraction) above 0, or unset it."
        )
    micro_batches = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(micro_batches, int) or micro_batches < 2:
        raise KDError(
            f"speed.generate_per_step=true samples the micro-batches of an optimizer step together, but "
            f"trainer.accumulate_grad_batches={micro_batches!r} makes each step one batch: raise it (e.g. "
            "trainer.accumulate_grad_batches=4 with a quarter of data.batch_size), or unset speed.generate_per_step."
        )


def speed_settings(cfg: DictConfig) -> SpeedSettings:
    """``speed``: how the networks run, not what they compute."""
    return SpeedSettings(**(plain(cfg.get("speed")) or {}))


@dataclass(frozen=True)
class Settings:
    """A run's settings, parsed once (:meth:`from_config`)."""

    run: RunSettings
    teacher: TeacherSettings
    loss_mix: LossMix
    on_policy: OnPolicy
    on_policy_stages: dict[str, OnPolicy]  # more distilled stages, each with its own distill.on_policy
    speed: SpeedSettings
    data: Factory  # the data module, built once by train()
    student: Factory  # the student network, built afresh in each stage

    @property
    def samples(self) -> bool:
        """Whether some stage trains on sampled completions."""
        return any(on_policy.samples for on_policy in (self.on_policy, *self.on_policy_stages.values()))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Parse and check every setting of ``cfg``, before anything is built or trained (``data.vocab_size`` left
        null is filled in from ``data.tokenizer``: :func:`fill_vocab_size`)."""
        if str(cfg.teacher.model.get("_target_", "")).endswith("student_from_teacher"):
            raise KDError(
                "teacher=from_teacher names a student made from the teacher; choose the teacher itself (e.g. teacher=hf)."
            )
        check_known_keys(cfg)
        check_pretrained("teacher.model", plain(cfg.teacher.model))
        check_pretrained("student.model", plain(cfg.student.model))
        fill_vocab_size(cfg)
        run = RunSettings.from_config(cfg)
        speed = speed_settings(cfg)
        if speed.shard_dtype is not None and not is_fsdp(cfg.trainer):
            raise KDError(
                f"speed.shard_dtype={speed.shard_dtype} is FSDP's mixed precision, for trainer=fsdp; unset it, or "
                "use trainer.precision=bf16-mixed."
            )
        if speed.generate_whole and not is_fsdp(cfg.trainer):
            raise KDError(
                "speed.generate_whole=true generates through a whole copy of a sharded student, for trainer=fsdp; "
                "unset it (without sharding the student is whole already)."
            )
        loss_mix = build_loss_mix(cfg.distill)
        teacher = TeacherSettings.from_config(cfg, loss_mix, run.max_steps)
        on_policy = on_policy_settings(cfg.distill, teacher, loss_mix)
        stages = on_policy_stages(cfg.distill, on_policy, teacher, loss_mix)
        check_student_from_teacher(cfg, teacher)
        if speed.generate_per_step:
            check_generate_per_step(cfg.trainer, on_policy, stages)
        settings = cls(
            run=run,
            teacher=teacher,
            loss_mix=loss_mix,
            on_policy=on_policy,
            on_policy_stages=stages,
            speed=speed,
            data=Factory(cfg.data),
            student=Factory(cfg.student.model),
        )
        run_dir.check(cfg, run.output_dir, resume=run.resume, overwrite=run.overwrite)
        return settings
