"""kd_lightning: knowledge distillation with PyTorch Lightning and Hydra."""

from kd_lightning.errors import KDError
from kd_lightning.losses import KDLoss, dkd_loss, jsd_loss, kd_loss, reverse_kl_loss
from kd_lightning.module import DistillationModule

__version__ = "0.2.0"
__all__ = ["DistillationModule", "KDError", "KDLoss", "dkd_loss", "jsd_loss", "kd_loss", "reverse_kl_loss", "__version__"]
