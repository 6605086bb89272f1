"""What a validation or test split measures: the student's quality and its fidelity to the teacher.

One :class:`SplitMetrics` per split (torchmetrics objects, so validation never mixes into test and
DDP ranks are reduced by torchmetrics), logged as ``<split>/<name>``:

- classification: ``acc`` and ``ece`` (15-bin calibration error) of the student; with a teacher,
  ``teacher_acc``, ``teacher_ece``, ``agreement`` (top-1) and ``kl_t1`` (``KL(t ‖ s)`` at T=1 per sample);
- tokens: ``acc`` (next-token accuracy) and ``ppl`` (perplexity) over the kept tokens; with a
  teacher ``teacher_acc``, ``teacher_ppl``, ``agreement`` and ``kl_t1`` per token, the last two on the
  vocabulary rows both models share.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.text import Perplexity

from kd_lightning.data.batch import Batch
from kd_lightning.loss.objectives import forward_kl
from kd_lightning.vocab import common_rows

SPLITS = ("val", "test")


def _kl_per_sample(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(softmax(t) ‖ softmax(s))`` at T=1 for each row: ``(N, C)`` -> ``(N,)`` (``-inf`` rows count 0)."""
    return forward_kl(student_logits.float(), teacher_logits.float())


def accuracy(num_classes: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def calibration(num_classes: int) -> MulticlassCalibrationError:
    return MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")


class SplitMetrics(nn.ModuleDict):
    """The metrics of one split, for ``task`` ``classification`` or ``tokens``, with or without a teacher."""

    def __init__(self, num_classes: int, with_teacher: bool, task: str) -> None:
        tokens = task == "tokens"
        metrics = {
            "acc": accuracy(num_classes),
            "ppl" if tokens else "ece": Perplexity() if tokens else calibration(num_classes),
        }
        if with_teacher:
            metrics |= {
                "teacher_acc": accuracy(num_classes),
                "teacher_ppl" if tokens else "teacher_ece": Perplexity() if tokens else calibration(num_classes),
                "agreement": accuracy(num_classes),
                "kl_t1": MeanMetric(),
            }
        super().__init__(metrics)
        self.tokens = tokens

    def add_batch(self, student_logits: Tensor, teacher_logits: Tensor | None, batch: Batch) -> None:
        """Add one batch: logits ``(N, C)`` / ``(N, L, V)`` and its labels."""
        if self.tokens:
            keep = batch["kept"]
            labels, student = batch["labels"][keep], student_logits[keep].float()  # (K,), (K, V): the tokens that count
            self["acc"](student.argmax(-1), labels)
            self["ppl"](student[None], labels[None])
            if teacher_logits is not None:
                teacher = teacher_logits[keep].float()
                self["teacher_acc"](teacher.argmax(-1), labels)
                self["teacher_ppl"](teacher[None], labels[None])
                width = min(student.shape[-1], teacher.shape[-1])
                self.fidelity(common_rows(student, width), common_rows(teacher, width))
            return
        labels = batch["labels"]
        self["acc"](student_logits, labels)
        self["ece"](student_logits.float().softmax(-1), labels)
        if teacher_logits is not None:
            self["teacher_acc"](teacher_logits, labels)
            self["teacher_ece"](teacher_logits.float().softmax(-1), labels)
            self.fidelity(student_logits, teacher_logits)

    def fidelity(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        self["agreement"](student_logits.argmax(-1), teacher_logits.argmax(-1))  # top-1 agreement
        self["kl_t1"](_kl_per_sample(student_logits, teacher_logits))
