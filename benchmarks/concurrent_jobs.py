"""Several training jobs on one device at once: aggregate images/s for 1, 2 and 4 concurrent jobs.

    python benchmarks/concurrent_jobs.py [--jobs 1 2 4 --teacher resnet56 --student resnet20 --steps 30]
    python benchmarks/concurrent_jobs.py --device cuda --precision bf16-mixed --channels-last

Small networks leave a GPU mostly idle between kernel launches; running several sweep jobs on it
at once (``python -m kd_lightning -m hydra/launcher=local hydra.launcher.gpus_per_node=1 ...``)
fills it. Each job is a separate process training the student with a live teacher on
CIFAR-shaped synthetic data under a Lightning Trainer, as a sweep job would; all jobs of a round
pass a barrier after ``--warmup`` steps, then time ``--steps`` steps. The aggregate is the total
images of all jobs over the wall time from the barrier until the last job ends. ``--json FILE``
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from synthetic import StepWindow, SyntheticCIFAR, machine, on_device, quiet_lightning

from kd_lightning import DistillationModule
from kd_lightning.models.cifar import build_cifar_model


def job(args: argparse.Namespace, barrier: Any, results: Any) -> None:
    """One sweep job: train the student against a live teacher for ``warmup + steps`` steps."""
    quiet_lightning()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    teacher = on_device(build_cifar_model(args.teacher, num_classes=10), args.device, args.channels_last)
    student = on_device(build_cifar_model(args.student, num_classes=10), args.device, args.channels_last)
    data = SyntheticCIFAR(
        size=(args.warmup + args.steps) * args.batch_size,
        num_classes=10,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
    )
    module = DistillationModule(
        student,
        teacher,
        num_classes=10,
        temperature=4.0,
        alpha=0.9,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    window = StepWindow(args.warmup, args.device, barrier)
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
        callbacks=[window],
    )
    trainer.fit(module, datamodule=data)
    results.put((window.start, window.end))


def round_of(jobs: int, args: argparse.Namespace) -> dict[str, Any]:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    processes = [context.Process(target=job, args=(args, barrier, results)) for _ in range(jobs)]
    for process in processes:
        process.start()
    windows = [results.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"a job failed (exit status {process.exitcode})")
    wall = max(end for _, end in windows) - min(start for start, _ in windows)
    images = jobs * args.steps * args.batch_size
    return {
        "jobs": jobs,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 1),
        "per_job_images_per_s": [round(args.steps * args.batch_size / (end - start), 1) for start, end in windows],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64, help="the protocol's batch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per job")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "rounds": [round_of(jobs, args) for jobs in args.jobs],
    }
    single = figures["rounds"][0]["images_per_s"]
    for entry in figures["rounds"]:
        entry["over_one_job"] = round(entry["images_per_s"] / single, 3)
        print(
            f"{entry['jobs']} concurrent job(s): {entry['images_per_s']:9.1f} images/s in all "
            f"({entry['over_one_job']:.2f}x one job), per job {entry['per_job_images_per_s']}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
