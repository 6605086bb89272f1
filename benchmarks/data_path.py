"""One CIFAR training epoch of data handling, no model: in-memory batched path vs torchvision.

    python benchmarks/data_path.py --data-dir ../shared/data/cifar10-jpeg [--workers 2] [--repeats 3]

(a) kd_lightning: uint8 tensors in memory, batches gathered by index, crop + flip +
    normalise applied to the whole batch (``CIFARDataModule.on_after_batch_transfer``).
(b) torchvision: the same uint8 images served the way ``torchvision.datasets.CIFAR10`` does
    (``Image.fromarray`` per image) through ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``,
    ``ToTensor``, ``Normalize`` in a ``DataLoader`` with ``--workers`` worker processes.

Both yield normalised float ``(128, 3, 32, 32)`` batches for all 45,000 training images. The
two are alternated A B A B; the medians and their ratio are printed. Needs torchvision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data import CIFARDataModule
from kd_lightning.data.cifar import STATS


class PerImageCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class TrainingStub:
    """Stands in for the Trainer: training mode, so the augmentation runs."""

    training = True
    current_epoch = 0


def epoch_in_memory(dm: CIFARDataModule) -> int:
    seen = 0
    for batch in dm.train_dataloader():
        x, y, _ = dm.on_after_batch_transfer(batch, 0)
        seen += len(x)
    return seen


def epoch_torchvision(loader: DataLoader) -> int:
    seen = 0
    for x, y in loader:
        seen += len(x)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", required=True, help="image-folder tree with train/ and test/ (the extracted cifar10-jpeg)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the torchvision path")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from torchvision import transforms

    dm = CIFARDataModule(name="cifar10", num_classes=10, data_dir=args.data_dir, batch_size=args.batch_size)
    dm.setup()
    dm.trainer = TrainingStub()
    train = dm.splits["train"]
    images = train.inputs.permute(0, 2, 3, 1).contiguous().numpy()  # the same 45,000 images, HWC uint8
    mean, std = STATS["cifar10"]
    per_image = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        PerImageCIFAR(images, train.targets.numpy(), per_image),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    epoch_in_memory(dm), epoch_torchvision(loader)  # warm-up: page in, start the workers
    times: dict[str, list[float]] = {"in_memory": [], "torchvision": []}
    for _ in range(args.repeats):
        for name, run in (
            ("in_memory", lambda: epoch_in_memory(dm)),
            ("torchvision", lambda: epoch_torchvision(loader)),
        ):
            start = time.perf_counter()
            count = run()
            times[name].append(time.perf_counter() - start)
            assert count == len(train), (name, count)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"CIFAR-10 train epoch, {len(train)} images, batch {args.batch_size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, torchvision workers {args.workers}, {args.repeats} pairs (A B A B)"
    )
    for name, values in times.items():
        print(
            f"  {name:12s} median {med[name]:7.2f} s   ({len(train) / med[name]:9.0f} images/s)   runs: {', '.join(f'{v:.2f}' for v in values)}"
        )
    print(f"  ratio torchvision / in_memory: {med['torchvision'] / med['in_memory']:.1f}x")


if __name__ == "__main__":
    main()
