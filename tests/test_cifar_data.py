"""CIFAR DataModule: image-folder and torchvision sources, the .npz cache, batched augmentation."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_factory import make_image_tree

from kd_lightning import KDError
from kd_lightning.data import CIFARDataModule
from kd_lightning.data import cifar as cifar_module
from kd_lightning.data.augment import RandomCropFlip


def datamodule(root: Path, **kwargs) -> CIFARDataModule:
    args = {"name": "cifar10", "num_classes": 10, "data_dir": str(root), "val_size": 3, "batch_size": 4, **kwargs}
    dm = CIFARDataModule(**args)
    dm.setup()
    return dm


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_folder_tree_is_decoded_to_uint8_splits(tmp_path: Path, suffix: str) -> None:
    dm = datamodule(make_image_tree(tmp_path / "tree", suffix=suffix))
    assert {s: len(dm.splits[s]) for s in ("train", "val", "test")} == {"train": 15, "val": 3, "test": 6}
    batch = dm.splits["train"].__getitems__([0, 1, 2])
    x, index = batch["inputs"], batch["index"]
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32)
    assert set(dm.splits["test"].targets.tolist()) == {0, 1, 2}  # class folders in sorted order
    assert torch.equal(index, torch.tensor([0, 1, 2]))


def test_png_pixels_are_exact(tmp_path: Path) -> None:
    from PIL import Image

    root = make_image_tree(tmp_path / "tree", classes=1, per_class={"train": 4, "test": 1})
    dm = datamodule(root, val_size=0)
    expected = np.asarray(Image.open(root / "test" / "class_0" / "0000.png")).transpose(2, 0, 1)
    assert torch.equal(dm.splits["test"].inputs[0], torch.from_numpy(expected))


def test_decoded_images_are_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_tree(tmp_path / "tree")
    first = datamodule(root)
    assert (root / cifar_module.CACHE_NAME).is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("images decoded again")

    monkeypatch.setattr(cifar_module, "read_image_folder", no_decoding)
    second = datamodule(root)
    assert torch.equal(first.splits["train"].inputs, second.splits["train"].inputs)


def test_cache_is_rebuilt_when_the_images_change(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "tree")
    assert len(datamodule(root).splits["test"]) == 6
    make_image_tree(root, per_class={"test": 3})  # one more test image per class
    assert len(datamodule(root).splits["test"]) == 9


def test_read_only_data_dir_caches_in_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_tree(tmp_path / "tree")
    real_atomic_write = cifar_module.atomic_write

    def read_only_root(path, write):  # as root, chmod would not stop the write
        if Path(path).parent == root:
            raise PermissionError(13, "Read-only file system", str(root))
        return real_atomic_write(path, write)

    monkeypatch.setattr(cifar_module, "atomic_write", read_only_root)
    datamodule(root, cache_dir=str(tmp_path / "cache"))
    assert not (root / cifar_module.CACHE_NAME).exists()
    assert len(list((tmp_path / "cache").glob(f"*{cifar_module.CACHE_NAME}"))) == 1


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "tree")
    bad = root / "train" / "class_1" / "0003.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(KDError, match=f"cannot decode image {bad}"):
        datamodule(root)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_test"])
def test_missing_or_empty_data_dir_is_explained(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "tree"
    if layout == "empty":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    elif layout == "no_test":
        make_image_tree(root, per_class={"train": 2})
    with pytest.raises(KDError, match="no images|no train/ and test/|torchvision is not installed|does not exist"):
        datamodule(root, source="folder" if layout != "missing" else "auto")


def test_torchvision_source_reads_dataset_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our glue around torchvision.datasets.CIFAR10, with a stand-in module (torchvision is optional)."""
    calls = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            n = 20 if train else 5
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=FakeCIFAR10, CIFAR100=FakeCIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    dm = datamodule(tmp_path / "tv_root", source="torchvision", download=True)
    assert calls == [(str(tmp_path / "tv_root"), True, True), (str(tmp_path / "tv_root"), False, True)]
    assert len(dm.splits["train"]) == 17 and len(dm.splits["test"]) == 5
    assert int(dm.splits["test"].inputs.max()) == 9


def test_real_torchvision_cifar10_on_generated_files(tmp_path: Path) -> None:
    """torchvision's own CIFAR-10 reader on pickled batches we write (integrity check bypassed)."""
    datasets = pytest.importorskip("torchvision.datasets")
    import pickle

    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        with open(folder / name, "wb") as handle:
            pickle.dump(
                {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))},
                handle,
            )
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    orig = datasets.CIFAR10._check_integrity
    datasets.CIFAR10._check_integrity = lambda self: True
    try:
        dm = datamodule(tmp_path / "tv", source="torchvision")
    finally:
        datasets.CIFAR10._check_integrity = orig
    assert len(dm.splits["train"]) == 17 and len(dm.splits["test"]) == 3


def reference_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, pad: int) -> torch.Tensor:
    """One image, the torchvision way: pad with zeros, crop at (top, left), then flip."""
    padded = F.pad(image, [pad] * 4)
    crop = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
    return crop.flip(-1) if flip else crop


def test_batched_crop_flip_equals_per_image_reference() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    augment = RandomCropFlip(padding=4, flip=True)
    views = augment.draw(16)
    out = augment.apply(images, views)
    for i in range(16):
        expected = reference_crop_flip(
            images[i], int(views.offsets[i, 0]), int(views.offsets[i, 1]), bool(views.flips[i]), 4
        )
        assert torch.equal(out[i], expected), i
    assert augment.distinct_views == 162  # 9 x 9 offsets x 2 flips


def test_augmentation_only_in_training_and_inputs_normalised(tmp_path: Path) -> None:
    dm = datamodule(make_image_tree(tmp_path / "tree"))
    batch = dm.splits["train"].__getitems__(list(range(8)))

    class StubTrainer:
        training = False

    dm.trainer = StubTrainer()
    x_eval = dm.on_after_batch_transfer(batch, 0)["inputs"]
    mean, std = cifar_module.STATS["cifar10"]
    expected = (batch["inputs"].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(x_eval, expected)
    StubTrainer.training = True
    torch.manual_seed(1)
    x_train = dm.on_after_batch_transfer(batch, 0)["inputs"]
    assert x_train.shape == x_eval.shape and not torch.equal(x_train, x_eval)


def test_teacher_and_student_see_the_same_augmented_batch(tmp_path: Path) -> None:
    import lightning as L

    from kd_lightning import DistillationModule
    from kd_lightning.models.cifar import build_cifar_model

    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}

    class Recording(DistillationModule):
        def teacher_forward(self, batch):
            if self.trainer.training:
                seen["teacher"].append(batch["inputs"].clone())
            return super().teacher_forward(batch)

        def student_forward(self, batch):
            if self.trainer.training:
                seen["student"].append(batch["inputs"].clone())
            return super().student_forward(batch)

    dm = CIFARDataModule(
        name="cifar10", num_classes=10, data_dir=str(make_image_tree(tmp_path / "tree")), val_size=3, batch_size=5
    )
    module = Recording(build_cifar_model("resnet8", 10), build_cifar_model("resnet8", 10), num_classes=10)
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    ).fit(module, datamodule=dm)
    assert len(seen["teacher"]) == 3
    for t, s in zip(seen["teacher"], seen["student"]):
        assert torch.equal(t, s)
