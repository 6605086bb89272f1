"""DistillationModule: wires a trainable student, a frozen teacher, the loss mix and the metrics."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.text import Perplexity

from kd_lightning.chunked import chunked_loss
from kd_lightning.data.batch import IGNORE_INDEX, Batch, as_batch, kept_tokens
from kd_lightning.errors import KDError
from kd_lightning.loss_mix import LossMix, objective_inputs
from kd_lightning.losses import kl_rows, mean_over_positions
from kd_lightning.models.outputs import check_head_gives_logits, hidden_and_head, model_logits
from kd_lightning.teacher import LiveTeacher, Teacher, as_teacher
from kd_lightning.vocab import check_vocabularies, common_rows, labels_in_range

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
TASKS = ("classification", "tokens")


def check_same_classes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise :class:`KDError` if teacher and student predict different numbers of classes."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise KDError(
            f"teacher and student predict different numbers of classes: teacher "
            f"{teacher_logits.shape[-1]}, student {student_logits.shape[-1]}. Build both for the "
            "data's classes (e.g. teacher.model.num_classes=${data.num_classes})."
        )


def check_chunk_rows(chunk_rows: int | None, task: str, with_features: bool) -> None:
    """``chunk_rows`` (``distill.chunk_rows``): ``None``, or a positive count of tokens per block for a language model
    without feature terms."""
    if chunk_rows is None:
        return
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise KDError(f"distill.chunk_rows must be a positive integer (tokens per block) or null, got {chunk_rows!r}.")
    if task != "tokens":
        raise KDError("distill.chunk_rows is for language models (task=tokens), whose logits are (N, L, V); unset it.")
    if with_features:
        raise KDError("distill.chunk_rows cannot be combined with distill.features (the chunked loss sees the logits "
                      "of one block of tokens at a time); unset one of them.")


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(t) ‖ softmax(s))`` at T=1 for each row: ``(N, C)`` -> ``(N,)`` (``-inf`` rows count 0)."""
    return kl_rows(F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1))


