"""Framework overhead: DistillationModule under a Lightning Trainer vs a hand-written KD loop.

    python benchmarks/step_overhead.py [--teacher resnet56 --student resnet20 --batch-size 128 --steps 10 --pairs 5]
                                       [--device cuda --precision bf16-mixed --channels-last --json FILE]

Both train the same student against the same frozen teacher on the same in-memory tensors
(CIFAR-shaped, 100 classes), with the same SGD optimizer, batch size and precision (float32
by default; ``bf16-mixed`` is ``torch.autocast`` in the plain loop), for a fixed number of steps:
(a) ``Trainer.fit`` with CSV logging on and the progress bar off, (b) a plain PyTorch loop
computing the same loss. Runs are alternated A B A B; the medians of
the per-run times and their ratio (a / b) are printed. Each run starts from the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from synthetic import machine, on_device, quiet_lightning, synchronize

from kd_lightning import DistillationModule, kd_loss
from kd_lightning.data import InMemoryDataModule
from kd_lightning.models.cifar import build_cifar_model


class RandomCIFAR(InMemoryDataModule):
    """Fixed random CIFAR-shaped tensors, already float (no augmentation on either side)."""

    num_classes = 100
    input_shape = (3, 32, 32)

    def __init__(self, size: int, batch_size: int, channels_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, drop_last=True)
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, 3, 32, 32, generator=generator)
        if channels_last:
            self.inputs = self.inputs.contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, 100, (size,), generator=generator)

    def load_splits(self):
        return {split: (self.inputs, self.targets) for split in ("train", "val", "test")}


def run_lightning(
    student, teacher, data: RandomCIFAR, steps: int, temperature: float, alpha: float, device: str, precision: str
) -> float:
    module = DistillationModule(
        student,
        teacher,
        num_classes=100,
        temperature=temperature,
        alpha=alpha,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator="cuda" if device.startswith("cuda") else "cpu",
            devices=1,
            precision=precision,
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=L.pytorch.loggers.CSVLogger(logs),
            log_every_n_steps=5,
        )
        synchronize(device)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        synchronize(device)
        return time.perf_counter() - start


def run_plain(
    student, teacher, data: RandomCIFAR, steps: int, temperature: float, alpha: float, device: str, precision: str
) -> float:
    synchronize(device)
    start = time.perf_counter()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    student.train()
    teacher.eval()
    loader = data.train_dataloader()
    autocast = (
        torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    done = 0
    while done < steps:
        for batch in loader:
            x, y = batch["inputs"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
            with autocast:
                with torch.no_grad():
                    t = teacher(x)
                s = student(x)
                loss = (1 - alpha) * F.cross_entropy(s.float(), y) + alpha * kd_loss(s, t, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quiet_lightning()
    L.seed_everything(0, verbose=False)
    teacher = (
        on_device(build_cifar_model(args.teacher, 100), args.device, args.channels_last).eval().requires_grad_(False)
    )
    student0 = on_device(build_cifar_model(args.student, 100), args.device, args.channels_last)
    data = RandomCIFAR(size=args.batch_size * args.steps, batch_size=args.batch_size, channels_last=args.channels_last)
    data.setup()
    settings = (args.device, args.precision)

    runs = {"lightning": run_lightning, "plain": run_plain}
    for fn in runs.values():  # warm-up: allocator, kernels, Lightning's imports
        fn(copy.deepcopy(student0), teacher, data, 2, 4.0, 0.9, *settings)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.pairs):
        for name, fn in runs.items():
            times[name].append(fn(copy.deepcopy(student0), teacher, data, args.steps, 4.0, 0.9, *settings))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.steps} steps per run, {args.pairs} pairs (A B A B), "
        f"{machine(args.device)}, precision {args.precision}{', channels-last' if args.channels_last else ''}, "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )
    for name, values in times.items():
        print(
            f"  {name:9s} median {med[name]:6.2f} s ({med[name] / args.steps * 1000:6.1f} ms/step)   runs: "
            + ", ".join(f"{v:.2f}" for v in values)
        )
    ratio = med["lightning"] / med["plain"]
    print(f"  ratio lightning / plain: {ratio:.3f}")
    result = {
        "machine": machine(args.device),
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "pairs": args.pairs,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "ms_per_step": {k: round(v / args.steps * 1000, 2) for k, v in med.items()},
        "images_per_s": {k: round(args.batch_size * args.steps / v, 1) for k, v in med.items()},
        "ratio": round(ratio, 4),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
