"""What a run holds on each device, before renting the devices: ``python -m kd_lightning.run.memory_plan OVERRIDES``.

The overrides are a run's (``teacher=hf teacher.model.path=DIR trainer=fsdp trainer.devices=8 ...``); the models are
built on PyTorch's ``meta`` device (shapes, no weights: a 70B teacher costs nothing to build) and the bytes each
device holds are counted from their parameters, for DDP, FSDP with the teacher sharded or whole, and a recorded
teacher:

- parameters, gradients and optimizer state are counted exactly: FSDP2 gives each of ``N`` processes
  ``ceil(rows / N)`` rows of every parameter (the first dimension), DDP each process all of them; gradients have the
  parameters' size and dtype, AdamW keeps two tensors of that size per parameter, SGD with momentum one;
- ``gathered``: under FSDP, the units whole at once while they compute: the root unit (embeddings, final norm, head)
  and two blocks (the one computing and the next, prefetched), of the student and of a sharded teacher, in
  ``speed.shard_dtype`` when it is set;
- ``activations`` is an estimate: per student block ``34 · d`` values per token kept for the backward (Korthikanti et
  al. 2022, "Reducing Activation Recomputation", with attention scores not stored, as SDPA does), in the precision
  the blocks compute in, and the logits in float32: the teacher's and the student's with their log-probabilities and
  gradient (four ``(N, L, V)`` tensors), or ``speed.chunk_rows`` rows of them at a time with the chunked loss.

``device_memory(...)`` computes one column from Python.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.errors import KDError
from kd_lightning.loss.chunked import default_chunk_rows

GIB = 1024**3


def whole_bytes(model: nn.Module) -> int:
    """The bytes of all of ``model``'s parameters (a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def shard_bytes(model: nn.Module, processes: int) -> int:
    """The bytes of the largest FSDP2 shard of ``model``'s parameters: ``ceil(rows / processes)`` rows of each (what
    the first process holds; the others hold as much or a little less)."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0] if p.ndim else 1
        total += math.ceil(rows / processes) * (p.numel() // max(rows, 1)) * p.element_size()
    return total


def units(model: nn.Module) -> tuple[list[int], int]:
    """The whole bytes of each block of ``model`` (:func:`kd_lightning.sharding.blocks`) and of the rest (the root)."""
    from kd_lightning.sharding import blocks

    block_bytes = [whole_bytes(block) for block in blocks(model)]
    return block_bytes, whole_bytes(model) - sum(block_bytes)


def gathered_bytes(model: nn.Module, element_size: int | None = None) -> int:
    """What FSDP gathers of ``model`` at once: the root unit and the two largest blocks, whole (in ``element_size``
    bytes a value when the gathered parameters are cast, e.g. 2 for bfloat16)."""
    block_bytes, root = units(model)
    gathered = root + sum(sorted(block_bytes)[-2:])
    if element_size is None:
        return gathered
    stored = next(iter(model.parameters())).element_size()
    return gathered * element_size // stored


def width_and_vocab(model: nn.Module) -> tuple[int, int]:
    """A language model's hidden width ``d`` and output rows ``V``, from its output head's weight ``(V, d)``."""
    from kd_lightning.models.outputs import output_head

    head = output_head(model)
    if head is None or getattr(head, "weight", None) is None:
        raise KDError(
            f"the memory calculator is for language models with an output head; {type(model).__name__} has none."
        )
    vocab, width = head.weight.shape
    return int(width), int(vocab)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one process holds (the first: the largest shards)."""

    teacher_parameters: int
    student_parameters: int
    student_gradients: int
    optimizer_state: int
    gathered: int
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def optimizer_states(optim: Any) -> int:
    """Tensors of a parameter's size the optimizer keeps per parameter: AdamW/Adam 2, SGD 1 with momentum, else 0."""
    target = str(optim.get("_target_", "")) if optim is not None else ""
    if target.endswith(("Adam", "AdamW")):
        return 2
    if target.endswith("SGD"):
        return 1 if optim.get("momentum", 0) else 0
    raise KDError(
        f"the memory calculator knows Adam, AdamW and SGD, not {target or optim!r}; count its state yourself."
    )


