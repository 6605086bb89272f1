"""kd_lightning: knowledge distillation with PyTorch Lightning and Hydra."""

__version__ = "0.4.0"

from kd_lightning.errors import KDError  # noqa: E402
from kd_lightning.loss_mix import LossMix  # noqa: E402
from kd_lightning.losses import dkd_loss, jsd_loss, kd_loss, reverse_kl_loss, skew_kl_loss, tvd_loss  # noqa: E402
from kd_lightning.module import DistillationModule  # noqa: E402
from kd_lightning.teacher import LiveTeacher, Teacher  # noqa: E402

__all__ = ["DistillationModule", "KDError", "LiveTeacher", "LossMix", "Teacher", "dkd_loss", "jsd_loss", "kd_loss",
           "reverse_kl_loss", "skew_kl_loss", "tvd_loss", "__version__"]
