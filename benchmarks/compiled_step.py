"""Eager vs compiled vs CUDA-graph KD steps: training images/s of the same Lightning KD step.

    python benchmarks/compiled_step.py [--teacher resnet56 --student resnet20 --variants eager compiled]
    python benchmarks/compiled_step.py --device cuda --precision bf16-mixed --channels-last --variants eager compiled graphs

``compiled`` is ``speed.compile=true`` (``torch.compile`` of student and teacher), ``graphs`` adds
``speed.compile_mode=reduce-overhead`` (CUDA graphs; GPU only). Each variant trains the student
against a live teacher on CIFAR-shaped synthetic data (``drop_last``: static shapes) under a
Lightning Trainer; ``--warmup`` steps (compilation included) are left out, then ``--steps`` steps
are timed; variants alternate for ``--repeats`` rounds and the medians are reported.
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from synthetic import StepWindow, SyntheticCIFAR, machine, on_device, quiet_lightning

from kd_lightning import DistillationModule
from kd_lightning.models.cifar import build_cifar_model
from kd_lightning.speed import SpeedSettings

VARIANTS = {
    "eager": SpeedSettings(),
    "compiled": SpeedSettings(compile=True),
    "graphs": SpeedSettings(compile=True, compile_mode="reduce-overhead"),
}


def images_per_second(
    variant: str, student: torch.nn.Module, teacher: torch.nn.Module, data: SyntheticCIFAR, args: argparse.Namespace
) -> float:
    speed = VARIANTS[variant]
    module = DistillationModule(
        speed.prepare(copy.deepcopy(student)),
        speed.prepare(copy.deepcopy(teacher)),
        num_classes=10,
        temperature=4.0,
        alpha=0.9,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    timer = StepWindow(args.warmup, args.device)
    trainer = L.Trainer(
        accelerator="cuda" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return args.steps * args.batch_size / (timer.end - timer.start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["eager", "compiled"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.manual_seed(0)
    teacher = on_device(build_cifar_model(args.teacher, num_classes=10), args.device, args.channels_last)
    student = on_device(build_cifar_model(args.student, num_classes=10), args.device, args.channels_last)
    data = SyntheticCIFAR(
        size=(args.warmup + args.steps) * args.batch_size,
        num_classes=10,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
    )
    data.drop_last = True  # static shapes, which CUDA graphs need
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        order = args.variants[repeat % len(args.variants) :] + args.variants[: repeat % len(args.variants)]
        for variant in order:
            rates[variant].append(images_per_second(variant, student, teacher, data, args))
    medians = {v: statistics.median(r) for v, r in rates.items()}
    figures = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "images_per_s": {v: round(m, 1) for v, m in medians.items()},
        "over_eager": {v: round(m / medians["eager"], 3) for v, m in medians.items()} if "eager" in medians else {},
        "runs": {v: [round(x, 1) for x in r] for v, r in rates.items()},
    }
    for variant, rate in figures["images_per_s"].items():
        print(f"{variant:9s} {rate:9.1f} images/s (median of {args.repeats})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