def device_memory(
    teacher: nn.Module | None,
    student: nn.Module,
    *,
    processes: int,
    sharded: bool,
    shard_teacher: bool,
    optimizer_states_per_parameter: int,
    batch_size: int,
    length: int,
    chunk_rows: int | str | None = None,
    compute_element_size: int = 4,
    gathered_element_size: int | None = None,
) -> DeviceMemory:
    """One process's bytes for a language-model run (see the module docstring for what is counted how).

    Args:
        teacher: the live teacher, on the ``meta`` device (``None``: a recorded teacher, no parameters on the device).
        student: the student, on the ``meta`` device.
        processes: data-parallel processes (devices x nodes).
        sharded: FSDP (``trainer=fsdp``), else DDP (every process holds everything).
        shard_teacher: under FSDP, shard the teacher too (``teacher.shard``).
        batch_size, length: the training batch of each process, ``(N, L)`` tokens.
        compute_element_size: bytes of a value the blocks compute in (2 under ``bf16-mixed`` or ``speed.shard_dtype``).
        gathered_element_size: bytes of a gathered parameter value (2 with ``speed.shard_dtype=bfloat16``; ``None``:
            as stored).
    """
    n = processes if sharded else 1
    student_bytes = shard_bytes(student, n)
    teacher_sharded = teacher is not None and sharded and shard_teacher
    teacher_bytes = (
        0 if teacher is None else shard_bytes(teacher, processes) if teacher_sharded else whole_bytes(teacher)
    )
    gathered = 0
    if sharded:
        gathered = gathered_bytes(student, gathered_element_size) + (
            gathered_bytes(teacher, gathered_element_size) if teacher_sharded else 0
        )
    width, vocab = width_and_vocab(student)
    from kd_lightning.sharding import blocks

    tokens = batch_size * length
    kept = tokens * 34 * width * compute_element_size // 2 * len(blocks(student))
    if chunk_rows == "auto":
        chunk_rows = default_chunk_rows(tokens, vocab)
    logit_rows = tokens if chunk_rows is None else min(chunk_rows, tokens)
    logits = 4 * logit_rows * vocab * 4 + (2 * tokens * width * 4 if chunk_rows is not None else 0)
    return DeviceMemory(
        teacher_parameters=teacher_bytes,
        student_parameters=student_bytes,
        student_gradients=student_bytes,
        optimizer_state=optimizer_states_per_parameter * student_bytes,
        gathered=gathered,
        activations=kept + logits,
    )


