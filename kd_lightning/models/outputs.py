"""Logits from any model: a plain ``nn.Module`` returning a tensor, or a Hugging Face model returning an output object;
and, for the chunked loss, a language model's final hidden states and output head."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.data.batch import Batch
from kd_lightning.errors import KDError

PASSED_ALONG = ("attention_mask", "position_ids")  # batch fields a model gets when its forward takes them


@functools.lru_cache(maxsize=None)
def _forward_takes(model_type: type, name: str) -> bool:
    """Whether ``model_type.forward`` accepts the argument ``name`` (Hugging Face models take ``attention_mask`` and
    ``position_ids``; :class:`~kd_lightning.models.GPT` takes ``position_ids``)."""
    try:
        return name in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def _passed_along(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The batch's ``attention_mask`` and ``position_ids`` that ``model`` takes, and ``use_cache=False`` for a model
    that would keep a key-value cache (a whole sequence is read at once; with a cache transformers also stops reading
    packed rows by their ``position_ids``). Packed rows are refused for a model that cannot take ``position_ids``,
    rather than read as one long sequence."""
    if "position_ids" in batch and not _forward_takes(type(model), "position_ids"):
        raise KDError(
            f"the batch is packed (data.packing=true) but {type(model).__name__}.forward takes no position_ids, so "
            "its examples would attend to each other; set data.packing=false."
        )
    along: dict[str, Any] = {
        name: batch[name] for name in PASSED_ALONG if name in batch and _forward_takes(type(model), name)
    }
    return along | ({"use_cache": False} if _forward_takes(type(model), "use_cache") else {})


def model_logits(model: nn.Module, batch: Batch) -> Tensor:
    """``model(batch["inputs"])`` as logits ``(N, C)`` / ``(N, L, V)``.

    ``batch["attention_mask"]`` and ``batch["position_ids"]`` are passed along to a model whose ``forward`` takes
    them; an output object with a ``logits`` field (``transformers``' ``CausalLMOutput``) gives that field.
    """
    output = model(batch["inputs"], **_passed_along(model, batch))
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise KDError(
            f"{type(model).__name__} returned a {type(output).__name__}, not logits: return a tensor, or an "
            "output with a .logits field (as transformers models do)."
        )
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
    ``head(hidden)`` are its logits without ever being built whole (:mod:`kd_lightning.loss.chunked`)."""
    head = output_head(model)
    if head is None:
        raise KDError(
            f"speed.chunk_rows needs the student's final hidden states and output head; {type(model).__name__} "
            "has neither hidden_states() and head (as kd_lightning.models.GPT) nor get_output_embeddings() "
            "(as transformers causal LMs). Unset speed.chunk_rows."
        )
    along = _passed_along(model, batch)
    if callable(getattr(model, "hidden_states", None)):
        return model.hidden_states(batch["inputs"], **along), head
    return model.base_model(input_ids=batch["inputs"], **along).last_hidden_state, head


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
        raise KDError(
            f"{type(model).__name__}'s output head applied to its final hidden states does not give its logits "
            "(the model changes them after the head); unset speed.chunk_rows."
        )


def _input_rows(model: nn.Module) -> int:
    """How many token ids ``model`` reads (its input embedding's rows)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    table = embeddings() if callable(embeddings) else getattr(model, "token_embedding", None)
    return table.num_embeddings if isinstance(table, nn.Embedding) else 2


def check_packing(model: nn.Module, role: str) -> None:
    """``data.packing=true``: in eval mode, two short random examples packed into one row (``position_ids`` restarting
    at 0) must give ``model`` the logits each gives alone; else its examples would attend to each other."""
    if not _forward_takes(type(model), "position_ids"):
        raise KDError(
            f"data.packing=true needs models that take position_ids; the {role} ({type(model).__name__}) does "
            "not; set data.packing=false."
        )
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(_input_rows(model), (1, n), generator=generator) for n in (5, 3))
    device = next(model.parameters()).device
    row = {
        "inputs": torch.cat([first, second], 1).to(device),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device),
    }
    training = model.training
    try:
        with torch.no_grad():
            packed = model_logits(model.eval(), row).float()
            alone = torch.cat([model_logits(model, {"inputs": part.to(device)}).float() for part in (first, second)], 1)
    finally:
        model.train(training)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    if not torch.allclose(packed, alone, rtol=tolerance, atol=tolerance):
        raise KDError(
            f"the {role} ({type(model).__name__}) does not keep attention inside each packed example: a packed "
            "row gives other logits than its examples alone (an attention implementation that ignores "
            "position_ids?); set data.packing=false."
        )
