"""DistillationModule: a frozen teacher, a trainable student, and the KD objective."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd_lightning.errors import KDError
from kd_lightning.features import FeatureDistiller, FeatureTerm
from kd_lightning.losses import kd_loss, objective_name
from kd_lightning.schedules import Schedule, build_schedules
from kd_lightning.teacher_cache import TeacherOutputs

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Objective = Callable[..., Tensor]  # (student_logits, teacher_logits, *, temperature, labels) -> scalar


def check_temperature_and_alpha(temperature: float, alpha: float) -> None:
    """Raise :class:`KDError` unless ``temperature > 0`` and ``0 <= alpha <= 1``."""
    if not temperature > 0:
        raise KDError(
            f"distill.temperature must be > 0, got {temperature}. The usual values are 1-8 "
            "(4 in the CIFAR recipe); set e.g. distill.temperature=4."
        )
    if not 0 <= alpha <= 1:
        raise KDError(
            f"distill.alpha must be in [0, 1], got {alpha}: loss = (1 - alpha) * CE + alpha * KD, "
            "so alpha=0 is plain training and alpha=1 pure distillation; set e.g. distill.alpha=0.9."
        )


def check_same_classes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise :class:`KDError` if teacher and student predict different numbers of classes."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KDError(
            f"teacher and student predict different numbers of classes: teacher "
            f"{teacher_logits.shape[-1]}, student {student_logits.shape[-1]}. Build both for the "
            "data's classes (e.g. teacher.model.num_classes=${data.num_classes})."
        )


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(t) ‖ softmax(s))`` at T=1 for each row: ``(N, C)`` -> ``(N,)``."""
    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)


