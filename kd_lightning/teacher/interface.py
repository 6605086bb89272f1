"""The teacher's interface: one question, "the teacher's logits for this batch", answered live or from a recording."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.chunked import TeacherBlocks
from kd_lightning.data.batch import Batch


class Teacher(nn.Module):
    """Answers one question: the teacher's logits ``(N, C)`` (``(N, L, V)`` for tokens) for a batch of a split.

    Subclasses implement :meth:`logits`; they hold no trainable parameters, never appear in a checkpoint, and
    ``split`` is ``train``, ``val`` or ``test``.
    """

    # trained in this run's teacher stage on this data: for tokens, its output rows beyond the tokenizer's are padding
    # by construction, dropped without checking that it puts no probability there (an untrained row may hold some)
    trained_here: bool = False

    def logits(self, batch: Batch, split: str) -> Tensor:
        raise NotImplementedError

    def training_logits(self, batch: Batch, blockwise: bool = False) -> Tensor | TeacherBlocks:
        """The logits training compares the student with. A teacher may answer by row of the flattened positions
        (:class:`~kd_lightning.chunked.TeacherBlocks`): for the chunked loss (``blockwise``), so that its whole logits
        never exist, or because it completes them from the student's (a top-k recording). This default: :meth:`logits`."""
        return self.logits(batch, "train")


def as_teacher(teacher: Teacher | nn.Module | None) -> Teacher | None:
    """``teacher`` as a :class:`Teacher`: a plain network becomes a :class:`~kd_lightning.teacher.LiveTeacher`."""
    from kd_lightning.teacher.live import LiveTeacher

    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return LiveTeacher(teacher)
