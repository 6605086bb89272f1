"""The live teacher: a frozen network run on every batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.loss.chunked import TeacherBlocks
from kd_lightning.models.outputs import check_head_gives_logits, hidden_and_head, model_logits, output_head
from kd_lightning.teacher.interface import Teacher


class LiveTeacher(Teacher):
    """A frozen network run on every batch: ``requires_grad=False``, always in eval mode, under ``no_grad``."""

    def __init__(self, model: nn.Module, trained_here: bool = False) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.trained_here = trained_here
        self.head_checked = False

    def logits(self, batch: Batch, split: str) -> Tensor:
        with torch.no_grad():
            return model_logits(self.model, batch)

    def training_logits(self, batch: Batch, blockwise: bool = False) -> Tensor | TeacherBlocks:
        """Blockwise, for a GPT or a ``transformers`` causal LM: the head applied to the rows' final hidden states, so
        the teacher's full logits never exist; otherwise (and for other models) :meth:`logits`."""
        if not blockwise or output_head(self.model) is None:
            return self.logits(batch, "train")
        with torch.no_grad():
            if not self.head_checked:
                check_head_gives_logits(self.model, batch)
                self.head_checked = True
            hidden, head = hidden_and_head(self.model, batch)
        flat = hidden.flatten(0, -2)

        def rows_logits(rows: slice, student_logits: Tensor) -> Tensor:
            with torch.no_grad():
                return head(flat[rows])

        return TeacherBlocks(rows_logits)

    @property
    def network(self) -> nn.Module:
        return self.model

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
