"""The teacher: one small interface, "the teacher's logits for this batch", answered live or recorded.

- :class:`LiveTeacher` wraps a frozen ``nn.Module`` and runs it on ``batch["inputs"]``;
- :class:`~kd_lightning.recording.RecordedTeacher` looks the logits up in a recording by
  ``batch["index"]`` (and ``batch["view"]`` for augmented training images).

:class:`~kd_lightning.DistillationModule` takes either (or a plain ``nn.Module``, wrapped by
:func:`as_teacher`). Where a run's teacher comes from (a checkpoint, trained once and cached,
recorded) is :mod:`kd_lightning.teacher_source`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.models.outputs import check_head_gives_logits, hidden_and_head, model_logits, output_head

BlockLogits = Callable[[slice, Tensor], Tensor]  # (rows, the student's logits there (R, V)) -> the teacher's (R, V)


class Teacher(nn.Module):
    """Answers one question: the teacher's logits ``(N, C)`` (``(N, L, V)`` for tokens) for a batch of a split.

    Subclasses implement :meth:`logits`; they hold no trainable parameters, never appear in
    a checkpoint, and ``split`` is ``train``, ``val`` or ``test``.
    """

    deferred: bool = False
    """True for a teacher whose training logits depend on the student's (a top-k recording): training then skips
    :meth:`logits` and asks :meth:`complete` alone, after the student's forward pass."""

    def logits(self, batch: Batch, split: str) -> Tensor:
        raise NotImplementedError

    def complete(self, teacher_logits: Tensor | None, student_logits: Tensor, batch: Batch, split: str) -> Tensor:
        """The teacher logits the loss compares the student with, once the student's are known: ``teacher_logits``
        unchanged, except where a teacher knows only part of its distribution (a top-k recording, :attr:`deferred`:
        ``teacher_logits`` is then ``None``)."""
        return teacher_logits if teacher_logits is not None else self.logits(batch, split)

    def block_logits(self, batch: Batch, split: str) -> BlockLogits:
        """For the chunked loss (:mod:`kd_lightning.chunked`): the teacher's logits of some rows of the batch's flattened
        ``(N·L)`` tokens. This default slices the whole :meth:`logits` (which then exist at once, without a graph)."""
        whole = self.logits(batch, split).flatten(0, -2)
        return lambda rows, student_logits: whole[rows]


class LiveTeacher(Teacher):
    """A frozen network run on every batch: ``requires_grad=False``, always in eval mode, under ``no_grad``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.head_checked = False

    def logits(self, batch: Batch, split: str) -> Tensor:
        with torch.no_grad():
            return model_logits(self.model, batch)

    def block_logits(self, batch: Batch, split: str) -> BlockLogits:
        """The head applied to the rows' final hidden states (a GPT or a ``transformers`` causal LM): the teacher's
        full logits never exist; other models fall back to slicing :meth:`logits`."""
        if output_head(self.model) is None:
            return super().block_logits(batch, split)
        with torch.no_grad():
            if not self.head_checked:
                check_head_gives_logits(self.model, batch)
                self.head_checked = True
            hidden, head = hidden_and_head(self.model, batch)
        flat = hidden.flatten(0, -2)

        def rows_logits(rows: slice, student_logits: Tensor) -> Tensor:
            with torch.no_grad():
                return head(flat[rows])

        return rows_logits

    def forward(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(inputs)

    def train(self, mode: bool = True) -> LiveTeacher:
        """Stays in eval mode whatever ``mode`` is (BatchNorm statistics and dropout are frozen)."""
        return super().train(False)


def as_teacher(teacher: Teacher | nn.Module | None) -> Teacher | None:
    """``teacher`` as a :class:`Teacher`: a plain network becomes a :class:`LiveTeacher`."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return LiveTeacher(teacher)
