"""Speed switches (``speed`` in the config): ``torch.compile`` of student and teacher, channels-last memory, the
chunked loss of language models.

None of them changes what is computed, only how: a compiled or channels-last step gives the eager
step's results within float rounding (``tests/test_speed.py``).

- ``speed.compile=true`` compiles the student's and the live teacher's ``forward`` in place
  (``nn.Module.compile``: parameter names and checkpoints stay as they are) with
  ``speed.compile_mode``: ``default``, ``reduce-overhead`` (CUDA graphs: the step replayed as one
  graph, for small networks bound by kernel launches; needs static shapes, so set
  ``data.drop_last=true``) or ``max-autotune``. On a CPU inductor generates C++ (a compiler is needed).
- ``speed.channels_last=true`` stores 4-D weights and image batches as NHWC, the layout GPU
  convolution kernels prefer.
- ``speed.chunk_rows=R`` (language models) evaluates the training loss R tokens at a time from the
  student's final hidden states and output head (:mod:`kd_lightning.loss.chunked`): the same loss and
  gradients without the whole ``(N·L, V)`` logits of either model; ``auto``: the rows chosen from the
  vocabulary (:func:`~kd_lightning.loss.chunked.default_chunk_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kd_lightning.errors import KDError, check_integer

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SHARD_DTYPES = (None, "bfloat16", "float16")


@dataclass(frozen=True)
class SpeedSettings:
    """``speed``: how the networks run. Checked when the config is read."""

    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    chunk_rows: int | str | None = None  # tokens per block, "auto", or None (the plain loss)
    shard_dtype: str | None = None  # trainer=fsdp: the dtype parameters are gathered and computed in
    generate_whole: bool = False  # trainer=fsdp: the student generates through a whole copy, gathered once per call
    generate_per_step: bool = False  # sampled completions: each optimizer step's in one call per model

    def __post_init__(self) -> None:
        for key in ("compile", "channels_last", "generate_whole", "generate_per_step"):
            if not isinstance(getattr(self, key), bool):
                raise KDError(f"speed.{key} must be true or false, got {getattr(self, key)!r}.")
        if self.compile_mode not in COMPILE_MODES:
            raise KDError(f"speed.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}.")
        if self.chunk_rows is not None and self.chunk_rows != "auto":
            check_integer("speed.chunk_rows", self.chunk_rows, fix=" (tokens per block), auto or null")
        if self.shard_dtype not in SHARD_DTYPES:
            raise KDError(
                f"speed.shard_dtype must be null, bfloat16 or float16, got {self.shard_dtype!r}: the dtype "
                "trainer=fsdp gathers the sharded parameters in."
            )

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in the chosen memory format, its ``forward`` compiled (in place; returns ``model``)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile(mode=None if self.compile_mode == "default" else self.compile_mode)
        return model

    def memory_format(self) -> torch.memory_format | None:
        """The memory format image batches should have (``None``: leave them as they are)."""
        return torch.channels_last if self.channels_last else None


def check_chunk_rows(chunk_rows: int | str | None, task: str, with_features: bool) -> None:
    """``chunk_rows``: ``None``, or a positive count of tokens per block (or ``auto``) for a language model without
    feature terms."""
    if chunk_rows is None:
        return
    SpeedSettings(chunk_rows=chunk_rows)
    if task != "tokens":
        raise KDError("speed.chunk_rows is for language models (task=tokens), whose logits are (N, L, V); unset it.")
    if with_features:
        raise KDError(
            "speed.chunk_rows cannot be combined with distill.features (the chunked loss sees the logits "
            "of one block of tokens at a time); unset one of them."
        )
