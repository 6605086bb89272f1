"""Logits from any model: a plain ``nn.Module`` returning a tensor, or a Hugging Face model returning an output object;
and, for the chunked loss, a language model's final hidden states and output head."""

from __future__ import annotations

import functools
import inspect

import torch
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


def output_head(model: nn.Module) -> nn.Module | None:
    """A language model's output head (``H -> V``): ``head`` of a model with ``hidden_states(tokens)``
    (:class:`~kd_lightning.models.GPT`), a ``transformers`` causal LM's ``get_output_embeddings()``; else ``None``."""
    if callable(getattr(model, "hidden_states", None)) and isinstance(getattr(model, "head", None), nn.Module):
        return model.head
    embeddings = getattr(model, "get_output_embeddings", None)
    head = embeddings() if callable(embeddings) and isinstance(getattr(model, "base_model", None), nn.Module) else None
    return head if isinstance(head, nn.Linear) else None


def hidden_and_head(model: nn.Module, batch: Batch) -> tuple[Tensor, nn.Module]:
    """A language model's final hidden states ``(N, L, H)`` for ``batch["inputs"]`` and its :func:`output_head`, so that
    ``head(hidden)`` are its logits without ever being built whole (:mod:`kd_lightning.chunked`)."""
    head = output_head(model)
    if head is None:
        raise KDError(f"distill.chunk_rows needs the student's final hidden states and output head; {type(model).__name__} "
                      "has neither hidden_states() and head (as kd_lightning.models.GPT) nor get_output_embeddings() "
                      "(as transformers causal LMs). Unset distill.chunk_rows.")
    if callable(getattr(model, "hidden_states", None)):
        return model.hidden_states(batch["inputs"]), head
    mask = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    return model.base_model(input_ids=batch["inputs"], **mask).last_hidden_state, head


def check_head_gives_logits(model: nn.Module, batch: Batch) -> None:
    """On the first sequence, in eval mode: ``head(hidden)`` equals the model's logits (a model that scales or caps its
    logits after the head, e.g. Gemma 2's soft-capping, cannot use the chunked loss)."""
    first = {key: value[:1] for key, value in batch.items() if isinstance(value, Tensor)}
    training = model.training
    try:
        with torch.no_grad():
            hidden, head = hidden_and_head(model.eval(), first)
            agree = torch.allclose(head(hidden).float(), model_logits(model, first).float(), rtol=1e-4, atol=1e-4)
    finally:
        model.train(training)
    if not agree:
        raise KDError(f"{type(model).__name__}'s output head applied to its final hidden states does not give its logits "
                      "(the model changes them after the head); unset distill.chunk_rows.")
