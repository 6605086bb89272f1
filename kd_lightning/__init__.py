"""kd_lightning: knowledge distillation with PyTorch Lightning and Hydra."""

__version__ = "0.5.0"

from kd_lightning.errors import KDError  # noqa: E402
from kd_lightning.loss.mix import LossMix  # noqa: E402
from kd_lightning.loss.objectives import (  # noqa: E402
    dkd_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    sampled_kl_loss,
    skew_kl_loss,
    tvd_loss,
)
from kd_lightning.module import DistillationModule  # noqa: E402
from kd_lightning.teacher import LiveTeacher, Teacher  # noqa: E402

__all__ = [
    "DistillationModule",
    "KDError",
    "LiveTeacher",
    "LossMix",
    "Teacher",
    "dkd_loss",
    "jsd_loss",
    "kd_loss",
    "reverse_kl_loss",
    "sampled_kl_loss",
    "skew_kl_loss",
    "tvd_loss",
    "__version__",
]
