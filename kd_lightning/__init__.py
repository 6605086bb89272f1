"""kd_lightning: knowledge distillation with PyTorch Lightning and Hydra."""

from kd_lightning.errors import KDError
from kd_lightning.losses import KDLoss, kd_loss
from kd_lightning.module import DistillationModule

__version__ = "0.1.0"
__all__ = ["DistillationModule", "KDError", "KDLoss", "kd_loss", "__version__"]
