"""DataModules that keep whole splits in memory and serve ``(x, y, index)`` batches."""

from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.memory import InMemoryDataModule, TensorSplit

__all__ = ["CIFARDataModule", "DigitsDataModule", "InMemoryDataModule", "TensorSplit"]
