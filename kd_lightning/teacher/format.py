"""The recording's format: what a recording holds, its settings, and how a top-k teacher is rebuilt from it.

The recorder writes it (:mod:`kd_lightning.teacher.recorder`); :class:`~kd_lightning.teacher.recorded.RecordedTeacher`
reads it.

A KD step pays for a teacher forward pass; a sweep over T and alpha pays it again in every
job. With ``teacher.mode=recorded`` one pass over the data (``Trainer.predict``) records the
teacher's logits into memory-mapped ``.npy`` files, keyed by the teacher's weights, the data's
contents and the augmentation (:mod:`kd_lightning.run.teachers` keeps them under
``paths.cache_dir/recordings/``); every later run with the same key answers the teacher's
question from them (:class:`~kd_lightning.teacher.recorded.RecordedTeacher`) and never loads the teacher.

Augmented training images: for each image, ``views_per_sample`` augmentation parameters
(crop offset, flip) are drawn once (:class:`~kd_lightning.data.augment.RecordedViews`) and
the teacher is run on each of those views. Training then shows each image in one of its
recorded views per step, so teacher and student still see the same pixels.
``views_per_sample="all"`` records every distinct view (162 for a 32x32 crop with padding 4
and flips): a recorded teacher is then the live teacher, up to float16 rounding.

Token sequences (``task="tokens"``) are recorded the same way, one entry per token: the arrays
gain a position axis ``L`` after the view axis (one view: text is not augmented). With ``top_k``
each token costs ``k·(2 + index bytes) + 4`` bytes (k=32, a vocabulary below 32,768: 132 B).

Top-k error: the rebuilt distribution ``p̂`` keeps the teacher's k largest probabilities; the
remaining *tail mass* ``m = 1 − Σ_topk p`` goes to the other classes evenly (:func:`rebuild_logits`)
or, in training, in proportion to the student's probabilities (:func:`student_shaped_tail`,
``tail="student"``). Either way ``‖p − p̂‖₁ ≤ 2m`` per token at T=1, so the gradient of forward KL
with respect to the student's logits, ``q − p``, is off by at most ``2m`` in L1 norm. The
recording logs the tail mass (mean and maximum over tokens, in ``meta.json``) so that k can be
chosen from it. On the evaluation splits a top-k recording also keeps the teacher's logit of each
label, so that its perplexity, accuracy and the other label metrics are exact (only ``kl_t1``,
which needs the whole distribution, uses the evenly spread tail).

``tail="sampled"`` removes that error in expectation: the recording also keeps ``tail_samples``
draws (with replacement) from the teacher's distribution outside its top k, and training gives
each drawn class ``m · count / tail_samples`` (:func:`sampled_tail`, the others 0). Its
expectation is the teacher's exact distribution, so the forward-KL gradient ``q − p̂`` is
unbiased at T=1 (the error left is the draws' variance, not a bias); each draw costs the bytes of
one index.

A killed recording resumes: the files are written in ``.<name>.partial/`` beside the recording,
with ``progress.json`` saying how many samples of each split are done; the next run with the same
key continues from there, and the directory is renamed into place only when complete.

Layout of one recording::

    meta.json                 identity (what was recorded from), shapes, top_k, tail mass, each file's
                              SHA-256; written last. Opening a recording checks the digests and the
                              values' ranges (:func:`check_file`): a changed byte is refused by name
    views.offsets.npy         (N or 1, V, 2) uint8 crop offsets     } training views; absent
    views.flips.npy           (N or 1, V) bool                      } without augmentation
    <split>.logits.npy        (N, V[, L], C) float16                (top_k null)
    <split>.topk_values.npy   (N, V[, L], k) float16                } top_k set: the rest of the
    <split>.topk_indices.npy  (N, V[, L], k) uint8/int16/uint16/int32 } distribution is rebuilt
    <split>.logsumexp.npy     (N, V[, L]) float32                   } from the log-sum-exp
    <split>.tail_samples.npy  (N, V[, L], S) like the indices       tail="sampled": draws outside the top k
    <split>.label_logits.npy  (N, V[, L]) float32                   top_k, val/test: the teacher's logit of the label
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.augment import VIEW_SEED
from kd_lightning.data.batch import kept_labels
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError, check_integer, is_integer

FORMAT_VERSION = 2  # 2: top-k recordings keep the teacher's logit of each evaluation label
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
TAILS = ("student", "uniform", "sampled")


@dataclass(frozen=True)
class RecordingSettings:
    """``teacher.recording``: what to record. Checked when the config is read, before any training.

    Args:
        views_per_sample: augmented views recorded per training image, or ``"all"`` distinct views.
        top_k: keep the k largest logits + the log-sum-exp per view (``None``: all, float16).
        dir: a recording to use instead of the one keyed under ``paths.cache_dir``.
        tail: how training fills in the classes outside the top k: ``student``, the teacher's tail
            mass shared in proportion to the student's own probabilities (the loss is then exactly
            the KL between the two distributions coarsened to the top k plus one "rest" class);
            ``uniform``, spread evenly; ``sampled``, shared over ``tail_samples`` classes drawn from
            the teacher's tail when recording (unbiased for forward KL; recorded with the top k).
        tail_samples: draws per position from the teacher's tail, for ``tail="sampled"``.
    """

    views_per_sample: int | str = 16
    top_k: int | None = None
    dir: str | None = None
    tail: str = "student"
    tail_samples: int = 32

    @property
    def samples(self) -> int:
        """Tail draws recorded per position: ``tail_samples`` for ``tail="sampled"``, else none."""
        return self.tail_samples if self.tail == "sampled" else 0

    def __post_init__(self) -> None:
        if self.views_per_sample != "all" and (not is_integer(self.views_per_sample) or self.views_per_sample < 1):
            raise KDError(
                f"teacher.recording.views_per_sample must be a positive integer or 'all', got {self.views_per_sample!r}."
            )
        if self.top_k is not None and (not is_integer(self.top_k) or self.top_k < 1):
            raise KDError(
                f"teacher.recording.top_k must be a positive integer (or null for all classes), got {self.top_k!r}."
            )
        if self.tail not in TAILS:
            raise KDError(f"teacher.recording.tail must be one of {', '.join(TAILS)}, got {self.tail!r}.")
        check_integer("teacher.recording.tail_samples", self.tail_samples)
        if self.tail == "sampled" and self.top_k is None:
            raise KDError(
                "teacher.recording.tail=sampled draws from the classes outside the top k; set "
                "teacher.recording.top_k too (a recording of all logits has no tail)."
            )

    def check_classes(self, num_classes: int) -> None:
        """``top_k`` keeps at most all ``num_classes`` logits."""
        if self.top_k is not None and self.top_k > num_classes:
            raise KDError(
                f"teacher.recording.top_k={self.top_k} must be between 1 and the {num_classes} classes (or null for all)."
            )
        if self.samples and self.top_k == num_classes:
            raise KDError(
                f"teacher.recording.tail=sampled with top_k={self.top_k} of {num_classes} classes leaves no tail "
                "to draw from; lower top_k or use tail=student."
            )


def student_shaped_tail(values: Tensor, indices: Tensor, logsumexp: Tensor, student_logits: Tensor) -> Tensor:
    """Teacher log-probabilities ``(..., C)``: its exact top-k, and its tail mass ``m`` shared over the other
    classes in proportion to the (detached) student's probabilities there.

    Forward KL against it is ``Σ_topk p log(p/q) + m log(m / q_tail)``, the KL of the two distributions
    coarsened to the top k and one "rest" class: nothing is assumed about the shape of the teacher's tail.
    """
    indices = indices.long()
    log_q = torch.log_softmax(student_logits.detach().float(), -1)
    log_p_top = values.float() - logsumexp[..., None]
    log_q_tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    log_m = torch.log1p(-log_p_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return log_q.add_(log_m - log_q_tail).scatter_(-1, indices, log_p_top)


def sampled_tail(values: Tensor, indices: Tensor, logsumexp: Tensor, samples: Tensor, num_classes: int) -> Tensor:
    """Teacher log-probabilities ``(..., C)``: its exact top-k, and its tail mass ``m`` shared over the classes drawn
    from its tail when recording (``samples``, ``(..., S)``), ``m · count / S`` each; the other classes get 0 (``-inf``).

    Its expectation over the draws is the teacher's distribution, so forward KL's gradient ``q − p̂`` is unbiased.
    """
    log_p_top = values.float() - logsumexp[..., None]
    counts = torch.zeros(values.shape[:-1] + (num_classes,), device=values.device)
    counts.scatter_add_(-1, samples.long(), torch.ones(samples.shape, device=values.device))
    tail_mass = (1 - log_p_top.exp().sum(-1, keepdim=True)).clamp_min(0)
    return counts.log_().add_(torch.log(tail_mass / samples.shape[-1])).scatter_(-1, indices.long(), log_p_top)


def draw_from_tail(logits: Tensor, top_indices: Tensor, num_draws: int, seed: int) -> Tensor:
    """``num_draws`` class ids per position ``(..., S)``, drawn with replacement from the distribution of ``logits``
    ``(..., C)`` (T=1) outside the classes ``top_indices`` ``(..., k)``; the same ``seed`` draws the same ids."""
    tail = torch.softmax(logits.float(), -1).scatter_(-1, top_indices, 0).flatten(0, -2)
    tail = torch.where(tail.sum(-1, keepdim=True) > 0, tail, 1)  # no mass outside the top k: any class (weighs 0)
    generator = torch.Generator(device=tail.device).manual_seed(seed)
    draws = torch.multinomial(tail, num_draws, replacement=True, generator=generator)
    return draws.view(*logits.shape[:-1], num_draws)


def rebuild_logits(
    values: Tensor,
    indices: Tensor,
    logsumexp: Tensor,
    num_classes: int,
    labels: Tensor | None = None,
    label_logits: Tensor | None = None,
) -> Tensor:
    """Full ``(N, C)`` logits from the top-k ``(N, k)`` and the full log-sum-exp ``(N,)``.

    The k kept classes keep their exact (float16) logits; the mass the teacher put on the
    others, ``1 − Σ_topk p``, is spread evenly over them. At T=1 the rebuilt distribution has
    the teacher's top-k probabilities and tail mass; at other T the tail is approximated.
    With ``labels`` ``(N,)`` and the teacher's recorded ``label_logits`` ``(N,)`` (evaluation splits), a label
    outside the top k gets its exact logit too and the rest of the tail mass is spread over the others:
    the teacher's probability of the label, and so its perplexity and accuracy, are exact.
    """
    values = values.float()
    k = values.shape[-1]
    if k == num_classes:
        return torch.empty(values.shape[:-1] + (num_classes,), device=values.device).scatter_(
            -1, indices.long(), values
        )
    tail_mass = (1 - torch.exp(values - logsumexp[..., None]).sum(-1)).clamp_min(1e-12)
    if labels is None or label_logits is None:
        tail_logit = logsumexp + torch.log(tail_mass / (num_classes - k))
        logits = tail_logit[..., None].expand(*values.shape[:-1], num_classes).clone()
        return logits.scatter_(-1, indices.long(), values)
    label = torch.where(kept_labels(labels), labels, 0).long()[
        ..., None
    ]  # -100 (not counted): any class, left as the tail
    exact = kept_labels(labels) & ~(indices.long() == label).any(-1)  # a label outside the top k
    label_mass = torch.where(exact, torch.exp(label_logits.float() - logsumexp), 0)
    others = num_classes - k - exact.long()
    tail_logit = logsumexp + torch.log((tail_mass - label_mass).clamp_min(1e-12) / others.clamp_min(1))
    logits = tail_logit[..., None].expand(*values.shape[:-1], num_classes).clone()
    logits.scatter_(-1, label, torch.where(exact, label_logits.float(), tail_logit)[..., None])
    return logits.scatter_(-1, indices.long(), values)


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes (about 1 GB/s on one core)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_file(path: Path, array: np.ndarray, num_classes: int | None, digest: str | None) -> None:
    """Refuse a recorded file whose bytes changed since it was recorded (``digest``: its SHA-256 in ``meta.json``;
    ``None`` for a recording made before digests were kept), whose values are not finite, or whose class ids fall
    outside ``0 .. num_classes − 1`` (``None``: not class ids): the reason on one line, with the fix."""
    fix = f"delete {path.parent} and it is recorded again"
    if digest is not None and file_digest(path) != digest:
        raise KDError(
            f"the teacher recording {path} was changed after it was recorded (its SHA-256 differs from the one "
            f"in {META_FILE}); {fix}."
        )
    rows = max(1, (1 << 24) // max(1, array[:1].nbytes))  # about 16 MiB at a time
    for start in range(0, len(array), rows):
        part = array[start : start + rows]
        if array.dtype.kind == "f" and not np.isfinite(part).all():
            raise KDError(
                f"the teacher recording {path} holds values that are not finite (NaN or infinite) in samples "
                f"from {start}; {fix}."
            )
        if (
            num_classes is not None
            and array.dtype.kind in "iu"
            and part.size
            and (part.min() < 0 or part.max() >= num_classes)
        ):
            raise KDError(
                f"the teacher recording {path} holds class ids outside 0..{num_classes - 1} in samples from "
                f"{start}; {fix}."
            )


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds class (token) ids ``0 .. num_classes − 1``."""
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def data_identity(datamodule: InMemoryDataModule) -> dict[str, Any]:
    """What a recording depends on in the data: the contents of every split and the augmentation."""
    datamodule.setup("fit")
    splits = {}
    for split, data in sorted(datamodule.splits.items()):
        digest = hashlib.sha256()
        for tensor in (data.inputs, data.targets, *(data.fields[name] for name in sorted(data.fields))):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        splits[split] = digest.hexdigest()[:16]
    augment = datamodule.augment
    return {
        "splits": splits,
        "augment": None if augment is None else {"type": type(augment).__name__, **vars(augment)},
        "view_seed": VIEW_SEED,
    }


def describe_mismatch(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (teacher, data, views, ...)."""
    problems = []
    for key in sorted(set(recorded) | set(wanted)):
        if recorded.get(key) != wanted.get(key):
            if key == "teacher" and wanted.get(key) is None:
                continue  # no teacher file to compare with: the user vouches for it
            what = {"teacher": "teacher weights", "data": "data (split contents or augmentation)"}.get(key, key)
            problems.append(f"{what}: recorded {recorded.get(key)!r}, this run {wanted.get(key)!r}")
    return problems
