"""CIFAR-10 / CIFAR-100 held in memory as uint8, augmented in batches on the device.

The images come from torchvision's datasets (downloaded to ``data_dir``) or from an
image-folder tree (``train/<class>/*.png|jpg``, ``test/<class>/*``) such as the shared
CIFAR-10 JPEG tree. A folder is decoded once and cached as ``.npz`` so the next run starts
in seconds. Batches are ``{inputs: uint8 images, labels, index}``; ``on_after_batch_transfer``
crops and flips on the device and normalises, so teacher and student see the same view.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.augment import RandomCropFlip
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write

log = logging.getLogger(__name__)

# per-channel statistics of the training sets (the values the KD literature normalises with)
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
CACHE_NAME = "kd_lightning-uint8.npz"


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``root/<class>/*`` into ``(N, H, W, 3)`` uint8 images, labels, and class names (sorted)."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise KDError(f"no images in {root}: expected {root}/<class>/<image>.png|jpg. Check data.data_dir.")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except Exception as exc:
            raise KDError(
                f"cannot decode image {path} ({type(exc).__name__}: {exc}); delete or replace the file."
            ) from None
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise KDError(f"images in {root} differ in size ({sorted(shapes)[:3]}...); CIFAR images are all 32x32.")
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64), classes


def _tree_fingerprint(data_dir: Path) -> np.ndarray:
    """Per split: number of files, total bytes, newest modification time. Changes when the tree does."""
    stats = [
        [f.stat() for f in (data_dir / split).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES]
        for split in ("train", "test")
    ]
    return np.array(
        [[len(st), sum(x.st_size for x in st), max((x.st_mtime_ns for x in st), default=0)] for st in stats],
        dtype=np.int64,
    )


def _load_folder_tree(data_dir: Path, cache_dir: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (...)}`` from a ``train/`` + ``test/`` tree, via the ``.npz`` cache.

    The cache is used only while the tree's fingerprint (file counts, sizes, times) is unchanged.
    """
    candidates = [data_dir / CACHE_NAME] + (
        [cache_dir / f"{data_dir.resolve().as_posix().strip('/').replace('/', '_')}-{CACHE_NAME}"] if cache_dir else []
    )
    fingerprint = _tree_fingerprint(data_dir)
    for cache in candidates:
        if cache.is_file():
            try:
                with np.load(cache) as arrays:
                    if np.array_equal(arrays["fingerprint"], fingerprint):
                        return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "test")}
                log.info("the images in %s changed since %s was written; decoding them again", data_dir, cache)
            except Exception:
                log.warning("ignoring unreadable cache %s; decoding the images again", cache)
    splits = {}
    classes = {}
    for split in ("train", "test"):
        images, labels, classes[split] = read_image_folder(data_dir / split)
        splits[split] = (images, labels)
    if classes["train"] != classes["test"]:
        raise KDError(
            f"train/ and test/ in {data_dir} have different class folders: {classes['train']} vs {classes['test']}."
        )
    for cache in candidates:
        arrays = {f"{s}_{k}": v for s, (im, lb) in splits.items() for k, v in (("images", im), ("labels", lb))}
        try:
            atomic_write(cache, lambda tmp: np.savez(tmp, fingerprint=fingerprint, **arrays))
            log.info("decoded images cached at %s", cache)
            break
        except OSError:
            continue  # read-only data directory: try the cache directory
    return splits


def _load_torchvision(name: str, data_dir: Path, download: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=str(data_dir), train=train, download=download)
        except RuntimeError as exc:
            raise KDError(
                f"{name} not found in {data_dir} ({exc}); set data.download=true or point data.data_dir "
                "at a directory holding it (or at an image-folder tree with train/ and test/)."
            ) from None
        splits[split] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
    return splits


