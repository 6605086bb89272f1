"""Loading weights into a model from the checkpoint layouts people actually have.

Accepted: RepDistiller / mdistiller files ``{'model': state_dict, ...}``, Lightning
checkpoints ``{'state_dict': ...}`` (of a DistillationModule: the ``student.`` weights),
and plain state_dicts; and a sharded run's distributed checkpoint (``trainer=fsdp``
``trainer.strategy.save_distributed_checkpoint=true``: a folder of every process's shards, read whole here).
Loading is strict; a mismatch names the missing and unexpected keys.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn

from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write_bytes

DISTRIBUTED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a folder's shards
STUDENT_KEYS = "state_dict.student."  # a DistillationModule's student weights, as a distributed checkpoint names them


def _is_distributed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a distributed checkpoint: a folder of shards that ``torch.distributed.checkpoint`` wrote."""
    return path.is_dir() and (path / DISTRIBUTED_METADATA).is_file()


def existing_checkpoint(path: str | os.PathLike, setting: str = "teacher.checkpoint") -> Path:
    """``path`` as a ``Path``; refused with the fix unless it is a file or a distributed checkpoint. ``setting``: where
    the path was given."""
    path = Path(path)
    if _is_distributed_checkpoint(path):
        return path
    if path.is_dir() and any(path.glob("*.distcp")):
        raise KDError(
            f"{path} holds the shards of a distributed checkpoint but not their index ({DISTRIBUTED_METADATA}): "
            "it is incomplete (a process killed while writing it?). Use another copy of it, or re-create it."
        )
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in {".pth", ".pt", ".ckpt"})[:3]
        raise KDError(
            f"{path} is a directory, not a checkpoint file; point {setting} at the file"
            + (f" (it holds {', '.join(inside)})." if inside else ".")
        )
    if not path.is_file():
        train_one = ", or set it to null to train one" if setting == "teacher.checkpoint" else ""
        raise KDError(
            f"checkpoint not found: {path}. Check {setting} (relative paths are resolved from the directory "
            f"you ran the command in){train_one}."
        )
    return path


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights stored in ``path``, whatever the layout."""
    path = existing_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise KDError(
            f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Re-download or re-create it."
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        return payload["model"]
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = payload["state_dict"]
        if any(k.startswith("student.") for k in state):
            return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        return state
    if isinstance(payload, dict) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        return payload
    raise KDError(
        f"{path} holds no model weights: expected a state_dict, {{'model': state_dict}} "
        "(RepDistiller) or a Lightning checkpoint with 'state_dict'."
    )


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` (a file, or a distributed checkpoint's folder) into ``model`` strictly; return
    ``model``."""
    if _is_distributed_checkpoint(Path(path)):
        model.load_state_dict(_distributed_student(model, Path(path)), strict=True)
        return model
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
    _check_fits(model, {k: tuple(v.shape) for k, v in state.items()}, path)
    model.load_state_dict(state, strict=True)
    return model


def _distributed_student(model: nn.Module, path: Path) -> dict[str, Tensor]:
    """The student weights of the distributed checkpoint ``path``, read whole into this process for ``model``'s
    state dict (a copy of each of its tensors, filled from every process's shards)."""
    from torch.distributed.checkpoint import FileSystemReader, load

    damaged = _distributed_damage(path)
    if damaged is not None:
        raise KDError(
            f"cannot read the distributed checkpoint {path}: it is damaged ({damaged}). Use another copy of it, "
            "or re-create it."
        )
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    shapes = {
        k.removeprefix(STUDENT_KEYS): tuple(v.size)
        for k, v in stored.items()
        if k.startswith(STUDENT_KEYS) and hasattr(v, "size")
    }
    _check_fits(model, shapes, path)
    state = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # that it reads in one process, which it was asked to
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load(
            {"state_dict": {f"student.{k}": v for k, v in state.items()}},
            storage_reader=FileSystemReader(path),
            no_dist=True,
        )
    return state


