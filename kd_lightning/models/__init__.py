"""Model zoo: small nets for the digits demo (and CIFAR networks in ``models.cifar``)."""

from kd_lightning.models.digits import DigitsCNN

__all__ = ["DigitsCNN"]
