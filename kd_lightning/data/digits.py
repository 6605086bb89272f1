"""scikit-learn's handwritten digits (8x8, 1,797 images): real data that ships with the package."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError


class DigitsDataModule(InMemoryDataModule):
    """Fixed stratified train/val/test split of the digits; inputs ``(N, 1, 8, 8)`` in [0, 1].

    Args:
        val_fraction, test_fraction: shares of the 1,797 images held out.
        split_seed: seed of the split alone, so every run sees the same test set.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if self.num_classes != 10:
            raise KDError(f"the digits have 10 classes, not {self.num_classes}; set data.num_classes=10.")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be > 0 and sum to less than 1.")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        images, labels = load_digits(return_X_y=True)
        rest_x, test_x, rest_y, test_y = train_test_split(
            images, labels, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed
        )
        train_x, val_x, train_y, val_y = train_test_split(
            rest_x,
            rest_y,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=rest_y,
            random_state=self.split_seed,
        )

        def as_tensors(x, y) -> tuple[Tensor, Tensor]:
            # pixel values are integers 0..16
            return torch.tensor(x, dtype=torch.float32).div_(16).view(-1, *self.input_shape), torch.tensor(y)

        return {
            "train": as_tensors(train_x, train_y),
            "val": as_tensors(val_x, val_y),
            "test": as_tensors(test_x, test_y),
        }