def meta_model(node: dict[str, Any]) -> nn.Module:
    """The model a config node (as plain values) builds, on the ``meta`` device (a pretrained folder: its
    ``config.json`` alone)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kd_lightning.models.pretrained import is_pretrained

    target = str(node.get("_target_", ""))
    with torch.device("meta"):
        if is_pretrained(node):
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(
                node["path"],
                revision=node.get("revision"),
                trust_remote_code=bool(node.get("trust_remote_code", False)),
            )
            return AutoModelForCausalLM.from_config(
                config,
                dtype=getattr(torch, node.get("dtype") or "float32"),
                trust_remote_code=bool(node.get("trust_remote_code", False)),
            )
        if target.endswith("student_from_teacher"):
            from kd_lightning.models import student_from_teacher

            return student_from_teacher(meta_model(node["teacher"]), keep_layers=node.get("keep_layers"), init="fresh")
        return instantiate(OmegaConf.create(node))


COLUMNS = {  # name: (sharded, teacher sharded, recorded teacher)
    "ddp": (False, False, False),
    "fsdp": (True, True, False),
    "fsdp, whole T": (True, False, False),  # teacher.shard=false
    "ddp, recorded": (False, False, True),  # teacher.mode=recorded
}
ROWS = {
    "teacher_parameters": "teacher parameters",
    "student_parameters": "student parameters",
    "student_gradients": "student gradients",
    "optimizer_state": "optimizer state",
    "gathered": "gathered (FSDP)",
    "activations": "activations (estimate)",
}


def sequence_length(data: Any, given: int | None) -> int:
    if given is not None:
        return given
    for key in ("block_size", "max_length"):
        if data.get(key) is not None:
            return int(data[key])
    raise KDError(
        "the data config has neither data.block_size nor data.max_length; give the tokens per sequence with --length L."
    )


def columns(cfg: Any, length: int | None = None) -> tuple[dict[str, DeviceMemory], dict[str, Any]]:
    """Each column of the table for the run ``cfg`` composes, and what it was computed for."""
    from kd_lightning.run.settings import Settings

    settings = Settings.from_config(cfg)
    trainer, data = settings.run.trainer.settings, settings.data.settings
    devices = trainer.get("devices", 1)
    processes = (devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes", 1) or 1)
    teacher, student = meta_model(settings.teacher.model.settings), meta_model(settings.student.settings)
    _, vocab = width_and_vocab(student)  # a language model
    states = optimizer_states(settings.run.optim.optimizer_settings)
    precision, cast = settings.run.precision, settings.speed.shard_dtype
    if cast:
        precision += f", speed.shard_dtype={cast}"
    batch_size, length = int(data["batch_size"]), sequence_length(data, length)
    chunk_rows = settings.speed.chunk_rows
    run = {
        "processes": processes,
        "batch_size": batch_size,
        "length": length,
        "chunk_rows": default_chunk_rows(batch_size * length, vocab) if chunk_rows == "auto" else chunk_rows,
        "optimizer": settings.run.optim.optimizer_settings["_target_"].rpartition(".")[2],
        "precision": precision,
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    table = {
        name: device_memory(
            None if recorded else teacher,
            student,
            processes=processes,
            sharded=sharded,
            shard_teacher=shard_teacher,
            optimizer_states_per_parameter=states,
            batch_size=run["batch_size"],
            length=run["length"],
            chunk_rows=run["chunk_rows"],
            compute_element_size=2 if precision.startswith(("bf16", "16")) or cast else 4,
            gathered_element_size=2 if cast and sharded else None,
        )
        for name, (sharded, shard_teacher, recorded) in COLUMNS.items()
    }
    return table, run


def format_table(table: dict[str, DeviceMemory], run: dict[str, Any], capacity_gib: float | None = None) -> str:
    """The columns side by side per device (GiB, or MiB when every total is below one GiB), with what they were
    computed for."""
    chunked = "" if run["chunk_rows"] is None else f", chunked loss ({run['chunk_rows']} rows)"
    head = (
        f"per device, {run['processes']} processes; teacher {run['teacher'] / 1e9:.3g}B parameters, student "
        f"{run['student'] / 1e9:.3g}B; {run['optimizer']}; batch {run['batch_size']} x {run['length']} tokens a "
        f"process{chunked}; {run['precision']}"
    )
    unit, size = ("GiB", GIB) if max(m.total for m in table.values()) >= GIB else ("MiB", 2**20)
    width = max(len(name) for name in table) + 2
    lines = [head, f"{unit:24}" + "".join(f"{name:>{width}}" for name in table)]
    for field, label in ROWS.items():
        lines.append(f"{label:24}" + "".join(f"{getattr(m, field) / size:>{width}.2f}" for m in table.values()))
    lines.append(f"{'total':24}" + "".join(f"{m.total / size:>{width}.2f}" for m in table.values()))
    if capacity_gib is not None:
        fits = "".join(f"{'yes' if m.total <= capacity_gib * GIB else 'no':>{width}}" for m in table.values())
        lines.append(f"{f'fits {capacity_gib:g} GiB':24}{fits}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m kd_lightning.run.memory_plan [--length L] [--device-gib G] OVERRIDES``: the table for the run the overrides
    compose (no run directory is made, nothing is loaded or trained)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kd_lightning.run.cli import run_reporting_errors
    from kd_lightning.run.config import config_dir

    parser = argparse.ArgumentParser(prog="python -m kd_lightning.run.memory_plan", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, help="tokens per sequence (default: data.block_size or data.max_length)")
    parser.add_argument("--device-gib", type=float, help="a device's memory in GiB: says which columns fit")
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides")
    args = parser.parse_args(argv)

    def app() -> None:
        GlobalHydra.instance().clear()
        with (
            tempfile.TemporaryDirectory() as scratch,
            initialize_config_dir(config_dir=config_dir(), version_base="1.3"),
        ):
            planned = (
                []
                if any(o.lstrip("+").startswith("trainer.accelerator=") for o in args.overrides)
                else ["trainer.accelerator=gpu"]
            )  # the devices to rent, not this machine's
            cfg = compose("train", overrides=[*args.overrides, *planned, f"paths.output_dir={Path(scratch) / 'run'}"])
            print(format_table(*columns(cfg, args.length), capacity_gib=args.device_gib))

    run_reporting_errors(app)


if __name__ == "__main__":
    main(sys.argv[1:])