class DistillationModule(L.LightningModule):
    """Trains ``student`` to match a frozen ``teacher``: ``(1 − alpha)·CE + alpha·KD`` (+ more terms).

    The teacher has ``requires_grad=False``, stays in eval mode whatever ``.train()`` is
    called, runs under ``torch.no_grad()``, never reaches the optimizer and is left out of
    checkpoints, so ``DistillationModule.load_from_checkpoint(path, student=net)`` needs
    no teacher. With ``teacher=None`` the module trains the student alone (``alpha`` must
    then be 0): this is how the teacher itself and the no-KD baseline are trained.

    With ``teacher_outputs`` (a recorded cache, ``teacher.mode=cached``) instead of a
    ``teacher``, the teacher's logits are looked up by each batch's sample index (and view)
    rather than computed: no teacher is loaded at all.

    The loss is a weighted sum of named terms, each logged as ``train/<name>``: ``ce``
    (weight ``1 − alpha``), the logit objective (``kd`` by default, weight ``alpha``), any
    ``extra_terms`` and any ``features`` terms. ``schedules`` make ``temperature``, ``alpha``
    or a term's weight (by its name) follow a schedule, updated and logged every step.

    Batches are ``(x, y, ...)``. Subclass and override one hook to change one thing:
    :meth:`teacher_forward`, :meth:`student_forward`, :meth:`distillation_loss`,
    :meth:`task_loss` (and :meth:`loss_terms` to add terms).

    Args:
        student: trainable model, ``x -> (N, C)`` logits.
        teacher: frozen model with the same output, or ``None``.
        num_classes: ``C``, for the metrics.
        temperature: softmax temperature ``T > 0`` of the KD term.
        alpha: weight of the KD term in ``[0, 1]``.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); default SGD(lr=0.05, momentum 0.9).
        scheduler: ``optimizer -> LRScheduler`` or ``None``; stepped once per epoch.
        teacher_outputs: recorded teacher logits to use instead of ``teacher``.
        objective: the logit objective, ``f(student_logits, teacher_logits, temperature=T, labels=y)``
            (see :mod:`kd_lightning.losses`); default :func:`~kd_lightning.losses.kd_loss`.
            Its term is named after it (``kd_loss`` -> ``kd``).
        extra_terms: more logit objectives, ``{name: {"objective": f, "weight": w}}``.
        features: feature terms (:class:`~kd_lightning.features.FeatureTerm` or dicts such as
            ``{"student": "layer3", "teacher": "layer3", "loss": "fitnet", "weight": 100}``).
        weights: ``{term name: weight}`` replacing the defaults (``ce``: ``1 − alpha``, the
            objective: ``alpha``, extra and feature terms: their own ``weight``).
        schedules: ``{"temperature" | "alpha" | <term name>: Schedule or dict}``; a scheduled
            weight replaces the term's weight.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int = 10,
        temperature: float = 4.0,
        alpha: float = 0.9,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        teacher_outputs: TeacherOutputs | None = None,
        objective: Objective | None = None,
        extra_terms: dict[str, dict[str, Any]] | None = None,
        features: list[FeatureTerm | dict[str, Any]] | None = None,
        weights: dict[str, float] | None = None,
        schedules: dict[str, Schedule | dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        check_temperature_and_alpha(temperature, alpha)
        if teacher is not None and teacher_outputs is not None:
            raise KDError("pass either a live teacher or recorded teacher_outputs, not both.")
        for name, model in (("teacher", teacher), ("student", student)):
            declared = getattr(model, "num_classes", None)
            if declared is not None and declared != num_classes:
                raise KDError(
                    f"the {name} is built for {declared} classes but the data has {num_classes}; "
                    f"set {name}.model.num_classes={num_classes}."
                )
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer", "scheduler", "teacher_outputs", "objective",
                                          "extra_terms", "features", "weights", "schedules"])
        self.student = student
        self.teacher = teacher
        self.teacher_outputs = teacher_outputs  # a plain attribute: never in state_dict or checkpoints
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.temperature = temperature
        self.alpha = alpha
        self.objective = objective if objective is not None else kd_loss
        self.objective_name = objective_name(self.objective)
        self.extra_terms = {name: (float(spec.get("weight", 1.0)), spec["objective"]) for name, spec in (extra_terms or {}).items()}
        self.features = FeatureDistiller(features) if features else None  # a submodule: adapters train and checkpoint
        if self.features is not None and teacher_outputs is not None:
            raise KDError("feature distillation needs the live teacher's activations; set teacher.mode=live "
                          "(a cached teacher records logits only).")
        self.weights = {name: float(w) for name, w in (weights or {}).items()}
        self.schedules = build_schedules(schedules)
        self.scheduled: dict[str, float] = {}
        self._check_term_names()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.classes_checked = False
        # Checkpoints hold the student only; loading tolerates the absent teacher keys
        # (on_load_checkpoint still insists on every student key).
        self.strict_loading = False

        # one set of torchmetrics objects per stage, so validation never mixes into test
        self.metrics = nn.ModuleDict({stage: self._stage_metrics(num_classes, self.has_teacher) for stage in ("val", "test")})

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None or self.teacher_outputs is not None

    @property
    def distills(self) -> bool:
        """Whether training uses the teacher at all (any distillation term can be non-zero)."""
        if self.alpha > 0 or self.extra_terms or self.features is not None:
            return True
        return any(w != 0 for name, w in self.weights.items() if name != "ce") or bool(self.schedules.keys() - {"temperature", "ce"})

    def term_names(self) -> list[str]:
        names = ["ce", self.objective_name, *self.extra_terms]
        return names + ([t.name for t in self.features.terms] if self.features is not None else [])

    def _check_term_names(self) -> None:
        names = self.term_names()
        if len(set(names)) != len(names):
            raise KDError(f"two loss terms share a name ({names}); rename the extra or feature term.")
        unknown = self.schedules.keys() - {"temperature", "alpha", *names}
        if unknown:
            raise KDError(f"distill.schedules has {sorted(unknown)}, which is not a schedulable quantity; use "
                          f"temperature, alpha or a loss term's name: {names}.")
        unknown = self.weights.keys() - set(names)
        if unknown:
            raise KDError(f"distill.weights has {sorted(unknown)}, which is not a loss term; the terms are {names}.")

    def term_weight(self, name: str, default: float) -> float:
        """The weight of term ``name`` this step: its schedule's value, else ``weights[name]``, else ``default``."""
        return self.scheduled.get(name, self.weights.get(name, default))

    @staticmethod
    def _stage_metrics(num_classes: int, with_teacher: bool) -> nn.ModuleDict:
        """Accuracy and calibration of the student, plus fidelity to the teacher when there is one."""
        metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                   "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")}
        if with_teacher:
            metrics |= {"teacher_acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                        "teacher_ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
                        "agreement": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                        "kl_t1": MeanMetric()}
        return nn.ModuleDict(metrics)

    # -- hooks a subclass may override -------------------------------------------------

    def teacher_forward(self, batch: Any) -> Tensor:
        """Teacher logits ``(N, C)`` for ``batch``; eval mode, no graph.

        From a recording, the logits of samples ``batch[2]`` in view ``batch[3]`` (if present).
        """
        if self.teacher_outputs is not None:
            return self.teacher_outputs.lookup(self.current_split, batch[2], batch[3] if len(batch) > 3 else None)
        with torch.no_grad():
            return self.teacher(batch[0])

    def student_forward(self, batch: Any) -> Tensor:
        """Student logits ``(N, C)`` for ``batch``."""
        return self.student(batch[0])

    def task_loss(self, student_out: Tensor, batch: Any) -> Tensor:
        """Supervised loss on the labels ``batch[1]``: cross-entropy."""
        return F.cross_entropy(student_out.float(), batch[1])

    def distillation_loss(self, student_out: Tensor, teacher_out: Tensor, batch: Any) -> Tensor:
        """The logit objective at ``self.temperature`` (``T²``-scaled forward KL by default), batch mean."""
        return self.objective(student_out, teacher_out, temperature=self.temperature, labels=batch[1])

    def loss_terms(self, student_out: Tensor, teacher_out: Tensor | None, batch: Any) -> dict[str, Tensor]:
        """Named, already weighted loss terms; the total loss is their sum."""
        terms = {"ce": self.term_weight("ce", 1 - self.alpha) * self.task_loss(student_out, batch)}
        if teacher_out is None:
            return terms
        weight = self.term_weight(self.objective_name, self.alpha)
        if weight != 0 or self.objective_name in self.schedules:
            terms[self.objective_name] = weight * self.distillation_loss(student_out, teacher_out, batch)
        for name, (default, objective) in self.extra_terms.items():
            terms[name] = self.term_weight(name, default) * objective(student_out, teacher_out, temperature=self.temperature, labels=batch[1])
        if self.features is not None:
            for name, (default, loss) in self.features.terms_from_captured().items():
                terms[name] = self.term_weight(name, default) * loss
            self.features.clear()
        return terms

    # -- frozen teacher ----------------------------------------------------------------

    def train(self, mode: bool = True) -> DistillationModule:
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {f"student.{k}" for k in self.student.state_dict()}
        missing = sorted(expected - checkpoint["state_dict"].keys())
        if missing:
            raise KDError(
                f"the checkpoint lacks {len(missing)} student weights (first: {missing[:5]}); "
                "it was not saved from a DistillationModule with this student architecture."
            )

    # -- steps -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Feature distillation: hook the layers and size the adapters (before the optimizer is built)."""
        if self.features is None or self.teacher is None:
            return
        if not self.features.attached:
            self.features.attach(self.student, self.teacher)
        if stage == "fit":
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            if not hasattr(datamodule, "example_input"):
                raise KDError("feature distillation sizes its adapters from an example input: give the datamodule an "
                              "example_input() method, or call module.features.build_adapters(student, teacher, x) first.")
            self.features.build_adapters(self.student, self.teacher, datamodule.example_input())

    def teardown(self, stage: str) -> None:
        if self.features is not None:
            self.features.detach()

    def on_fit_start(self) -> None:
        if not self.has_teacher and self.distills:
            raise KDError(f"alpha={self.alpha} needs a teacher; pass teacher=... or set alpha=0 to train the student alone.")
        if self.features is not None and self.teacher is None:
            raise KDError("feature distillation needs a live teacher model; pass teacher=....")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Advance the schedules: temperature, alpha and term weights for this step."""
        if not self.schedules:
            return
        self.scheduled = {name: s.value(self.current_epoch, self.global_step) for name, s in self.schedules.items()}
        self.temperature = self.scheduled.get("temperature", self.temperature)
        self.alpha = self.scheduled.get("alpha", self.alpha)
        check_temperature_and_alpha(self.temperature, self.alpha)

    @property
    def current_split(self) -> str:
        """The data split being run: ``train``, ``val``, ``test`` (``train`` outside a Trainer)."""
        if self._trainer is None or self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"

    def _teacher_out(self, batch: Any, need: bool) -> Tensor | None:
        return self.teacher_forward(batch) if need and self.has_teacher else None

    def _check_classes_once(self, student_out: Tensor, teacher_out: Tensor | None) -> None:
        if self.classes_checked:
            return
        if teacher_out is not None:
            check_same_classes(student_out, teacher_out)
            if not torch.isfinite(teacher_out).all():
                raise KDError(
                    "the teacher's logits contain NaN or Inf; the teacher checkpoint is broken or "
                    "diverged. Retrain it or pass a different teacher.checkpoint."
                )
        if student_out.shape[-1] != self.hparams.num_classes:
            raise KDError(
                f"the student predicts {student_out.shape[-1]} classes but num_classes="
                f"{self.hparams.num_classes}; build it for the data's classes."
            )
        self.classes_checked = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.features is not None:
            self.features.capturing = True
        try:
            teacher_out = self._teacher_out(batch, need=self.distills)
            student_out = self.student_forward(batch)
        finally:
            if self.features is not None:
                self.features.capturing = False
        self._check_classes_once(student_out, teacher_out)
        terms = self.loss_terms(student_out, teacher_out, batch)
        loss = torch.stack(list(terms.values())).sum()
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        for name, value in self.scheduled.items():  # python floats: logging them never syncs the device
            self.log(f"train/{name}" if name in ("temperature", "alpha") else f"train/weight/{name}", value)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        teacher_out = self._teacher_out(batch, need=True)
        student_out = self.student_forward(batch)
        self._check_classes_once(student_out, teacher_out)
        y = batch[1]
        metrics = self.metrics[stage]
        self.log(f"{stage}/loss", self.task_loss(student_out, batch), prog_bar=stage == "val", sync_dist=True)
        metrics["acc"](student_out, y)
        metrics["ece"](student_out.float().softmax(-1), y)
        if teacher_out is not None:
            metrics["teacher_acc"](teacher_out, y)
            metrics["teacher_ece"](teacher_out.float().softmax(-1), y)
            metrics["agreement"](student_out, teacher_out.argmax(-1))  # top-1 agreement
            metrics["kl_t1"](kl_per_sample(student_out, teacher_out))
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=stage == "val" and name == "acc")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.student_forward(batch)

    def configure_optimizers(self) -> Any:
        params = list(self.student.parameters())
        if self.features is not None:
            params += list(self.features.parameters())  # the adapters learn with the student
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}
