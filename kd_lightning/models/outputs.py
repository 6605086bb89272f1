"""Logits from any model: a plain ``nn.Module`` returning a tensor, or a Hugging Face model returning an output object."""

from __future__ import annotations

import functools
import inspect

from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.errors import KDError


@functools.lru_cache(maxsize=None)
def takes_attention_mask(model_type: type) -> bool:
    """Whether ``model_type.forward`` accepts ``attention_mask`` (Hugging Face models do)."""
    try:
        return "attention_mask" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def model_logits(model: nn.Module, batch: Batch) -> Tensor:
    """``model(batch["inputs"])`` as logits ``(N, C)`` / ``(N, L, V)``.

    ``batch["attention_mask"]`` is passed along to a model whose ``forward`` takes one; an output
    object with a ``logits`` field (``transformers``' ``CausalLMOutput``) gives that field.
    """
    if "attention_mask" in batch and takes_attention_mask(type(model)):
        output = model(batch["inputs"], attention_mask=batch["attention_mask"])
    else:
        output = model(batch["inputs"])
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise KDError(f"{type(model).__name__} returned a {type(output).__name__}, not logits: return a tensor, or an "
                      "output with a .logits field (as transformers models do).")
    return logits
