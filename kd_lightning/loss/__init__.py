"""The loss: what the student is trained to minimise, and how it is counted.

- :mod:`~kd_lightning.loss.objectives`: the divergences per position (forward and reverse KL, JSD, skew KL, TVD, DKD, the sampled-token reverse KL)
  and the public objectives of raw logits (:func:`kd_loss`, :func:`jsd_loss`, ...);
- :mod:`~kd_lightning.loss.reduction`: which positions count and what their sum is divided by (one normaliser per
  optimizer step);
- :mod:`~kd_lightning.loss.chunked`: the same terms block by block from hidden states and the output head;
- :mod:`~kd_lightning.loss.mix`: :class:`LossMix`, the named, weighted terms;
- :mod:`~kd_lightning.loss.features`: feature terms (FitNets, attention transfer) on hooked activations;
- :mod:`~kd_lightning.loss.schedules`: schedules of a term's weight or the temperature, and learning-rate schedules.
"""

from kd_lightning.loss.chunked import chunked_distillation_loss
from kd_lightning.loss.mix import LossMix
from kd_lightning.loss.objectives import (
    dkd_loss,
    jsd_loss,
    kd_loss,
    mixture_kl,
    reverse_kl_loss,
    sampled_kl_loss,
    skew_kl_loss,
    tvd_loss,
)

__all__ = [
    "LossMix",
    "chunked_distillation_loss",
    "dkd_loss",
    "jsd_loss",
    "kd_loss",
    "mixture_kl",
    "reverse_kl_loss",
    "sampled_kl_loss",
    "skew_kl_loss",
    "tvd_loss",
]
