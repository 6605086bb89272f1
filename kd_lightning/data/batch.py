"""The batch: what one step sees, as named fields.

Every built-in DataModule yields a :class:`Batch`; every hook of the library reads it by name.
A user's DataModule may keep yielding ``(x, y)`` or ``(x, y, index)`` tuples: :func:`as_batch`
is the one place they are converted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from torch import Tensor

from kd_lightning.errors import KDError


class Batch(TypedDict, total=False):
    """Named fields of one batch (a plain ``dict`` at run time; Lightning moves it to the device).

    Keys:
        inputs: ``(N, ...)`` model inputs (images, or token ids ``(N, L)``).
        labels: ``(N,)`` class indices, or ``(N, L)`` token labels (``-100`` = ignored).
        index: ``(N,)`` each sample's position in its split (a recorded teacher looks it up).
        view: ``(N,)`` which recorded augmentation view of each sample the inputs show.
        attention_mask: ``(N, L)`` 1 where a token is real, 0 for padding.
        position_ids: ``(N, L)`` each token's position in its own example, for rows that pack several (chat data with
            ``data.packing=true``); passed to models that take them.
        kept: ``(N, L)`` bool, the tokens that count (label not ``-100``, attention mask 1); derived once per step
            by :func:`as_batch` for token batches, never given by a DataModule.
        step_batches: every batch of this training batch's optimizer step (``speed.generate_per_step``: their
            completions are sampled in one call); ``step_position`` is this batch's place among them.
    """

    inputs: Tensor
    labels: Tensor
    index: Tensor
    view: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    kept: Tensor
    step_batches: list[Batch]
    step_position: int


TUPLE_FIELDS = ("inputs", "labels", "index")
IGNORE_INDEX = -100  # a label that does not count (PyTorch's and Hugging Face's convention)
__all__ = ["IGNORE_INDEX", "Batch", "as_batch", "kept_labels", "kept_positions"]


def kept_labels(labels: Tensor) -> Tensor:
    """True where a label is kept: every label but :data:`IGNORE_INDEX`. The one test of "does this position count",
    for the batch, the objectives (DKD) and the recordings."""
    return labels != IGNORE_INDEX


def kept_positions(batch: Batch) -> Tensor | None:
    """``(N, L)`` bool, True where a token is kept (counts): its label is not ``-100`` and its attention mask (when
    present) is 1; ``None`` for a batch of class labels ``(N,)``, where every sample counts. A batch read by
    :func:`as_batch` holds it as ``batch["kept"]``."""
    if "kept" in batch:
        return batch["kept"]
    labels, attention_mask = batch.get("labels"), batch.get("attention_mask")
    if labels is None or labels.ndim < 2:
        return None
    kept = kept_labels(labels)
    return kept if attention_mask is None else kept & attention_mask.to(bool)


def as_batch(batch: Any) -> Batch:
    """A :class:`Batch` from a mapping with ``inputs`` (and ``labels``), or an ``(x, y[, index])`` tuple."""
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise KDError(f"a batch mapping needs an 'inputs' entry (and 'labels'); got keys {sorted(batch)}.")
        return with_kept(batch)  # type: ignore[arg-type]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and 2 <= len(batch) <= len(TUPLE_FIELDS):
        return with_kept(Batch(**dict(zip(TUPLE_FIELDS, batch))))
    raise KDError(
        f"cannot read a batch of type {type(batch).__name__}: yield a dict with 'inputs' and 'labels', "
        "or an (inputs, labels) / (inputs, labels, index) tuple."
    )


def with_kept(batch: Batch) -> Batch:
    """``batch`` with its ``kept`` tokens (a new dict; a batch of class labels is returned as it is)."""
    kept = kept_positions(batch)
    return batch if kept is None or "kept" in batch else {**batch, "kept": kept}
