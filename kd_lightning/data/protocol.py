"""What kd_lightning reads of a DataModule, declared: Lightning's hooks, and optional attributes that say more.

Any ``LightningDataModule`` serves (``train_dataloader`` and friends, batches as dicts or ``(x, y)`` tuples). The
attributes below are optional: a DataModule without one gets the default named; the built-in DataModules have the ones
that fit them. The library reads each where it is needed (``getattr(datamodule, name, default)``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class DistillationData(Protocol):
    """The optional attributes of a DataModule that kd_lightning reads (all of them optional; defaults in brackets).

    Attributes:
        task: ``"classification"`` (one label per sample) or ``"tokens"`` (one label per token) [classification].
        splits: ``{split: data}`` held in memory, with ``targets``; lets a run check recordings and prompts before
            training (:class:`~kd_lightning.data.InMemoryDataModule`) [none: checked on the first batch].
        tokenizer: the tokenizer of token data (a ``transformers`` tokenizer) [none].
        pretrained: the folder or hub id the tokenizer was read from [none].
        packing: whether rows pack several examples (``data.packing=true``) [False].
        exact_match: whether the task has answers checked by greedy decoding (``{split}/exact_match``) [False].
    """

    task: str
    splits: dict[str, Any]
    tokenizer: Any
    pretrained: str | None
    packing: bool
    exact_match: bool

    def pad_id(self) -> int:
        """The id padding is filled with (token data; on-policy samples and exact match pad with it)."""

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A small input batch, for checks that run the models before training (class counts, feature layers)."""

    def save_tokenizer(self, folder: Path) -> None:
        """Write the tokenizer where ``export --format hf`` finds it (``<run dir>/tokenizer``)."""

    def teacher_view(self) -> AbstractContextManager[None]:
        """A block in which training sees the teacher stage's data: every label (a transfer set), or demonstrations of
        its own (the slippery walk's, with slips)."""

    def rollouts(self, model: Any) -> dict[str, float]:
        """Metrics of ``model`` acting in the task's environment (the slippery walk's success with slips), added to
        each stage's test metrics as ``test/<name>`` (and ``test/teacher_<name>`` for a teacher in this process)."""