class CIFARDataModule(InMemoryDataModule):
    """CIFAR-10/100 in memory; standard crop+flip augmentation and normalisation on the device.

    Args:
        name: ``cifar10`` or ``cifar100``.
        data_dir: an image-folder tree with ``train/`` and ``test/``, or torchvision's root.
        source: ``auto`` (folder tree if ``data_dir/train`` exists, else torchvision),
            ``folder`` or ``torchvision``.
        download: let torchvision download into ``data_dir``.
        val_size: images held out of train for validation (the test split is only for the final report).
        train_subset: use only this many training images (after the hold-out); ``None`` for all.
        split_seed: seed of the hold-out and subset choice.
        cache_dir: where the decoded ``.npz`` goes when ``data_dir`` is read-only.
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        name: str = "cifar100",
        data_dir: str = "data",
        source: str = "auto",
        download: bool = False,
        val_size: int = 5000,
        train_subset: int | None = None,
        split_seed: int = 0,
        cache_dir: str | None = None,
        batch_size: int = 64,
        augment: RandomCropFlip | None = None,
        **kwargs,
    ) -> None:
        if name not in STATS:
            raise KDError(f"data.name must be one of {sorted(STATS)}, got {name!r}.")
        if source not in {"auto", "folder", "torchvision"}:
            raise KDError(f"data.source must be auto, folder or torchvision, got {source!r}.")
        super().__init__(
            batch_size=batch_size, augment=augment if augment is not None else RandomCropFlip(4, True), **kwargs
        )
        self.name = name
        self.data_dir = Path(data_dir)
        self.source = source
        self.download = download
        self.val_size = val_size
        self.train_subset = train_subset
        self.split_seed = split_seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in STATS[name])
        self.mean_std = {torch.device("cpu"): (mean, std)}  # copied to a device once, not once per batch

    def read_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        is_tree = (self.data_dir / "train").is_dir()
        if self.source == "folder" or (self.source == "auto" and is_tree):
            if not self.data_dir.is_dir():
                raise KDError(
                    f"data directory {self.data_dir} does not exist. Set data.data_dir to a tree with "
                    "train/<class>/ and test/<class>/ (e.g. the extracted cifar10-jpeg)."
                )
            if not is_tree or not (self.data_dir / "test").is_dir():
                raise KDError(
                    f"{self.data_dir} has no train/ and test/ folders; expected train/<class>/*.png|jpg and test/<class>/*."
                )
            return _load_folder_tree(self.data_dir, self.cache_dir)
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise KDError(
                f"no image-folder tree at {self.data_dir} (train/, test/) and torchvision is not installed. "
                "Point data.data_dir at an extracted image-folder tree, or pip install 'kd_lightning[vision]'."
            ) from None
        return _load_torchvision(self.name, self.data_dir, self.download)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raw = self.read_splits()
        train_x, train_y = raw["train"]
        num_classes = int(max(train_y.max(), raw["test"][1].max())) + 1
        if num_classes > self.num_classes:
            raise KDError(f"the data has {num_classes} classes but data.num_classes={self.num_classes}.")
        if not 0 <= self.val_size < len(train_y):
            raise KDError(f"data.val_size={self.val_size} must be between 0 and the {len(train_y)} training images.")
        order = np.random.default_rng(self.split_seed).permutation(len(train_y))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]

        def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
            return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(labels)

        splits = {"train": as_tensors(train_x[train_idx], train_y[train_idx]), "test": as_tensors(*raw["test"])}
        # with val_size=0 the test split doubles as validation (report it as such)
        splits["val"] = as_tensors(train_x[val_idx], train_y[val_idx]) if self.val_size else splits["test"]
        return splits

    def prepare_inputs(self, inputs: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` -> normalised float32."""
        if inputs.device not in self.mean_std:
            self.mean_std[inputs.device] = tuple(t.to(inputs.device) for t in self.mean_std[torch.device("cpu")])
        mean, std = self.mean_std[inputs.device]
        return (inputs.float().div_(255) - mean) / std