class DistillationModule(L.LightningModule):
    """Trains ``student`` to match a frozen ``teacher``: ``(1 − alpha)·CE + alpha·T²·KL`` or any :class:`LossMix`.

    The teacher (:class:`~kd_lightning.teacher.Teacher`: a live network or a recording) has
    no trainable parameters, a live one stays in eval mode whatever ``.train()`` is called and
    runs under ``torch.no_grad()``; it never reaches the optimizer and is left out of
    checkpoints, so ``DistillationModule.load_from_checkpoint(path, student=net)`` needs no
    teacher. With ``teacher=None`` the student trains alone (the mix must then need no teacher).

    Batches are :class:`~kd_lightning.data.batch.Batch` dicts (``inputs``, ``labels``, ...) or
    ``(x, y[, index])`` tuples, converted once per step by :func:`~kd_lightning.data.batch.as_batch`.

    ``task="tokens"`` distils language models token by token: ``inputs`` are ``(N, L)`` token ids,
    ``labels`` the ``(N, L)`` next tokens (``-100`` where a position does not count), an optional
    ``attention_mask`` marks padding; the models return ``(N, L, V)`` logits (or a ``transformers``
    output with ``.logits``). Every objective then averages over the kept tokens; a teacher and a
    student whose vocabularies differ only by padding rows are compared on their common rows
    (:mod:`kd_lightning.vocab`). The metrics are then token accuracy, perplexity, top-1 agreement
    and the per-token KL instead of accuracy and calibration.
    Subclass and override one hook to change one thing: :meth:`teacher_forward`,
    :meth:`student_forward`, :meth:`task_loss`, :meth:`distillation_loss`, :meth:`loss_terms`.

    Args:
        student: trainable model, ``inputs -> (N, C)`` logits (``(N, L, V)`` for tokens).
        teacher: a :class:`~kd_lightning.teacher.Teacher`, a plain ``nn.Module`` (run live), or ``None``.
        num_classes: ``C``, for the metrics (for tokens: the tokenizer's vocabulary size); default the
            student's ``num_classes`` attribute.
        temperature, alpha: the default mix ``(1 − alpha)·CE + alpha·kd_loss(T)`` (4.0 and 0.9);
            leave them unset when passing ``loss_mix``.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); default SGD(lr=0.05, momentum 0.9).
        scheduler: ``optimizer -> LRScheduler`` or ``None``; stepped once per epoch, or per step when the
            scheduler says ``interval = "step"`` (:class:`~kd_lightning.schedules.WarmupCosineLR`).
        loss_mix: the loss terms, weights and schedules (:class:`~kd_lightning.loss_mix.LossMix`).
        task: ``classification`` (one label per sample) or ``tokens`` (one label per token).
        chunk_rows: tokens: train with the chunked loss (:mod:`kd_lightning.chunked`), this many tokens per block:
            the student's logits are made from its final hidden states and output head one block at a time and
            never exist whole (nor a live teacher's); the loss and gradients are those of the plain step
            (:meth:`student_forward` and :meth:`teacher_forward` are then not called in training). ``None``: the
            plain step.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Teacher | nn.Module | None = None,
        num_classes: int | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        loss_mix: LossMix | None = None,
        task: str = "classification",
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise KDError(f"task must be one of {TASKS}, got {task!r}.")
        check_chunk_rows(chunk_rows, task, loss_mix is not None and loss_mix.features is not None)
        if loss_mix is None:
            loss_mix = LossMix(temperature=4.0 if temperature is None else temperature, alpha=0.9 if alpha is None else alpha)
        elif (temperature, alpha) not in ((None, None), (loss_mix.temperature, loss_mix.alpha)):
            raise KDError("pass temperature and alpha inside the LossMix (LossMix(temperature=..., alpha=...)), not beside it.")
        if num_classes is None:
            num_classes = getattr(student, "num_classes", None)
            if num_classes is None:
                raise KDError("pass num_classes=C: the student has no num_classes attribute to read it from.")
        self.student = student
        self.teacher = as_teacher(teacher)
        self.loss_mix = loss_mix
        for name, model in (("teacher", getattr(self.teacher, "model", None)), ("student", student)):
            declared = getattr(model, "num_classes", None)
            if declared is not None and declared != num_classes:
                raise KDError(f"the {name} is built for {declared} classes but the data has {num_classes}; "
                              f"set {name}.model.num_classes={num_classes}.")
        if loss_mix.features is not None and self.teacher is not None and not isinstance(self.teacher, LiveTeacher):
            raise KDError("feature distillation needs the live teacher's activations; set teacher.mode=live "
                          "(a recorded teacher has logits only).")
        self.save_hyperparameters({"num_classes": num_classes, "temperature": loss_mix.temperature, "alpha": loss_mix.alpha,
                                   "task": task})
        self.task = task
        self.chunk_rows = chunk_rows
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.outputs_checked = False
        # Checkpoints hold the student only; loading tolerates the absent teacher keys
        # (on_load_checkpoint still insists on every student key).
        self.strict_loading = False
        # one set of torchmetrics objects per stage, so validation never mixes into test
        self.metrics = nn.ModuleDict({stage: self._stage_metrics(num_classes, self.teacher is not None, task)
                                      for stage in ("val", "test")})

    @property
    def temperature(self) -> float:
        return self.loss_mix.temperature

    @property
    def alpha(self) -> float | None:
        return self.loss_mix.alpha

    @staticmethod
    def _stage_metrics(num_classes: int, with_teacher: bool, task: str) -> nn.ModuleDict:
        """Accuracy and calibration of the student (tokens: accuracy and perplexity), plus fidelity to the teacher."""
        if task == "tokens":
            metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"), "ppl": Perplexity()}
            if with_teacher:
                metrics |= {"teacher_acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                            "teacher_ppl": Perplexity(),
                            "agreement": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                            "kl_t1": MeanMetric()}
            return nn.ModuleDict(metrics)
        metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                   "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")}
        if with_teacher:
            metrics |= {"teacher_acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                        "teacher_ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
                        "agreement": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                        "kl_t1": MeanMetric()}
        return nn.ModuleDict(metrics)

    # -- hooks a subclass may override -------------------------------------------------

    def teacher_forward(self, batch: Batch) -> Tensor:
        """Teacher logits ``(N, C)`` / ``(N, L, V)`` for ``batch`` (live: eval mode, no graph; recorded: looked up).
        Not called in training for a :attr:`~kd_lightning.teacher.Teacher.deferred` teacher (a top-k recording)."""
        return self.teacher.logits(batch, self.current_split)

    def student_forward(self, batch: Batch) -> Tensor:
        """Student logits ``(N, C)`` / ``(N, L, V)`` for ``batch["inputs"]``."""
        return model_logits(self.student, batch)

    def task_loss(self, student_out: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy on ``batch["labels"]``, the mean over the labelled samples (tokens); ``-100`` labels do not
        count, and a batch without any labelled one gives 0."""
        labels = batch["labels"]
        per_position = F.cross_entropy(student_out.float().flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)
        keep = kept_tokens(batch) if labels.ndim > 1 else labels != IGNORE_INDEX
        return mean_over_positions(per_position, keep)

    def distillation_loss(self, student_out: Tensor, teacher_out: Tensor, batch: Batch) -> Tensor:
        """The mix's objective at its current temperature (``T²``-scaled forward KL by default), mean over samples or kept tokens."""
        return self.loss_mix.objective(student_out, teacher_out, temperature=self.loss_mix.temperature, **objective_inputs(batch))

    def loss_terms(self, student_out: Tensor, teacher_out: Tensor | None, batch: Batch) -> dict[str, Tensor]:
        """Named, already weighted loss terms (``ce``, the objective, extra and feature terms); the loss is their sum."""
        return self.loss_mix(student_out, teacher_out, batch, task_loss=self.task_loss, distillation_loss=self.distillation_loss)

    # -- frozen teacher, student-only checkpoints ------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("features.")]:  # written by kd_lightning 0.2
            state[f"loss_mix.{key}"] = state.pop(key)
        expected = {f"student.{k}" for k in self.student.state_dict()}
        missing = sorted(expected - state.keys())
        if missing:
            raise KDError(
                f"the checkpoint lacks {len(missing)} student weights (first: {missing[:5]}); "
                "it was not saved from a DistillationModule with this student architecture."
            )

    # -- steps -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Feature distillation: hook the layers and size the adapters (before the optimizer is built)."""
        features = self.loss_mix.features
        if features is None or not isinstance(self.teacher, LiveTeacher):
            return
        if not features.attached:
            features.attach(self.student, self.teacher.model)
        if stage == "fit":
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            if not hasattr(datamodule, "example_input"):
                raise KDError("feature distillation sizes its adapters from an example input: give the datamodule an "
                              "example_input() method, or call module.loss_mix.features.build_adapters(student, teacher, x) first.")
            features.build_adapters(self.student, self.teacher.model, datamodule.example_input())

    def teardown(self, stage: str) -> None:
        if self.loss_mix.features is not None:
            self.loss_mix.features.detach()

    def on_fit_start(self) -> None:
        if self.teacher is None and self.loss_mix.uses_teacher:
            raise KDError(f"the loss mix ({self.loss_mix.extra_repr()}) needs a teacher; pass teacher=... or set alpha=0 "
                          "to train the student alone.")

    @property
    def logs_this_step(self) -> bool:
        """Whether the loggers write this training step (every ``trainer.log_every_n_steps``)."""
        if self._trainer is None:
            return True
        connector = getattr(self.trainer, "_logger_connector", None)  # Lightning's own test, as its loggers use it
        return bool(getattr(connector, "should_update_logs", True))

    @property
    def current_split(self) -> str:
        """The data split being run: ``train``, ``val``, ``test`` (``train`` outside a Trainer)."""
        if self._trainer is None or self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"

    def _check_outputs_once(self, student_out: Tensor, teacher_out: Tensor | None, batch: Batch) -> None:
        """On the first batch: class counts (vocabularies) agree, labels are in range, the teacher's logits are sound."""
        if self.outputs_checked:
            return
        if teacher_out is not None:
            if self.task == "tokens":
                check_vocabularies(student_out, teacher_out, self.hparams.num_classes)
            else:
                check_same_classes(student_out, teacher_out)
            if torch.isnan(teacher_out).any() or torch.isposinf(teacher_out).any():  # -inf: a masked class, allowed
                raise KDError("the teacher's logits contain NaN or Inf; the teacher checkpoint is broken or "
                              "diverged. Retrain it or pass a different teacher.checkpoint.")
        if self.task == "tokens":
            if student_out.ndim != 3 or batch["labels"].shape != student_out.shape[:-1]:
                raise KDError(f"task=tokens needs (N, L, V) logits and (N, L) labels; got logits {tuple(student_out.shape)} "
                              f"and labels {tuple(batch['labels'].shape)}.")
            labels_in_range(batch["labels"], kept_tokens(batch), self.hparams.num_classes)
            if student_out.shape[-1] < self.hparams.num_classes:
                raise KDError(f"the student predicts {student_out.shape[-1]} tokens but the vocabulary has "
                              f"{self.hparams.num_classes}; build it for the data's tokenizer.")
        elif student_out.shape[-1] != self.hparams.num_classes:
            raise KDError(f"the student predicts {student_out.shape[-1]} classes but num_classes="
                          f"{self.hparams.num_classes}; build it for the data's classes.")
        self.outputs_checked = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Advance the schedules: temperature, alpha and term weights for this step."""
        self.loss_mix.advance(self.current_epoch, self.global_step)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        needs_teacher = self.teacher is not None and self.loss_mix.uses_teacher
        if self.chunk_rows is not None:
            loss, terms = self._chunked_loss(batch, needs_teacher)
            self._log_training(loss, terms)
            return loss
        features = self.loss_mix.features
        if features is not None:
            features.capturing = True
        try:
            teacher_out = self.teacher_forward(batch) if needs_teacher and not self.teacher.deferred else None
            student_out = self.student_forward(batch)
        finally:
            if features is not None:
                features.capturing = False
        if needs_teacher:
            teacher_out = self.teacher.complete(teacher_out, student_out, batch, "train")
        self._check_outputs_once(student_out, teacher_out, batch)
        terms = self.loss_terms(student_out, teacher_out, batch)
        loss = torch.stack(list(terms.values())).sum()
        self._log_training(loss, terms)
        return loss

    def _chunked_loss(self, batch: Batch, needs_teacher: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of :meth:`loss_terms` over the batch's tokens, made block by block from the student's final hidden
        states and head (:func:`~kd_lightning.chunked.chunked_loss`); and its terms, detached, for the log.

        Every term is a mean over a block's kept tokens; weighted by the block's share of the batch's kept tokens,
        the blocks add up to the plain step's means."""
        if not self.outputs_checked:
            check_head_gives_logits(self.student, batch)
        hidden, head = hidden_and_head(self.student, batch)
        teacher_rows = self.teacher.block_logits(batch, "train") if needs_teacher else None
        keep = kept_tokens(batch).reshape(1, -1)
        flat = {name: batch[name].reshape(1, -1) for name in ("labels", "attention_mask") if name in batch}
        num_kept = keep.sum().clamp_min(1)
        logged: dict[str, Tensor] = {}

        def block_loss(rows: slice, logits: Tensor) -> Tensor:
            block = {name: value[:, rows] for name, value in flat.items()}
            student_block = logits[None]  # (1, R, V): a batch of one sequence of the block's tokens
            teacher_block = None if teacher_rows is None else teacher_rows(rows, logits.detach())[None]
            self._check_outputs_once(student_block, teacher_block, block)
            share = keep[:, rows].sum() / num_kept
            terms = self.loss_terms(student_block, teacher_block, block)
            for name, value in terms.items():
                logged[name] = logged.get(name, 0) + value.detach() * share
            return torch.stack(list(terms.values())).sum() * share

        if not self.outputs_checked:
            labels_in_range(batch["labels"], kept_tokens(batch), self.hparams.num_classes)
        return chunked_loss(hidden, head, block_loss, self.chunk_rows), logged

    def _log_training(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        # Nothing here reads a device value on the host, so the step never waits for the device: the
        # values stay tensors until a logger writes them (every log_every_n_steps). Not prog_bar=True:
        # Lightning turns progress-bar values into Python numbers after every step.
        self.log("train/loss", loss)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        if self.loss_mix.scheduled and self.logs_this_step:
            for name, value in self.loss_mix.scheduled.items():  # python floats: logging one copies it to the device
                self.log(f"train/{name}" if name in ("temperature", "alpha") else f"train/weight/{name}", value)

    def _evaluate(self, batch: Any, stage: str) -> None:
        batch = as_batch(batch)
        teacher_out = self.teacher_forward(batch) if self.teacher is not None else None
        student_out = self.student_forward(batch)
        self._check_outputs_once(student_out, teacher_out, batch)
        labels = batch["labels"]
        metrics = self.metrics[stage]
        self.log(f"{stage}/loss", self.task_loss(student_out, batch), sync_dist=True)
        if self.task == "tokens":
            self._evaluate_tokens(student_out, teacher_out, batch, metrics)
        else:
            self._evaluate_classes(student_out, teacher_out, labels, metrics)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=stage == "val" and name in ("acc", "ppl"))

    @staticmethod
    def _evaluate_tokens(student_out: Tensor, teacher_out: Tensor | None, batch: Batch, metrics: nn.ModuleDict) -> None:
        keep = kept_tokens(batch)
        labels, student = batch["labels"][keep], student_out[keep].float()  # (K,), (K, V): the tokens that count
        metrics["acc"](student.argmax(-1), labels)
        metrics["ppl"](student[None], labels[None])
        if teacher_out is not None:
            teacher = teacher_out[keep].float()
            metrics["teacher_acc"](teacher.argmax(-1), labels)
            metrics["teacher_ppl"](teacher[None], labels[None])
            width = min(student.shape[-1], teacher.shape[-1])
            student, teacher = common_rows(student, width), common_rows(teacher, width)
            metrics["agreement"](student.argmax(-1), teacher.argmax(-1))
            metrics["kl_t1"](kl_per_sample(student, teacher))

    @staticmethod
    def _evaluate_classes(student_out: Tensor, teacher_out: Tensor | None, labels: Tensor, metrics: nn.ModuleDict) -> None:
        metrics["acc"](student_out, labels)
        metrics["ece"](student_out.float().softmax(-1), labels)
        if teacher_out is not None:
            metrics["teacher_acc"](teacher_out, labels)
            metrics["teacher_ece"](teacher_out.float().softmax(-1), labels)
            metrics["agreement"](student_out, teacher_out.argmax(-1))  # top-1 agreement
            metrics["kl_t1"](kl_per_sample(student_out, teacher_out))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.student_forward(as_batch(batch))

    def configure_optimizers(self) -> Any:
        params = list(self.student.parameters()) + list(self.loss_mix.parameters())  # feature adapters learn with the student
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # WarmupCosineLR: as long as the whole run
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": getattr(scheduler, "interval", "epoch")}}
