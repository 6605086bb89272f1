"""The teacher's interface: what the module may ask of any teacher, wherever it lives."""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.loss.chunked import TeacherBlocks


class Teacher(nn.Module):
    """What :class:`~kd_lightning.DistillationModule` may ask of a teacher, and all it asks:

    - :meth:`logits`: its logits ``(N, C)`` (``(N, L, V)`` for tokens) for a batch of a split;
    - :meth:`training_logits`: the logits training compares the student with (by row block, if it likes);
    - :attr:`network`: the network behind the answers, when one runs in this process: what generates and scores the
      student's samples (on-policy distillation, exact match, sample scores), what feature terms hook and what
      ``trainer=fsdp`` shards. ``None`` for a teacher that only answers logits (a recording);
    - :attr:`scores_new_sequences`: whether it can answer for sequences that did not exist before the run (the
      student's own samples).

    A new kind of teacher is a subclass that implements :meth:`logits` (and :attr:`network` if it has one); the module
    never asks which class it is. Teachers hold no trainable parameters, never appear in a checkpoint, and ``split`` is
    ``train``, ``val`` or ``test``.
    """

    # trained in this run's teacher stage on this data: for tokens, its output rows beyond the tokenizer's are padding
    # by construction, dropped without checking that it puts no probability there (an untrained row may hold some)
    trained_here: bool = False

    def logits(self, batch: Batch, split: str) -> Tensor:
        raise NotImplementedError

    def training_logits(self, batch: Batch, blockwise: bool = False) -> Tensor | TeacherBlocks:
        """The logits training compares the student with. A teacher may answer by row of the flattened positions
        (:class:`~kd_lightning.loss.chunked.TeacherBlocks`): for the chunked loss (``blockwise``), so that its whole logits
        never exist, or because it completes them from the student's (a top-k recording). This default: :meth:`logits`."""
        return self.logits(batch, "train")

    @property
    def network(self) -> nn.Module | None:
        """The network behind the answers, when it runs in this process (``None``: this teacher answers logits only)."""
        return None

    @property
    def scores_new_sequences(self) -> bool:
        """Whether :meth:`logits` answers for any token ids, the student's samples too (default: when it has a network)."""
        return self.network is not None
