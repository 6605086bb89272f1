"""Sharded distillation (``trainer=fsdp``): FSDP2's ``fully_shard`` under Lightning's ``ModelParallelStrategy``.

Each of the ``N`` data-parallel ranks holds ``1/N`` of the student's parameters, gradients and optimizer state, and
(``teacher.shard=true``) ``1/N`` of the frozen teacher's parameters; a unit's parameters are gathered for its forward
(and backward) and freed after. The units are each transformer block, then the rest of the model (embeddings, final
norm, output head) at the root. The teacher's units have no gradients and no optimizer state; it never trains.
``teacher.shard=false`` keeps a whole teacher on every rank (no gathering: faster for a teacher that fits).

The chunked loss reads a model's final hidden states and output head apart from its ``forward``, and generation
(on-policy samples, exact match) runs ``generate()``: the built-in ``GPT``'s ``hidden_states()`` and ``generate()``
are registered as forward methods of the root unit, so its parameters are gathered for them (and stay gathered for
the head, which lives in the same unit). A sharded transformers model under the chunked loss gains such a
``hidden_states()`` (its decoder's output), registered the same way: the head's weight is gathered whole once per
step with the root unit, and every block of tokens is computed against it. A transformers model's ``generate()``
calls its ``forward``.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from torch import nn

from kd_lightning.errors import KDError


def is_sharding(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (``trainer=fsdp``)."""
    return type(strategy).__name__ == "ModelParallelStrategy"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a language model: ``GPT.blocks``, or a transformers decoder's layers."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return list(model.blocks)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def shard(model: nn.Module, mesh: Any, role: str, chunked: bool, dtype: str | None = None) -> None:
    """``fully_shard`` each block of ``model``, then its root, over ``mesh`` (the data-parallel ranks); ``dtype``
    (``speed.shard_dtype``): gather the parameters in it and compute in it, reduce gradients in float32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    units = blocks(model)
    if not units:
        raise KDError(f"trainer=fsdp shards a model by its transformer blocks, and the {role} ({type(model).__name__}) has "
                      "none that kd_lightning knows (GPT.blocks, a transformers decoder's layers); use trainer=ddp.")
    own = callable(getattr(type(model), "hidden_states", None))  # kd_lightning.models.GPT
    if chunked and not own:
        if not isinstance(getattr(model, "base_model", None), nn.Module) or model.base_model is model:
            raise KDError(f"trainer=fsdp with speed.chunk_rows reads the {role}'s hidden states apart from its forward, "
                          f"which kd_lightning can gather for GPT and transformers causal LMs, not {type(model).__name__}; "
                          "unset speed.chunk_rows or use trainer=ddp.")
        model.hidden_states = MethodType(base_model_hidden_states, model)  # a root method FSDP can gather for
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ("hidden_states", "generate") if own else ("hidden_states",) if chunked else ():
        register_fsdp_forward_method(model, method)  # they read the root's parameters outside forward


def base_model_hidden_states(model: nn.Module, input_ids: Any, **along: Any) -> Any:
    """A transformers causal LM's final hidden states ``(N, L, H)``: its decoder's output, as the chunked loss reads it."""
    return model.base_model(input_ids=input_ids, **along).last_hidden_state


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``DTensor``)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model``'s whole weights on every rank (gathered from the shards when it is sharded: every rank must call)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank gets all of it