def _check_fits(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike) -> None:
    """Refuse weights of ``shapes`` (name -> shape) that are not exactly ``model``'s, naming the missing and unexpected
    keys and the wrong shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {shapes[k]} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and shapes[k] != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:

        def first(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

        problems = [
            f"missing keys: {first(missing)}" if missing else "",
            f"unexpected keys: {first(unexpected)}" if unexpected else "",
            f"wrong shapes: {first(wrong_shape)}" if wrong_shape else "",
        ]
        raise KDError(
            f"checkpoint {path} does not fit the model {type(model).__name__} "
            f"(num_classes={getattr(model, 'num_classes', '?')}): "
            + "; ".join(p for p in problems if p)
            + ". Pick the architecture the checkpoint was trained with (e.g. teacher=resnet56)."
        )


def _save_torch(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically. Serialised in memory first: torch's own file writer
    reports a full disk as an anonymous ``RuntimeError``; a plain write raises ``OSError`` naming the file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def save_weights(model: nn.Module, path: str | os.PathLike, **meta: Any) -> None:
    """Write ``{'model': state_dict, **meta}`` atomically."""
    _save_torch({"model": model.state_dict(), **meta}, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through :func:`~kd_lightning.files.atomic_write`: a stage's
    ``last.ckpt`` is the previous complete one or the new complete one, even on a full disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        _save_torch(checkpoint, path)


def check_resumable(path: Path, stage: str) -> None:
    """Refuse a damaged stage checkpoint before Lightning tries to resume from it."""
    if path.is_dir():
        return _check_distributed(path, stage)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        damaged = str(exc)
    if damaged is not None:
        raise KDError(
            f"the {stage} stage's checkpoint {path} is damaged ({damaged}); delete it to restart that stage "
            "from its first epoch, or run without ckpt_path=last."
        )


def _check_distributed(path: Path, stage: str) -> None:
    """Refuse a damaged distributed checkpoint of ``stage`` before Lightning tries to resume from it."""
    damaged = _distributed_damage(path)
    if damaged is not None:
        raise KDError(
            f"the {stage} stage's distributed checkpoint {path} is damaged ({damaged}); delete it to restart "
            "that stage from its first epoch, or run without ckpt_path=last."
        )


def _distributed_damage(path: Path) -> str | None:
    """What is wrong with the distributed checkpoint ``path`` (a file or part of one that its index names is missing,
    no index, no Lightning ``meta.pt``), or ``None``."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        stored = FileSystemReader(path).read_metadata().storage_data
        ends: dict[str, int] = {}
        for item in stored.values():
            ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
        short = [
            name for name, end in ends.items() if not (path / name).is_file() or (path / name).stat().st_size < end
        ]
        if short:
            return f"{short[0]} is missing or cut short"
    except Exception as exc:  # no index, or an unreadable one
        return f"{type(exc).__name__}: {exc}"
    return None if (path / "meta.pt").is_file() else "meta.pt, the epoch, step and callback states, is missing"


def student_only(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A :class:`~kd_lightning.DistillationModule`'s state without the frozen teacher (never checkpointed)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("teacher.")}


def check_student_state(state_dict: dict[str, Any], student: nn.Module) -> None:
    """Refuse a checkpoint that lacks some of ``student``'s weights; move kd_lightning 0.2's feature adapters
    (``features.*``) to where they live now (``loss_mix.features.*``)."""
    for key in [k for k in state_dict if k.startswith("features.")]:
        state_dict[f"loss_mix.{key}"] = state_dict.pop(key)
    missing = sorted({f"student.{k}" for k in student.state_dict()} - state_dict.keys())
    if missing:
        raise KDError(
            f"the checkpoint lacks {len(missing)} student weights (first: {missing[:5]}); "
            "it was not saved from a DistillationModule with this student architecture."
        )
