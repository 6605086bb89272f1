"""Model zoo: small nets for the digits demo, a small GPT for language models (and CIFAR networks in ``models.cifar``)."""

from kd_lightning.models.digits import DigitsCNN
from kd_lightning.models.gpt import GPT, hf_causal_lm
from kd_lightning.models.outputs import model_logits
from kd_lightning.models.pretrained import pretrained_causal_lm, student_from_teacher

__all__ = ["DigitsCNN", "GPT", "hf_causal_lm", "model_logits", "pretrained_causal_lm", "student_from_teacher"]
