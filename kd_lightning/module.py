"""DistillationModule: wires a trainable student, a frozen teacher, the loss mix and the metrics."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.checkpoints import check_student_state, student_only
from kd_lightning.data.batch import Batch, as_batch, kept_labels
from kd_lightning.errors import KDError
from kd_lightning.finite import NonFiniteWatch
from kd_lightning.loss.chunked import HeadLogits, TeacherBlocks, blockwise_terms, resolved
from kd_lightning.loss.features import check_live_teacher
from kd_lightning.loss.mix import LossMix, Terms
from kd_lightning.loss.reduction import StepTokens, reduce
from kd_lightning.loss.schedules import optimizer_config
from kd_lightning.metrics import SPLITS, SplitMetrics
from kd_lightning.models.outputs import check_head_gives_logits, hidden_and_head, model_logits
from kd_lightning.progress import logs_this_step
from kd_lightning.sequences import Answers, SampleScores, Sequences
from kd_lightning.sharding import is_sharded, is_sharding, shard
from kd_lightning.speed import check_chunk_rows
from kd_lightning.teacher import Teacher, as_teacher
from kd_lightning.vocab import check_outputs, common_rows, declared_classes, labels_in_range

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
TASKS = ("classification", "tokens")


class DistillationModule(L.LightningModule):
    """Trains ``student`` to match a frozen ``teacher``: ``(1 − alpha)·CE + alpha·T²·KL`` or any :class:`LossMix`.

    The teacher (:class:`~kd_lightning.teacher.Teacher`, live or recorded) never trains, never reaches the optimizer
    and is left out of checkpoints (``DistillationModule.load_from_checkpoint(path, student=net)`` needs none);
    ``teacher=None`` trains the student alone. Batches are :class:`~kd_lightning.data.batch.Batch` dicts or
    ``(x, y[, index])`` tuples. ``task="tokens"``: ``(N, L)`` token ids and labels (``-100``: not counted),
    ``(N, L, V)`` logits (or a ``transformers`` output with ``.logits``).

    Subclass and override one hook to change one thing; each takes effect in the plain and the chunked step:
    :meth:`teacher_forward`, :meth:`student_forward`, :meth:`task_loss`, :meth:`distillation_loss`, :meth:`loss_terms`.

    Args:
        student: trainable model, ``inputs -> (N, C)`` logits (``(N, L, V)`` for tokens).
        teacher: a :class:`~kd_lightning.teacher.Teacher`, a plain ``nn.Module`` (run live), or ``None``.
        num_classes: ``C`` (for tokens: the tokenizer's vocabulary size); default the student's ``num_classes``.
        temperature, alpha: the default mix ``(1 − alpha)·CE + alpha·kd_loss(T)`` (4.0, 0.9); unset with ``loss_mix``.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); default SGD(lr=0.05, momentum 0.9).
        scheduler: ``optimizer -> LRScheduler`` or ``None``; stepped once per epoch, or per optimizer step when its
            ``interval`` is ``"step"`` (:class:`~kd_lightning.loss.schedules.WarmupCosineLR`).
        loss_mix: the loss terms, weights and schedules (:class:`~kd_lightning.loss.mix.LossMix`).
        task: ``classification`` (one label per sample) or ``tokens`` (one label per token).
        chunk_rows: tokens: the training loss block by block, this many tokens at a time (``speed.chunk_rows``,
            :mod:`kd_lightning.loss.chunked`): the same loss and gradients without the whole logits; ``"auto"``: as many
            as :func:`~kd_lightning.loss.chunked.default_chunk_rows` chooses; ``None``: all at once.
        sequences: where training batches' completions come from (:class:`~kd_lightning.sequences.Sequences`:
            on-policy distillation); ``None``: the data set's.
        answers: a task with answers: ``{split}/exact_match`` of the greedy completions (and the teacher's).
        sample_scores: ``{split}/sample_*``, the student's samples for held-out prompts scored by the teacher
            (:class:`~kd_lightning.sequences.SampleScores`).
        shard_teacher: under ``ModelParallelStrategy`` (``trainer=fsdp``), shard a live teacher too (``False``: a whole
            copy on every rank); the student is always sharded (:mod:`kd_lightning.sharding`).
        shard_dtype: under ``trainer=fsdp``, the dtype sharded parameters are gathered and computed in (``bfloat16``,
            ``float16``; ``speed.shard_dtype``); the shards stay as they are and gradients are reduced in float32.
        generate_whole: under ``trainer=fsdp``, the student generates (on-policy samples, exact match, sample scores)
            through a whole copy refilled from its shards at each call (``speed.generate_whole``,
            :class:`~kd_lightning.sharding.WholeCopy`), not gathering each block at every new token.
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
        chunk_rows: int | str | None = None,
        sequences: Sequences | None = None,
        answers: Answers | None = None,
        sample_scores: SampleScores | None = None,
        shard_teacher: bool = True,
        shard_dtype: str | None = None,
        generate_whole: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise KDError(f"task must be one of {TASKS}, got {task!r}.")
        check_chunk_rows(chunk_rows, task, loss_mix is not None and loss_mix.features is not None)
        if loss_mix is None:
            loss_mix = LossMix(
                temperature=4.0 if temperature is None else temperature, alpha=0.9 if alpha is None else alpha
            )
        elif (temperature, alpha) not in ((None, None), (loss_mix.temperature, loss_mix.alpha)):
            raise KDError(
                "pass temperature and alpha inside the LossMix (LossMix(temperature=..., alpha=...)), not beside it."
            )
        self.student, self.teacher, self.loss_mix = student, as_teacher(teacher), loss_mix
        num_classes = declared_classes(num_classes, student, self.teacher_network)
        check_live_teacher(loss_mix.features if self.teacher is not None else None, self.teacher_network is not None)
        self.save_hyperparameters(
            {"num_classes": num_classes, "temperature": loss_mix.temperature, "alpha": loss_mix.alpha, "task": task}
        )
        self.task, self.chunk_rows = task, chunk_rows
        if sequences is not None and sequences.settings.samples and task != "tokens":
            raise KDError(
                "distill.on_policy samples completions: it is for language models (token tasks), not "
                f"{task}; unset distill.on_policy.fraction and teacher_fraction."
            )
        self.sequences = sequences  # where the training batches' completions come from (on-policy distillation)
        self.answers = answers  # a task with answers: greedy exact match in evaluation
        roles = ["student"] + (["teacher"] if self.teacher is not None else [])
        self.exact = nn.ModuleDict(
            {f"{split}_{role}": MeanMetric() for split in SPLITS for role in roles} if answers else {}
        )
        self.sample_scores = sample_scores  # the student's samples for held-out prompts, scored by the teacher
        self.sampled = nn.ModuleDict(
            {f"{split}_{name}": MeanMetric() for split in SPLITS for name in SampleScores.NAMES}
            if sample_scores
            else {}
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.shard_teacher, self.shard_dtype, self.generate_whole = shard_teacher, shard_dtype, generate_whole
        self.outputs_checked = False
        self.step_tokens = StepTokens()  # the step's count, when a step spans micro-batches or processes
        self.nonfinite = NonFiniteWatch()  # the first step whose loss, a term or a gradient was NaN or infinite
        self.strict_loading = False  # checkpoints hold the student only (on_load_checkpoint insists on all of it)
        self.metrics = nn.ModuleDict(
            {split: SplitMetrics(num_classes, self.teacher is not None, task) for split in SPLITS}
        )
        self.eval_losses = nn.ModuleDict(
            {split: MeanMetric() for split in SPLITS}
        )  # per counted label: exact under any split

    temperature = property(lambda self: self.loss_mix.temperature, doc="The mix's temperature this step.")
    teacher_network = property(
        lambda self: None if self.teacher is None else self.teacher.network,
        doc="The teacher's network in this process, if it has one (:attr:`Teacher.network`).",
    )
    alpha = property(
        lambda self: self.loss_mix.alpha, doc="The mix's alpha this step (``None``: the terms have own weights)."
    )

    # -- hooks a subclass may override -------------------------------------------------

    def teacher_forward(self, batch: Batch) -> Tensor | TeacherBlocks:
        """The teacher's logits ``(N, C)`` / ``(N, L, V)`` for ``batch`` (live: eval mode, no graph; recorded: looked up).
        In training they may come as :class:`~kd_lightning.loss.chunked.TeacherBlocks`: by row block for the chunked loss,
        or completed from the student's logits (a top-k recording)."""
        if self.current_split != "train":
            return self.teacher.logits(batch, self.current_split)
        return self.teacher.training_logits(batch, blockwise=self.chunk_rows is not None)

    def student_forward(self, batch: Batch) -> Tensor | HeadLogits:
        """The student's logits ``(N, C)`` / ``(N, L, V)`` for ``batch["inputs"]``; in training with ``chunk_rows``,
        its final hidden states and output head (:class:`~kd_lightning.loss.chunked.HeadLogits`)."""
        if self.chunk_rows is None or self.current_split != "train":
            return model_logits(self.student, batch)
        if not self.outputs_checked:
            check_head_gives_logits(self.student, batch)
        return HeadLogits(*hidden_and_head(self.student, batch), None if self.chunk_rows == "auto" else self.chunk_rows)

    def task_loss(self, student_logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy on ``batch["labels"]``, the mean over the positions that count (``-100`` labels do not; a batch
        without any gives 0)."""
        labels = batch["labels"]
        per_position = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        keep = batch.get("kept")
        return reduce(per_position.view_as(labels), keep if keep is not None else kept_labels(labels))

    def distillation_loss(self, student_logits: Tensor, teacher_logits: Tensor, batch: Batch) -> Tensor:
        """The mix's objective at its current temperature (``T²``-scaled forward KL by default), over the kept positions."""
        return self.loss_mix.evaluate(self.loss_mix.objective_name, student_logits, teacher_logits, batch)

    def loss_terms(
        self, student_out: Tensor | HeadLogits, teacher_out: Tensor | TeacherBlocks | None, batch: Batch
    ) -> Terms:
        """Named, weighted loss terms (``ce``, the objective, extra and feature terms); the loss is their ``total``.
        A :class:`~kd_lightning.loss.chunked.HeadLogits` student has the same terms evaluated block by block."""
        if not isinstance(student_out, HeadLogits):
            terms = self.logit_terms(student_out, resolved(teacher_out, student_out), batch)
            features = self.loss_mix.feature_losses() if teacher_out is not None else {}
            return Terms(terms | self.loss_mix.weighted(features))
        if not self.outputs_checked:
            labels_in_range(batch["labels"], batch.get("kept"), self.hparams.num_classes)
        fields = {name: batch[name] for name in ("labels", "kept") if name in batch}
        total, terms = blockwise_terms(student_out, teacher_out, fields, self.logit_terms, batch.get("kept"))
        return Terms(terms, total=total)

    # -- the terms of some logits (all of a batch's, or one block's) ---------------------------------

    def logit_terms(self, student_logits: Tensor, teacher_logits: Tensor | None, batch: Batch) -> dict[str, Tensor]:
        """``{name: weight · term}`` of the logit terms: CE, and with the teacher's logits the objective and extra terms,
        compared on the vocabulary rows both models share."""
        self.check_outputs_once(student_logits, teacher_logits, batch)
        # a CE of weight 0 (alpha=1) is not computed: at a large vocabulary it was a tenth of the step, for nothing
        losses = (
            {"ce": self.task_loss(student_logits, batch)}
            if self.loss_mix.is_active("ce") or teacher_logits is None
            else {}
        )
        if teacher_logits is not None:
            width = min(student_logits.shape[-1], teacher_logits.shape[-1])
            student_logits, teacher_logits = common_rows(student_logits, width), common_rows(teacher_logits, width)
            if self.loss_mix.is_active(self.loss_mix.objective_name):
                losses[self.loss_mix.objective_name] = self.distillation_loss(student_logits, teacher_logits, batch)
            losses |= self.loss_mix.extra_losses(student_logits, teacher_logits, batch)
        return self.loss_mix.weighted(losses)

    def check_outputs_once(self, student_logits: Tensor, teacher_logits: Tensor | None, batch: Batch) -> None:
        """On the first batch (or block): class counts and vocabularies agree, token labels are in range."""
        if not self.outputs_checked:
            check_outputs(
                student_logits,
                teacher_logits,
                batch["labels"],
                batch.get("kept"),
                self.hparams.num_classes,
                self.task,
                padding_known=self.teacher is not None and self.teacher.trained_here,
            )
            self.outputs_checked = True

    # -- steps -------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if self.sequences is not None:  # the data set's completions, or the student's or the teacher's own
            batch = self.sequences(batch, self.student, self.teacher_network, self.global_step, batch_idx)
        with self.loss_mix.capturing_features():
            teacher_out = (
                self.teacher_forward(batch) if self.teacher is not None and self.loss_mix.uses_teacher else None
            )
            student_out = self.student_forward(batch)
        terms = self.loss_terms(student_out, teacher_out, batch)
        loss = terms.total if isinstance(terms, Terms) else torch.stack(list(terms.values())).sum()
        self.nonfinite.watch(self.global_step, {"loss": loss, **terms})
        if not self.step_spans_micro_batches:
            self.log_training(loss, terms)
            return loss
        # divided by the whole step's count before it steps
        return self.step_tokens.add(loss, terms, batch["kept"].sum())

    @property
    def step_spans_micro_batches(self) -> bool:
        """Tokens, and an optimizer step over several micro-batches (gradient accumulation) or processes: then the loss
        is divided by the kept tokens of the whole step (:class:`~kd_lightning.loss.reduction.StepTokens`), not of each
        micro-batch. (Images: CE counts the labelled samples but the teacher's terms every sample, so no one count
        serves; their batches are of one size, whose mean of means is the step's mean.)"""
        trainer = self._trainer
        return (
            self.task == "tokens"
            and trainer is not None
            and (trainer.accumulate_grad_batches > 1 or trainer.world_size > 1)
        )

    def evaluate(self, batch: Any, split: str, batch_idx: int = 0) -> None:
        batch = as_batch(batch)
        teacher_logits = self.teacher_forward(batch) if self.teacher is not None else None
        student_logits = self.student_forward(batch)
        self.check_outputs_once(student_logits, teacher_logits, batch)
        kept = batch.get("kept")
        self.eval_losses[split].update(
            self.task_loss(student_logits, batch), (kept if kept is not None else kept_labels(batch["labels"])).sum()
        )
        self.log(f"{split}/loss", self.eval_losses[split])
        self.metrics[split].add_batch(student_logits, teacher_logits, batch)
        for name, metric in self.metrics[split].items():
            self.log(f"{split}/{name}", metric, prog_bar=split == "val" and name in ("acc", "ppl"))
        if self.answers is not None:
            models = {"student": self.student} | (
                {"teacher": self.teacher_network} if self.teacher_network is not None else {}
            )
            for role, model in models.items():
                metric = self.exact[f"{split}_{role}"]
                metric.update(self.answers.matches(model, batch))
                self.log(
                    f"{split}/{'' if role == 'student' else 'teacher_'}exact_match", metric, prog_bar=split == "val"
                )
        if self.sample_scores is not None:
            for name, (value, weight) in self.sample_scores(
                self.student, self.teacher_network, batch, seed=batch_idx
            ).items():
                metric = self.sampled[f"{split}_{name}"]
                metric.update(value.to(self.device), weight.to(self.device))
                self.log(f"{split}/{name}", metric)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.student_forward(as_batch(batch))

    def log_training(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        # No host reads, so the step never waits for the device: values stay tensors until a logger writes them
        # (every log_every_n_steps). Not prog_bar=True: Lightning turns progress-bar values into numbers every step.
        self.log("train/loss", loss)
        for name, value in terms.items():
            self.log(f"train/{name}", value)
        if self.loss_mix.scheduled and logs_this_step(
            self._trainer
        ):  # python floats: logging one copies it to the device
            for name, value in self.loss_mix.scheduled_values().items():
                self.log(f"train/{name}", value)

    # -- Lightning's hooks -------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Feature distillation: hook the layers and size the adapters (before the optimizer is built)."""
        if self.loss_mix.features is not None and self.teacher_network is not None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.loss_mix.features.prepare(self.student, self.teacher_network, datamodule, fitting=stage == "fit")

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the student by its blocks, and the live teacher unless ``shard_teacher=False``
        (:mod:`kd_lightning.sharding`). Called before each fit and test; what is sharded stays sharded."""
        if self._trainer is None or not is_sharding(self.trainer.strategy):
            return
        mesh = self.trainer.strategy.device_mesh["data_parallel"]
        chunked = self.chunk_rows is not None
        if not is_sharded(self.student):
            shard(self.student, mesh, "student", chunked, self.shard_dtype, self.generate_whole)
        if self.shard_teacher and self.teacher_network is not None and not is_sharded(self.teacher_network):
            shard(self.teacher_network, mesh, "teacher", chunked, self.shard_dtype)

    def teardown(self, stage: str) -> None:
        if self.loss_mix.features is not None:
            self.loss_mix.features.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.step_tokens.pending:
            trainer = self.trainer
            means = self.step_tokens.finish(
                trainer.strategy, self.parameters(), trainer.accumulate_grad_batches, trainer.world_size
            )
            self.log_training(means.pop("loss"), means)
        self.nonfinite.watch_gradients(self.global_step, self.student.parameters())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at a non-finite step where the host reads anyway: a step the loggers write, and an epoch's last batch
        (before its validation and checkpoint, so the last checkpoint is one from before it)."""
        trainer = self.trainer
        if logs_this_step(trainer) or batch_idx + 1 >= trainer.num_training_batches:
            callback = trainer.checkpoint_callback
            self.nonfinite.check(trainer.strategy, getattr(callback, "dirpath", None))

    def on_fit_start(self) -> None:
        if self.teacher is None and self.loss_mix.uses_teacher:
            raise KDError(
                f"the loss mix ({self.loss_mix.extra_repr()}) needs a teacher; pass teacher=... or set alpha=0 "
                "to train the student alone."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Advance the schedules: temperature, alpha and term weights for this step."""
        self.loss_mix.advance(self.current_epoch, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = student_only(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # ModelParallelStrategy loads the weights itself, and hands the rest here
            check_student_state(checkpoint["state_dict"], self.student)

    def configure_optimizers(self) -> Any:
        params = list(self.student.parameters()) + list(
            self.loss_mix.parameters()
        )  # feature adapters learn with the student
        optimizer = (
            self.optimizer_factory(params=params)
            if self.optimizer_factory is not None
            else torch.optim.SGD(params, lr=0.05, momentum=0.9)
        )
        return optimizer_config(optimizer, self.scheduler_factory, lambda: self.trainer.estimated_stepping_batches)

    @property
    def current_split(self) -> str:
        """The data split being run: ``train``, ``val``, ``test`` (``train`` outside a Trainer)."""
        if self._trainer is None or self.trainer.training:
            return "train"
        return "test" if self.trainer.testing else "val"
