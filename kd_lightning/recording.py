"""The recording: a teacher's logits written once, then looked up instead of running the teacher.

A KD step pays for a teacher forward pass; a sweep over T and alpha pays it again in every
job. With ``teacher.mode=recorded`` one pass over the data (``Trainer.predict``) records the
teacher's logits into memory-mapped ``.npy`` files, keyed by the teacher's weights, the data's
contents and the augmentation (:mod:`kd_lightning.teacher_source` keeps them under
``paths.cache_dir/recordings/``); every later run with the same key answers the teacher's
question from them (:class:`RecordedTeacher`) and never loads the teacher.

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

    meta.json                 identity (what was recorded from), shapes, top_k, tail mass; written last
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
import json
import logging
import math
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.data.augment import VIEW_SEED, RandomCropFlip, RecordedViews
from kd_lightning.data.batch import Batch
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write_text
from kd_lightning.models.outputs import model_logits
from kd_lightning.teacher import BlockLogits, Teacher
from kd_lightning.vocab import check_padding_unused

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: top-k recordings keep the teacher's logit of each evaluation label
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
PROGRESS_EVERY_S = 10.0  # a killed recording loses at most about this much work
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
        if self.views_per_sample != "all" and (isinstance(self.views_per_sample, bool) or not isinstance(self.views_per_sample, int)
                                               or self.views_per_sample < 1):
            raise KDError(f"teacher.recording.views_per_sample must be a positive integer or 'all', got {self.views_per_sample!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise KDError(f"teacher.recording.top_k must be a positive integer (or null for all classes), got {self.top_k!r}.")
        if self.tail not in TAILS:
            raise KDError(f"teacher.recording.tail must be one of {', '.join(TAILS)}, got {self.tail!r}.")
        if isinstance(self.tail_samples, bool) or not isinstance(self.tail_samples, int) or self.tail_samples < 1:
            raise KDError(f"teacher.recording.tail_samples must be a positive integer, got {self.tail_samples!r}.")
        if self.tail == "sampled" and self.top_k is None:
            raise KDError("teacher.recording.tail=sampled draws from the classes outside the top k; set "
                          "teacher.recording.top_k too (a recording of all logits has no tail).")

    def check_classes(self, num_classes: int) -> None:
        """``top_k`` keeps at most all ``num_classes`` logits."""
        if self.top_k is not None and self.top_k > num_classes:
            raise KDError(f"teacher.recording.top_k={self.top_k} must be between 1 and the {num_classes} classes (or null for all).")
        if self.samples and self.top_k == num_classes:
            raise KDError(f"teacher.recording.tail=sampled with top_k={self.top_k} of {num_classes} classes leaves no tail "
                          "to draw from; lower top_k or use tail=student.")


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


def rebuild_logits(values: Tensor, indices: Tensor, logsumexp: Tensor, num_classes: int, labels: Tensor | None = None,
                   label_logits: Tensor | None = None) -> Tensor:
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
        return torch.empty(values.shape[:-1] + (num_classes,), device=values.device).scatter_(-1, indices.long(), values)
    tail_mass = (1 - torch.exp(values - logsumexp[..., None]).sum(-1)).clamp_min(1e-12)
    if labels is None or label_logits is None:
        tail_logit = logsumexp + torch.log(tail_mass / (num_classes - k))
        logits = tail_logit[..., None].expand(*values.shape[:-1], num_classes).clone()
        return logits.scatter_(-1, indices.long(), values)
    label = labels.clamp_min(0).long()[..., None]  # -100 (not counted): any class, left as the tail
    exact = (labels >= 0) & ~(indices.long() == label).any(-1)  # a label outside the top k
    label_mass = torch.where(exact, torch.exp(label_logits.float() - logsumexp), 0)
    others = num_classes - k - exact.long()
    tail_logit = logsumexp + torch.log((tail_mass - label_mass).clamp_min(1e-12) / others.clamp_min(1))
    logits = tail_logit[..., None].expand(*values.shape[:-1], num_classes).clone()
    logits.scatter_(-1, label, torch.where(exact, label_logits.float(), tail_logit)[..., None])
    return logits.scatter_(-1, indices.long(), values)


class RecordedTeacher(Teacher):
    """The teacher of one recording: logits looked up by split, ``batch["index"]`` and ``batch["view"]``.

    The arrays are memory-mapped on the CPU and copied once to an accelerator on first use.
    Pickles as its path (``ddp_spawn`` processes reopen the files instead of copying them).
    """

    def __init__(self, directory: str | Path, tail: str = "student") -> None:
        super().__init__()
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise KDError(f"{self.directory} holds no teacher recording ({META_FILE} missing); point "
                          "teacher.recording.dir at a directory written by teacher.mode=recorded, or unset it.") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KDError(f"{meta_path} is unreadable ({exc}); delete {self.directory} to record the teacher again.") from None
        self.num_classes: int = self.meta["num_classes"]
        self.top_k: int | None = self.meta["top_k"]
        self.tail_samples: int = self.meta.get("tail_samples", 0)
        self.tail = tail
        if tail == "sampled" and self.top_k is not None and not self.tail_samples:
            raise KDError(f"the teacher recording in {self.directory} holds no draws from the teacher's tail, which "
                          "teacher.recording.tail=sampled needs; unset teacher.recording.dir to record them, or use tail=student.")
        self.arrays: dict[str, dict[str, Tensor]] = {}
        for split, shape in self.meta["splits"].items():
            names = ("logits",) if self.top_k is None else ("topk_values", "topk_indices", "logsumexp")
            names += ("tail_samples",) if self.tail_samples else ()
            names += ("label_logits",) if self.top_k is not None and split != "train" and self.meta.get("label_logits") else ()
            self.arrays[split] = {name: self._open(f"{split}.{name}.npy", shape) for name in names}
        self.views: RecordedViews | None = None
        if self.meta["views"]:
            self.views = RecordedViews(self._open("views.offsets.npy"), self._open("views.flips.npy"))
        self._on_device: dict[torch.device, dict[str, dict[str, Tensor]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "tail": self.tail}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state.get("tail", "student"))

    def _open(self, name: str, samples_and_views: list[int] | None = None) -> Tensor:
        path = self.directory / name
        try:
            array = np.load(path, mmap_mode="c")  # copy-on-write: a writable view, pages read on demand
        except (OSError, ValueError) as exc:
            raise KDError(f"the teacher recording {path} is missing or corrupt ({exc}); delete {self.directory} "
                          "to record the teacher again.") from None
        if samples_and_views is not None and list(array.shape[:2]) != samples_and_views:
            raise KDError(f"{path} has shape {array.shape}, expected {tuple(samples_and_views)} samples x views; "
                          f"the file is truncated or from another recording. Delete {self.directory} to record again.")
        return torch.from_numpy(array)

    def num_samples(self, split: str) -> int:
        return self.meta["splits"][split][0]

    def check_covers(self, datamodule: InMemoryDataModule, num_classes: int) -> None:
        """Refuse a recording whose classes or split sizes do not match this run's data."""
        if self.num_classes != num_classes and not (getattr(datamodule, "task", None) == "tokens" and self.num_classes > num_classes):
            raise KDError(f"the teacher recording in {self.directory} has {self.num_classes} classes but the data has "
                          f"{num_classes}; record the teacher for this data (unset teacher.recording.dir).")
        for split, data in datamodule.splits.items():
            if split not in self.meta["splits"] or self.num_samples(split) != len(data):
                raise KDError(f"the teacher recording in {self.directory} does not cover split {split!r} of this data "
                              f"({len(data)} samples); record the teacher for this data (unset teacher.recording.dir).")

    def _arrays(self, split: str, device: torch.device) -> dict[str, Tensor]:
        if device.type != "cpu" and device not in self._on_device:
            self._on_device[device] = {s: {k: v.to(device) for k, v in a.items()} for s, a in self.arrays.items()}
        arrays = (self.arrays if device.type == "cpu" else self._on_device[device]).get(split)
        if arrays is None:
            raise KDError(f"the teacher recording in {self.directory} has no split {split!r} (recorded: {sorted(self.arrays)}).")
        return arrays

    @property
    def deferred(self) -> bool:
        """A top-k recording whose tail training shapes by the student or by the draws: answered by :meth:`complete`."""
        return self.top_k is not None and self.top_k < self.num_classes and self.tail in ("student", "sampled")

    def _lookup(self, batch: Batch, split: str) -> dict[str, Tensor]:
        """The recorded arrays of samples ``batch["index"]`` in views ``batch["view"]``."""
        if "index" not in batch:
            raise KDError("a recorded teacher looks logits up by sample index: the DataModule's batches need an 'index' "
                          "entry (kd_lightning.data.InMemoryDataModule provides it), or use teacher.mode=live.")
        index = batch["index"]
        slot = batch.get("view")
        if slot is None:
            if split == "train" and self.views is not None:
                raise KDError("the teacher was recorded on augmented views but the batch says which view it shows nowhere; "
                              "call datamodule.replay_views(teacher.views) before training.")
            slot = torch.zeros_like(index)
        return {name: array[index, slot] for name, array in self._arrays(split, index.device).items()}

    def logits(self, batch: Batch, split: str) -> Tensor:
        """Float32 logits ``(N, C)`` (``(N, L, V)`` for tokens) of samples ``batch["index"]`` in views ``batch["view"]``;
        a top-k recording's tail spread evenly (training completes it with :meth:`complete` instead)."""
        found = self._lookup(batch, split)
        if self.top_k is None:
            return found["logits"].float()
        return rebuild_logits(found["topk_values"], found["topk_indices"], found["logsumexp"], self.num_classes,
                              batch.get("labels"), found.get("label_logits"))

    def complete(self, teacher_logits: Tensor | None, student_logits: Tensor, batch: Batch, split: str) -> Tensor:
        """In training, when :attr:`deferred`: the teacher's top k with its tail mass shaped like the
        student's probabilities (:func:`student_shaped_tail`) or shared over the recorded draws (:func:`sampled_tail`),
        looked up here (``teacher_logits`` is not needed); otherwise ``teacher_logits``."""
        if not self.deferred:
            return teacher_logits if teacher_logits is not None else self.logits(batch, split)
        return self._completed(self._lookup(batch, split), student_logits)

    def _completed(self, found: dict[str, Tensor], student_logits: Tensor) -> Tensor:
        if self.tail == "sampled":
            return sampled_tail(found["topk_values"], found["topk_indices"], found["logsumexp"], found["tail_samples"],
                                self.num_classes)
        return student_shaped_tail(found["topk_values"], found["topk_indices"], found["logsumexp"],
                                   student_logits[..., : self.num_classes])

    def block_logits(self, batch: Batch, split: str) -> BlockLogits:
        """The rows' logits rebuilt (and, in training, completed) from the recording, row block by row block."""
        flat = {name: array.flatten(0, 1) for name, array in self._lookup(batch, split).items()}  # (N·L, ...)

        def rows_logits(rows: slice, student_logits: Tensor) -> Tensor:
            found = {name: array[rows] for name, array in flat.items()}
            if self.top_k is None:
                return found["logits"].float()
            if split == "train" and self.deferred:
                return self._completed(found, student_logits)
            return rebuild_logits(found["topk_values"], found["topk_indices"], found["logsumexp"], self.num_classes)

        return rows_logits


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds class (token) ids ``0 .. num_classes − 1``."""
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class _Recorder(L.LightningModule):
    """``predict_step`` runs the teacher on every recorded view of a batch and writes the logits.

    Batches of samples already recorded (``done``, from a killed run) are skipped; every
    :data:`PROGRESS_EVERY_S` seconds the files are flushed and ``progress.json`` is rewritten.
    """

    def __init__(self, teacher: nn.Module, datamodule: InMemoryDataModule, top_k: int | None, tail_samples: int, width: int,
                 vocab_size: int | None, progress: dict[str, Any], progress_file: Path) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.prepare_inputs = datamodule.prepare_inputs
        self.augment: RandomCropFlip | None = datamodule.augment
        self.top_k = top_k
        self.tail_samples = tail_samples
        self.width = width  # recorded classes: the teacher's, or the tokenizer's when the teacher has padding rows
        self.vocab_size = vocab_size
        self.progress, self.progress_file = progress, progress_file
        self.split = ""
        self.views: RecordedViews | None = None  # of the split being recorded
        self.views_on_device: RecordedViews | None = None
        self.out: dict[str, np.ndarray] = {}
        self.last_save = time.monotonic()

    def on_predict_start(self) -> None:
        self.views_on_device = self.views.to(self.device) if self.views is not None else None

    def save_progress(self) -> None:
        for array in self.out.values():
            array.flush()
        atomic_write_text(self.progress_file, json.dumps(self.progress) + "\n")
        self.last_save = time.monotonic()

    def predict_step(self, batch: Batch, batch_idx: int) -> None:
        inputs, index = batch["inputs"], batch["index"]
        rows = index.cpu().numpy()
        done = self.progress["done"]
        if rows[-1] < done.get(self.split, 0):
            return  # recorded before the run was killed
        views = self.views_on_device
        tail = self.progress["tail_mass"][self.split]
        for slot in range(views.num_views if views is not None else 1):
            view = inputs if views is None else self.augment.apply(inputs, views.views(index, torch.full_like(index, slot)))
            logits = model_logits(self.teacher, {**batch, "inputs": self.prepare_inputs(view)}).float()
            if logits.shape[-1] > self.width:
                check_padding_unused(logits, self.width, self.vocab_size)
                logits = logits[..., : self.width]
            if self.top_k is None:
                self.out["logits"][rows, slot] = logits.half().cpu().numpy()
                continue
            values, indices = logits.topk(self.top_k, dim=-1)
            logsumexp = logits.logsumexp(-1)
            self.out["topk_values"][rows, slot] = values.half().cpu().numpy()
            self.out["topk_indices"][rows, slot] = indices.cpu().numpy()
            self.out["logsumexp"][rows, slot] = logsumexp.cpu().numpy()
            if "label_logits" in self.out:
                label = batch["labels"].clamp_min(0)[..., None]  # -100: not counted, any class will do
                self.out["label_logits"][rows, slot] = logits.gather(-1, label)[..., 0].cpu().numpy()
            if self.tail_samples:
                draws = draw_from_tail(logits, indices, self.tail_samples, seed=zlib.crc32(f"{self.split}:{rows[0]}:{slot}".encode()))
                self.out["tail_samples"][rows, slot] = draws.cpu().numpy()
            mass = (1 - torch.exp(values - logsumexp[..., None]).sum(-1)).clamp_min(0)  # outside the top k, at T=1
            tail["sum"] += float(mass.sum())
            tail["count"] += mass.numel()
            tail["max"] = max(tail["max"], float(mass.max()))
        done[self.split] = int(rows[-1]) + 1
        if time.monotonic() - self.last_save > PROGRESS_EVERY_S:
            self.save_progress()


def open_array(path: Path, dtype: Any, shape: tuple[int, ...], resume: bool) -> tuple[np.ndarray, bool]:
    """A memory-mapped ``.npy`` file and whether it was reused: the existing one when resuming (same dtype and shape), else new."""
    if resume and path.is_file():
        try:
            array = np.load(path, mmap_mode="r+")
            if array.dtype == dtype and array.shape == shape:
                return array, True
        except (OSError, ValueError):
            pass  # torn by the kill: its split is recorded again from the start
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape), False


def record_teacher(teacher: nn.Module, datamodule: InMemoryDataModule, directory: Path, identity: dict[str, Any],
                   settings: RecordingSettings, accelerator: str = "auto", precision: Any = "32-true",
                   vocab_size: int | None = None) -> None:
    """Run ``teacher`` over every split of ``datamodule`` (training views included) and write a recording.

    The files go to ``.<name>.partial/`` beside ``directory``, renamed to ``directory`` when
    complete, so a later run never trusts a half-written recording; a killed recording of the same
    identity resumes where it stopped. ``vocab_size`` (tokens): a teacher with more output rows
    than the tokenizer has tokens is recorded on the tokenizer's rows, after checking the others
    are unused padding.
    """
    datamodule.setup("fit")
    example = {"inputs": datamodule.prepare_inputs(datamodule.splits["train"].inputs[:1]).to(next(teacher.parameters()).device)}
    with torch.no_grad():
        example_logits = model_logits(teacher.eval(), example)
    teacher_width = example_logits.shape[-1]
    width = min(teacher_width, vocab_size) if vocab_size is not None else teacher_width
    positions = tuple(example_logits.shape[1:-1])  # () for images, (L,) for tokens
    settings.check_classes(width)
    augment = datamodule.augment
    views = RecordedViews.draw(augment, len(datamodule.splits["train"]), settings.views_per_sample) if augment is not None else None
    started = time.perf_counter()
    partial = directory.with_name(f".{directory.name}.partial")
    progress_file = partial / PROGRESS_FILE
    fresh = {"identity": identity, "settings": [settings.views_per_sample, settings.top_k, settings.samples, width],
             "done": {}, "tail_mass": {}}
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    resume = progress is not None and {k: progress.get(k) for k in ("identity", "settings")} == {
        k: json.loads(json.dumps(fresh[k])) for k in ("identity", "settings")}
    if resume:
        log.info("teacher recording: resuming %s (%s done)", partial, progress["done"])
    else:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        progress = fresh
    if views is not None:
        np.save(partial / "views.offsets.npy", views.offsets.numpy())
        np.save(partial / "views.flips.npy", views.flips.numpy())
    recorder = _Recorder(teacher, datamodule, settings.top_k, settings.samples, width, vocab_size, progress, progress_file)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    splits: dict[str, list[int]] = {}
    bytes_per_position = 0
    for split, data in datamodule.splits.items():
        recorder.split = split
        recorder.views = views if split == "train" else None
        shape = (len(data), views.num_views if recorder.views is not None else 1)
        if settings.top_k is None:
            files = {"logits": (shape + positions + (width,), np.dtype(np.float16))}
        else:
            files = {"topk_values": (shape + positions + (settings.top_k,), np.dtype(np.float16)),
                     "topk_indices": (shape + positions + (settings.top_k,), index_dtype(width)),
                     "logsumexp": (shape + positions, np.dtype(np.float32))}
            if settings.samples:
                files["tail_samples"] = (shape + positions + (settings.samples,), index_dtype(width))
            if split != "train":  # the teacher's perplexity on the evaluation splits stays exact
                files["label_logits"] = (shape + positions, np.dtype(np.float32))
        if split == "train":
            bytes_per_position = sum(dtype.itemsize * (full[-1] if name != "logsumexp" else 1)
                                     for name, (full, dtype) in files.items())
        opened = {name: open_array(partial / f"{split}.{name}.npy", dtype, full, progress["done"].get(split, 0) > 0)
                  for name, (full, dtype) in files.items()}
        recorder.out = {name: array for name, (array, _) in opened.items()}
        if not all(reused for _, reused in opened.values()):
            progress["done"][split] = 0
            progress["tail_mass"][split] = {"sum": 0.0, "count": 0, "max": 0.0}
        if progress["done"].get(split, 0) < len(data):
            log.info("teacher recording: recording %d x %d views of split %s", *shape, split)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*predict returned None.*")  # the outputs go to the files
                trainer.predict(recorder, dataloaders=datamodule.loader(split, train=False), return_predictions=False)
        recorder.save_progress()
        recorder.out = {}
        splits[split] = list(shape)
    tails = progress["tail_mass"].values()
    tail = {"sum": sum(t["sum"] for t in tails), "count": sum(t["count"] for t in tails), "max": max((t["max"] for t in tails), default=0.0)}
    meta = {"format": FORMAT_VERSION, "identity": identity, "num_classes": width, "top_k": settings.top_k,
            "tail_samples": settings.samples, "label_logits": settings.top_k is not None,
            "views_per_sample": settings.views_per_sample, "views": views is not None, "splits": splits,
            "positions": list(positions), "bytes_per_position": bytes_per_position,
            "tail_mass": {"mean": tail["sum"] / tail["count"], "max": tail["max"]} if tail["count"] else None,
            "seconds": round(time.perf_counter() - started, 1)}
    (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    progress_file.unlink()
    if directory.exists():  # a stale, incomplete directory
        shutil.rmtree(directory)
    os.replace(partial, directory)
    what = "token" if positions else "sample"
    log.info("teacher recording: recorded in %.1f s at %s, %d bytes per %s%s", meta["seconds"], directory,
             bytes_per_position, what, "" if meta["tail_mass"] is None else
             f"; the top {settings.top_k} hold {100 * (1 - meta['tail_mass']['mean']):.2f}% of the teacher's probability "
             f"on average (tail mass: mean {meta['tail_mass']['mean']:.4f}, max {meta['tail_mass']['max']:.4f})"
             + (f", {settings.samples} draws from the tail per {what}" if settings.samples else ""))


def data_identity(datamodule: InMemoryDataModule) -> dict[str, Any]:
    """What a recording depends on in the data: the contents of every split and the augmentation."""
    datamodule.setup("fit")
    splits = {}
    for split, data in sorted(datamodule.splits.items()):
        digest = hashlib.sha256()
        for tensor in (data.inputs, data.targets):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        splits[split] = digest.hexdigest()[:16]
    augment = datamodule.augment
    return {"splits": splits, "augment": None if augment is None else {"type": type(augment).__name__, **vars(augment)},
            "view_seed": VIEW_SEED}


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
