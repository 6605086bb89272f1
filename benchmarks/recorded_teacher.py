"""Recorded vs live teacher: epoch time of live KD, recorded KD and the student trained alone.

    python benchmarks/recorded_teacher.py [--teacher resnet56 --student resnet20 --train-size 2560 --repeats 3]

All three train the same student for one epoch on the same CIFAR-shaped synthetic images
(uint8 in memory, crop + flip and normalisation on the device) under a Lightning Trainer:
(a) live KD runs the frozen teacher on every batch, (b) recorded KD looks the teacher's logits
up in a recording made once beforehand (``views_per_sample`` views per image; its time is
reported separately), (c) the student alone (alpha=0) is the floor. The runs are
alternated, medians of ``--repeats`` epochs are printed with their ratios; then the same
for a top-k recording of 100-class logits (``--top-k``). ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from synthetic import EpochTimer, SyntheticCIFAR, machine, on_device, quiet_lightning, synchronize

from kd_lightning import DistillationModule
from kd_lightning.models.cifar import build_cifar_model
from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher


def epoch_time(
    variant: str,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    outputs: RecordedTeacher,
    data: SyntheticCIFAR,
    args: argparse.Namespace,
    logs: Path,
) -> float:
    """One training epoch of ``variant`` (live, recorded, alone); returns its wall time."""
    data.replay_views(outputs.views if variant == "recorded" else None)
    module = DistillationModule(
        student,
        {"live": teacher, "recorded": outputs, "alone": None}[variant],
        num_classes=data.num_classes,
        temperature=4.0,
        alpha=0.0 if variant == "alone" else 0.9,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    timer = EpochTimer(args.device)
    trainer = L.Trainer(
        accelerator="cuda" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[timer],
        logger=L.pytorch.loggers.CSVLogger(logs),
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=data)
    return timer.times[0]


def compare(num_classes: int, top_k: int | None, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    teacher = (
        on_device(build_cifar_model(args.teacher, num_classes), args.device, args.channels_last)
        .eval()
        .requires_grad_(False)
    )
    student0 = on_device(build_cifar_model(args.student, num_classes), args.device, args.channels_last)
    data = SyntheticCIFAR(args.train_size, num_classes, args.batch_size, channels_last=args.channels_last)
    data.setup()
    with tempfile.TemporaryDirectory() as tmp:
        synchronize(args.device)
        start = time.perf_counter()
        record_teacher(
            teacher,
            data,
            Path(tmp) / "outputs",
            {},
            RecordingSettings(args.views, top_k),
            accelerator="cuda" if args.device.startswith("cuda") else "cpu",
            precision=args.precision,
        )
        record_s = time.perf_counter() - start
        outputs = RecordedTeacher(Path(tmp) / "outputs")
        for variant in variants:  # warm-up: allocator, kernels, the recording's pages
            epoch_time(variant, copy.deepcopy(student0), teacher, outputs, data, args, Path(tmp))
        times: dict[str, list[float]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]  # rotate who goes first
            for variant in order:
                times[variant].append(
                    epoch_time(variant, copy.deepcopy(student0), teacher, outputs, data, args, Path(tmp))
                )
    medians = {v: statistics.median(t) for v, t in times.items()}
    images = args.train_size // args.batch_size * args.batch_size
    return {
        "classes": num_classes,
        "top_k": top_k,
        "views_per_sample": args.views,
        "record_s": round(record_s, 2),
        "epoch_s": {v: round(m, 3) for v, m in medians.items()},
        "runs_s": {v: [round(x, 3) for x in t] for v, t in times.items()},
        "images_per_s": {v: round(images / m, 1) for v, m in medians.items()},
    }


def report(title: str, result: dict[str, Any]) -> None:
    print(title)
    print(f"  recording ({result['views_per_sample']} views per image): {result['record_s']:.2f} s")
    for variant, seconds in result["epoch_s"].items():
        print(
            f"  {variant:7s} median epoch {seconds:7.3f} s  ({result['images_per_s'][variant]:8.1f} images/s)   runs: "
            + ", ".join(f"{x:.3f}" for x in result["runs_s"][variant])
        )
    e = result["epoch_s"]
    if "live" in e:
        print(f"  ratio live / recorded: {e['live'] / e['recorded']:.3f}")
    print(f"  ratio recorded / alone: {e['recorded'] / e['alone']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--train-size", type=int, default=2560, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--views", type=int, default=2, help="views_per_sample of the recording (does not change the epoch time)"
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=10, help="top-k setting, measured with 100 classes; 0 skips it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_lightning()
    results = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "train_size": args.train_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
    }
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.train_size} images per epoch, {args.repeats} repeats, "
        f"{results['machine']}, precision {args.precision}{', channels-last' if args.channels_last else ''}, torch {torch.__version__}"
    )
    results["full"] = compare(args.classes, None, ["live", "recorded", "alone"], args)
    report(f"{args.classes} classes, float16 logits:", results["full"])
    if args.top_k:
        results["top_k"] = compare(100, args.top_k, ["recorded", "alone"], args)
        report(f"100 classes, top-{args.top_k} logits + log-sum-exp:", results["top_k"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
