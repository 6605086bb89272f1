"""DataModules that keep whole splits in memory and serve named batches (``inputs``, ``labels``, ``index``): images, digits, text, chat, arithmetic, the slippery walk."""

from kd_lightning.data.arithmetic import ArithmeticDataModule
from kd_lightning.data.batch import Batch, as_batch
from kd_lightning.data.chat import ChatDataModule
from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.memory import InMemoryDataModule, TensorSplit
from kd_lightning.data.protocol import DistillationData
from kd_lightning.data.text import TextDataModule
from kd_lightning.data.walk import WalkDataModule

__all__ = [
    "ArithmeticDataModule",
    "Batch",
    "ChatDataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "DistillationData",
    "InMemoryDataModule",
    "TensorSplit",
    "TextDataModule",
    "WalkDataModule",
    "as_batch",
]
