"""Pretrained ``transformers`` causal LMs, read with ``from_pretrained`` from a folder or a hub id (``teacher=hf``,
``student=hf``; the ``lm`` extra).

A model read this way already has its weights: as the teacher it is distilled from as it is (no teacher stage,
nothing trained or cached for it) unless ``teacher.fit.pretrained=true`` asks to fine-tune it on the run's data
first. Its tokenizer, in the same folder, is the run's (``data.tokenizer``, default the teacher's folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kd_lightning.errors import KDError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def offline() -> bool:
    """Whether the hub cannot be reached (``HF_HUB_OFFLINE=1``): then only local folders and the local cache are read."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _where_looked(path: str) -> str:
    """Where ``from_pretrained`` looked for ``path``: the folder, or for a hub id the local cache (and the hub)."""
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return f"the folder {Path(path).expanduser().resolve()}"
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"the hub cache {HF_HUB_CACHE}" + (
        " (offline: HF_HUB_OFFLINE=1)" if offline() else " and the Hugging Face hub"
    )


def pretrained_causal_lm(
    path: str,
    dtype: str = "float32",
    revision: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, ...)`` in train mode (``from_pretrained`` returns eval mode, in
    which a student would train with its dropout off), every problem as one line.

    Args:
        path: a folder written by ``save_pretrained``, or a hub id (read from the local cache when offline).
        dtype: ``float32``, ``bfloat16`` or ``float16``: the precision the weights are held in (a teacher may be held
            lower than the student, which trains under ``trainer.precision``).
        revision: a hub branch, tag or commit.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ...; ``None``: transformers' choice.
        trust_remote_code: run the model code a folder or hub repository ships (off unless asked).
    """
    try:
        import torch
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise KDError("pretrained models need the transformers package: pip install 'kd_lightning[lm]'.") from None
    if dtype not in DTYPES:
        raise KDError(f"the model's dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if not isinstance(path, str) or not path:
        raise KDError("set the pretrained model's path: teacher.model.path=DIR_OR_HUB_ID (or student.model.path=...).")
    options = {"revision": revision, "trust_remote_code": bool(trust_remote_code)} | (
        {"local_files_only": True} if offline() else {}
    )
    try:
        config = AutoConfig.from_pretrained(path, **options)
    except OSError as error:
        raise KDError(
            f"no pretrained model at {path!r}: looked in {_where_looked(path)} ({_first_line(error)}); point "
            "model.path at a folder written by save_pretrained (config.json and the weights), or a hub id in "
            "the local cache."
        ) from None
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise KDError(
                f"{path} ships its own model code, which runs only with trust_remote_code=true; read that code, "
                "then set model.trust_remote_code=true."
            ) from None
        raise KDError(f"{path} holds no model transformers knows ({_first_line(error)}).") from None
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise KDError(
            f"{path} ships its own model code, which runs only with trust_remote_code=true; read that code, then "
            "set model.trust_remote_code=true."
        )
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model would break the run's log lines
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=getattr(torch, dtype), **options, **kwargs
        )
    except (OSError, ValueError) as error:
        raise KDError(
            f"cannot read the pretrained model at {path!r} ({_first_line(error)}); it needs its weights "
            "(model.safetensors or pytorch_model.bin) beside config.json."
        ) from None
    except torch.OutOfMemoryError:
        raise
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise KDError(
            f"the weights of the pretrained model at {path!r} are unreadable ({_first_line(error)}): a file cut short "
            "or not written by save_pretrained; write the folder again with save_pretrained (or download it again)."
        ) from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return model.train()


def pretrained_tokenizer(
    path: str, revision: str | None = None, trust_remote_code: bool = False, vocab_size: int | None = None
) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, every problem as one line; with ``vocab_size`` (``data.vocab_size``),
    refused unless it has that many tokens."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise KDError(
            "a pretrained tokenizer needs the transformers package: pip install 'kd_lightning[lm]'."
        ) from None
    options = {"revision": revision, "trust_remote_code": bool(trust_remote_code)} | (
        {"local_files_only": True} if offline() else {}
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except (OSError, ValueError, TypeError) as error:
        raise KDError(
            f"no tokenizer at {path!r}: looked in {_where_looked(path)} ({_first_line(error)}); the model folder "
            "needs its tokenizer files (tokenizer.json, tokenizer_config.json: save_pretrained them with the model), "
            "or point data.tokenizer at a folder that has them."
        ) from None
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise KDError(
            f"data.vocab_size={vocab_size} but the tokenizer {path} has {len(tokenizer)} tokens; set "
            f"data.vocab_size={len(tokenizer)}."
        )
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``tokenizer.save_pretrained`` into ``folder``, atomically (a killed run leaves the earlier folder or none)."""
    from kd_lightning.files import atomic_directory

    with atomic_directory(folder) as tmp:
        tokenizer.save_pretrained(tmp)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_pretrained(where: str, node: Any) -> None:
    """Before anything is built: a pretrained model config (``<where>``) names a dtype we know and a model that is
    there (for a folder: ``config.json`` and its weights; the model code it ships only with ``trust_remote_code``)."""
    if not is_pretrained(node):
        return
    path, dtype = node.get("path"), node.get("dtype", "float32")
    if dtype not in DTYPES:
        raise KDError(f"{where}.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if not path:
        raise KDError(f"set {where}.path to the pretrained model: a folder written by save_pretrained, or a hub id.")
    folder = Path(str(path)).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise KDError(
                f"{where}.path={path} holds no model (no config.json in {folder.resolve()}); point it at a folder "
                "written by save_pretrained."
            )
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise KDError(
                f"{where}.path={path}: its config.json is unreadable ({_first_line(error)}); write the folder again "
                "with save_pretrained."
            ) from None
        if not isinstance(config, dict):
            raise KDError(
                f"{where}.path={path}: its config.json holds {type(config).__name__}, not a model's settings; write "
                "the folder again with save_pretrained."
            )
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise KDError(
                f"{where}.path={path} holds a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                "save the model with save_pretrained, weights included."
            )
        for weights in sorted(folder.glob("*.safetensors")):
            _check_safetensors(where, path, weights)
    elif str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:  # a path, not a hub id (owner/name)
        raise KDError(
            f"{where}.path={path}: no such folder (looked in {folder.resolve()}); point it at a folder written "
            "by save_pretrained, or a hub id."
        )


def _check_safetensors(where: str, path: Any, weights: Path) -> None:
    """A ``.safetensors`` file whose header is whole and covers the file (one cut short fails here), read without
    loading a tensor."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise KDError(
            f"{where}.path={path}: {weights.name} is unreadable ({_first_line(error)}): a file cut short or not written "
            "by save_pretrained; write the folder again with save_pretrained (or download it again)."
        ) from None


def pretrained_fingerprint(node: Any) -> str:
    """What a pretrained model's outputs depend on, for cache keys (a recording of it): for a folder the SHA-256 of its
    config and weight files, for a hub id the id and revision; and the dtype it is held in."""
    folder = Path(str(node.get("path"))).expanduser()
    if folder.is_dir():
        from kd_lightning.files import file_sha256

        files = sorted(
            path for path in folder.iterdir() if path.name == "config.json" or path.suffix in (".safetensors", ".bin")
        )
        digest = hashlib.sha256("".join(f"{path.name}:{file_sha256(path)};" for path in files).encode()).hexdigest()
        return f"{digest[:16]}-{node.get('dtype', 'float32')}"
    return f"{node.get('path')}@{node.get('revision') or 'main'}-{node.get('dtype', 'float32')}"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def is_pretrained(model_config: Any) -> bool:
    """Whether a model config (``teacher.model``) reads its weights with ``from_pretrained``."""
    target = model_config.get("_target_", "") if hasattr(model_config, "get") else ""
    return str(target).endswith("pretrained_causal_lm")


# where the decoder layers of the transformers families live (Llama-like, GPT-2-like, GPT-NeoX, OPT)
DECODER_LAYERS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str] | None:
    """``(the module holding the decoder layers, the attribute)`` of a transformers causal LM of a known family."""
    for path in DECODER_LAYERS:
        parent, _, name = path.rpartition(".")
        try:
            holder = model.get_submodule(parent)
        except AttributeError:
            continue
        if isinstance(getattr(holder, name, None), nn.ModuleList):
            return holder, name
    return None


def student_from_teacher(
    teacher: nn.Module, keep_layers: list[int] | None = None, init: str = "teacher", dtype: str = "float32"
) -> nn.Module:
    """A student made of the teacher's decoder layers ``keep_layers`` (in that order), with its embeddings, final norm
    and head (the DistilBERT / Minitron initialisation): ``student=from_teacher student.model.keep_layers=[0,2]``.

    ``teacher`` is a freshly built copy of the run's teacher (``${teacher.model}``: Hydra builds it for this), so its
    weights are taken over, not copied again. Llama-like (``model.layers``), GPT-2-like (``transformer.h``), GPT-NeoX
    and OPT decoders; another model is refused. ``init="fresh"``: the same architecture (the teacher's, with
    ``len(keep_layers)`` layers) with fresh weights from the seed, the student to compare the teacher's layers with.
    ``dtype``: the precision the student's weights are held in, ``float32`` by default whatever the teacher's
    (``trainer.precision`` decides the compute; weights held in bfloat16 lose small updates), logged when it differs.
    """
    if dtype not in DTYPES:
        raise KDError(f"student.model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if init not in ("teacher", "fresh"):
        raise KDError(
            f"student.model.init must be teacher (the teacher's layers) or fresh (the same architecture, fresh "
            f"weights), got {init!r}."
        )
    found = _decoder_layers(teacher)
    if found is None:
        raise KDError(
            f"student=from_teacher takes the decoder layers of a transformers causal LM ({', '.join(DECODER_LAYERS)}); "
            f"{type(teacher).__name__} has none of them. Use a student of its own (student=llama_student, ...)."
        )
    holder, name = found
    layers = getattr(holder, name)
    if (
        not keep_layers
        or not isinstance(keep_layers, Sequence)
        or isinstance(keep_layers, str)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep_layers)
    ):
        raise KDError(
            f"set student.model.keep_layers to a list of the teacher's layers to keep, e.g. {[0, len(layers) - 1] if len(layers) > 1 else [0]} (it has "
            f"{len(layers)}), got {keep_layers!r}."
        )
    outside = [i for i in keep_layers if not 0 <= i < len(layers)]
    if outside or len(set(keep_layers)) != len(keep_layers):
        raise KDError(
            f"student.model.keep_layers={list(keep_layers)} must name distinct layers of the teacher's "
            f"{len(layers)} (0..{len(layers) - 1}){f'; {outside} are not' if outside else ''}."
        )
    setattr(holder, name, nn.ModuleList(layers[i] for i in keep_layers))
    for index, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():  # the key/value cache is indexed by layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    config = teacher.config
    for count in LAYER_COUNTS:
        if hasattr(config, count):
            setattr(config, count, len(keep_layers))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    import torch

    held, wanted = next(teacher.parameters()).dtype, getattr(torch, dtype)
    if held != wanted:
        log.info(
            "student=from_teacher: the teacher is held in %s, the student's weights in %s (student.model.dtype)",
            str(held).removeprefix("torch."),
            dtype,
        )
    if init == "fresh":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config).to(wanted).train()
    return teacher.to(wanted).train()
