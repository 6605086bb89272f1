"""The batch: named fields everywhere; a user's (x, y) tuple converted in one place to the same loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kd_lightning import DistillationModule, KDError
from kd_lightning.data import DigitsDataModule, as_batch
from kd_lightning.models import DigitsCNN

LIBRARY = Path(__file__).resolve().parents[1] / "kd_lightning"


def module() -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        DigitsCNN(width=4, hidden=8, dropout=0.0), DigitsCNN().eval(), num_classes=10, temperature=2.0, alpha=0.7
    )


def test_a_dict_batch_and_a_tuple_batch_give_the_same_loss() -> None:
    torch.manual_seed(1)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    kd = module()
    from_tuple = kd.training_step((x, y), 0)
    from_triple = kd.training_step((x, y, torch.arange(8)), 0)
    from_dict = kd.training_step({"inputs": x, "labels": y}, 0)
    assert from_tuple.item() > 0
    assert torch.equal(from_tuple, from_dict) and torch.equal(from_tuple, from_triple)


def test_labels_of_another_batch_size_or_not_class_indices_are_refused() -> None:
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(KDError, match=r"labels of shape \(3,\) for logits \(4, 10\)"):
        module().training_step((x, torch.zeros(3, dtype=torch.long)), 0)
    with pytest.raises(KDError, match="labels must be class indices .* got torch.float32"):
        module().training_step((x, torch.zeros(4)), 0)


def test_built_in_datamodules_yield_named_batches() -> None:
    dm = DigitsDataModule(batch_size=16)
    batch = next(iter(dm.loader("train", train=True)))
    assert set(batch) == {"inputs", "labels", "index"}
    assert batch["inputs"].shape == (16, 1, 8, 8) and batch["labels"].shape == batch["index"].shape == (16,)
    torch.testing.assert_close(batch["inputs"], dm.splits["train"].inputs[batch["index"]])


def test_as_batch_names_what_it_cannot_read() -> None:
    x = torch.zeros(2, 3)
    assert as_batch((x, x))["labels"] is x
    with pytest.raises(KDError, match="needs an 'inputs' entry"):
        as_batch({"images": x})
    with pytest.raises(KDError, match="cannot read a batch of type Tensor"):
        as_batch(x)


def test_the_library_reads_batches_by_name_and_locks_with_filelock() -> None:
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"batch\[\d", text), f"{path}: positional batch access"
        assert "fcntl" not in text, f"{path}: use kd_lightning.files.job_lock (filelock)"


def test_an_empty_split_is_refused() -> None:
    from kd_lightning.data import InMemoryDataModule

    class NoValidation(InMemoryDataModule):
        def load_splits(self):
            x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
            return {"train": (x, y), "val": (x[:0], y[:0]), "test": (x, y)}

    with pytest.raises(KDError, match="the val split of NoValidation holds no samples"):
        NoValidation(batch_size=2, num_classes=10).setup()
