"""DataModules that keep whole splits in memory and serve named batches (``inputs``, ``labels``, ``index``): images, digits, text."""

from kd_lightning.data.batch import Batch, as_batch
from kd_lightning.data.chat import ChatDataModule
from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.memory import InMemoryDataModule, TensorSplit
from kd_lightning.data.text import TextDataModule

__all__ = ["Batch", "ChatDataModule", "CIFARDataModule", "DigitsDataModule", "InMemoryDataModule", "TensorSplit", "TextDataModule", "as_batch"]
