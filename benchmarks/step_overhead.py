"""Framework overhead: DistillationModule under a Lightning Trainer vs a hand-written KD loop.

    python benchmarks/step_overhead.py [--teacher resnet56 --student resnet20 --batch-size 128 --steps 10 --pairs 5]

Both train the same student against the same frozen teacher on the same in-memory tensors
(CIFAR-shaped, 100 classes), with the same SGD optimizer, batch size and float32 precision,
for a fixed number of steps: (a) ``Trainer.fit`` with CSV logging on and the progress bar off,
(b) a plain PyTorch loop computing the same loss. Runs are alternated A B A B; the medians of
the per-run times and their ratio (a / b) are printed. Each run starts from the same weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F

from kd_lightning import DistillationModule, kd_loss
from kd_lightning.data import InMemoryDataModule
from kd_lightning.models.cifar import build_cifar_model


class RandomCIFAR(InMemoryDataModule):
    """Fixed random CIFAR-shaped tensors, already float (no augmentation on either side)."""

    num_classes = 100
    input_shape = (3, 32, 32)

    def __init__(self, size: int, batch_size: int) -> None:
        super().__init__(batch_size=batch_size, drop_last=True)
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, 3, 32, 32, generator=generator)
        self.targets = torch.randint(0, 100, (size,), generator=generator)

    def load_splits(self):
        return {split: (self.inputs, self.targets) for split in ("train", "val", "test")}


def run_lightning(student, teacher, data: RandomCIFAR, steps: int, temperature: float, alpha: float) -> float:
    module = DistillationModule(student, teacher, num_classes=100, temperature=temperature, alpha=alpha,
                                optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            logger=L.pytorch.loggers.CSVLogger(logs), log_every_n_steps=5)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        return time.perf_counter() - start


def run_plain(student, teacher, data: RandomCIFAR, steps: int, temperature: float, alpha: float) -> float:
    start = time.perf_counter()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    student.train()
    teacher.eval()
    loader = data.train_dataloader()
    done = 0
    while done < steps:
        for x, y, _ in loader:
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, t, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    teacher = build_cifar_model(args.teacher, 100).eval().requires_grad_(False)
    student0 = build_cifar_model(args.student, 100)
    data = RandomCIFAR(size=args.batch_size * args.steps, batch_size=args.batch_size)
    data.setup()

    runs = {"lightning": run_lightning, "plain": run_plain}
    for fn in runs.values():  # warm-up: allocator, kernels, Lightning's imports
        fn(copy.deepcopy(student0), teacher, data, 2, 4.0, 0.9)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.pairs):
        for name, fn in runs.items():
            times[name].append(fn(copy.deepcopy(student0), teacher, data, args.steps, 4.0, 0.9))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.steps} steps per run, {args.pairs} pairs (A B A B), "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, lightning {L.__version__}")
    for name, values in times.items():
        print(f"  {name:9s} median {med[name]:6.2f} s ({med[name] / args.steps * 1000:6.1f} ms/step)   runs: "
              + ", ".join(f"{v:.2f}" for v in values))
    print(f"  ratio lightning / plain: {med['lightning'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
