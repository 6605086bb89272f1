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

Checkpoints (:class:`ShardedStrategy`): gathered into one ``last.ckpt`` file by rank 0, or, with
``trainer.strategy.save_distributed_checkpoint=true``, a distributed checkpoint: ``last.ckpt`` is a folder where each
rank writes its own shards (``torch.distributed.checkpoint``), nothing gathered. Either holds the student, any feature
adapters and the optimizer state, never the frozen teacher, and is complete or absent: written beside and renamed into
place. ``python -m kd_lightning export`` consolidates a distributed one into a plain state dict or a transformers folder.
"""

from __future__ import annotations

from pathlib import Path
from types import MethodType
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from kd_lightning.errors import KDError
from kd_lightning.files import remove, replace_path


def is_sharding(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (``trainer=fsdp``: :class:`ShardedStrategy`)."""
    return isinstance(strategy, ModelParallelStrategy)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (``trainer=fsdp``), whose checkpoints leave the frozen teacher out (it is
    neither gathered nor written at a save, nor asked for at a resume) and are never half written: a distributed
    checkpoint (``save_distributed_checkpoint=True``, a folder of every rank's shards) is written to
    ``.<name>.partial`` beside its path and renamed into place once every rank has written its part; a file is written
    by rank 0 beside its path and renamed over it."""

    def trained_modules(self) -> nn.Module:
        """The module's children that a checkpoint holds: all but the teacher (the same names, so the same keys)."""
        return nn.ModuleDict(
            {name: child for name, child in self.lightning_module.named_children() if name != "teacher"}
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = not self._save_distributed_checkpoint  # gathered onto rank 0, else each rank's shards
        return get_model_state_dict(
            self.trained_modules(), options=StateDictOptions(full_state_dict=whole, cpu_offload=True)
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        if not self._save_distributed_checkpoint and not path.is_dir():
            return super().save_checkpoint(checkpoint, path, storage_options)  # one file, written atomically by rank 0
        written = path.with_name(f".{path.name}.partial")
        if self.is_global_zero:
            remove(written)  # left by a process killed while writing
        self.barrier("partial checkpoint cleared")
        super().save_checkpoint(checkpoint, written, storage_options)
        self.barrier("checkpoint written")
        if self.is_global_zero:
            replace_path(written, path)
        self.barrier("checkpoint in place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.strategies.model_parallel import _load_checkpoint

        state = {
            "state_dict": self.trained_modules(),
            **{f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)},
        }
        return _load_checkpoint(
            Path(self.broadcast(checkpoint_path)),
            state,
            strict=True,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a language model: ``GPT.blocks``, or a transformers decoder's layers."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return list(model.blocks)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def shard(
    model: nn.Module, mesh: Any, role: str, chunked: bool, dtype: str | None = None, generate_whole: bool = False
) -> None:
    """``fully_shard`` each block of ``model``, then its root, over ``mesh`` (the data-parallel ranks); ``dtype``
    (``speed.shard_dtype``): gather the parameters in it and compute in it, reduce gradients in float32.
    ``generate_whole`` (``speed.generate_whole``): keep a :class:`WholeCopy` of it to generate with."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if generate_whole:
        model.whole_copy = WholeCopy(model, dtype)  # a plain attribute: not a submodule, not in any state dict
    units = blocks(model)
    if not units:
        raise KDError(
            f"trainer=fsdp shards a model by its transformer blocks, and the {role} ({type(model).__name__}) has "
            "none that kd_lightning knows (GPT.blocks, a transformers decoder's layers); use trainer=ddp."
        )
    own = callable(getattr(type(model), "hidden_states", None))  # kd_lightning.models.GPT
    if chunked and not own:
        if not isinstance(getattr(model, "base_model", None), nn.Module) or model.base_model is model:
            raise KDError(
                f"trainer=fsdp with speed.chunk_rows reads the {role}'s hidden states apart from its forward, "
                f"which kd_lightning can gather for GPT and transformers causal LMs, not {type(model).__name__}; "
                "unset speed.chunk_rows or use trainer=ddp."
            )
        model.hidden_states = MethodType(_base_model_hidden_states, model)  # a root method FSDP can gather for
    policy = (
        MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        if dtype
        else MixedPrecisionPolicy()
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ("hidden_states", "generate") if own else ("hidden_states",) if chunked else ():
        register_fsdp_forward_method(model, method)  # they read the root's parameters outside forward


class WholeCopy:
    """An unsharded copy of a model made before it was sharded, for ``generate()`` (``speed.generate_whole``): before
    each use its weights are refilled from the shards, all gathered at once (every process must call), and it then
    generates with no communication, each process at its own pace. The same tokens as generating sharded (FSDP
    gathering each block at every new token), faster where the many small gathers dominate; the cost is the whole
    model on every device beside its shard (``benchmarks/sharded_generation.py`` measures both)."""

    def __init__(self, model: nn.Module, dtype: str | None = None) -> None:
        import copy

        import torch

        self.model = copy.deepcopy(model)
        if dtype is not None:  # computed in the dtype the shards are gathered in, as sharded
            self.model.to(getattr(torch, dtype))

    def refilled(self, sharded: nn.Module) -> nn.Module:
        """The copy holding ``sharded``'s current weights, on their device."""
        weights = full_state_dict(sharded)
        self.model.to(next(iter(weights.values())).device)
        self.model.load_state_dict(weights)
        return self.model


def for_generation(model: nn.Module) -> nn.Module:
    """What generates for ``model``: its :class:`WholeCopy`, refilled, when it keeps one, else ``model`` itself."""
    whole = getattr(model, "whole_copy", None)
    return whole.refilled(model) if isinstance(whole, WholeCopy) and is_sharded(model) else model


def _base_model_hidden_states(model: nn.Module, input_ids: Any, **along: Any) -> Any:
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
