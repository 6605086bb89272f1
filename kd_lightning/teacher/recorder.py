"""The recorder: one pass of the teacher over the data, written as a recording (:mod:`kd_lightning.teacher.format`).

In four steps: :func:`plan` (the files and their shapes), :func:`resume` (what a killed recording of the same
identity already holds), :func:`record` (``Trainer.predict`` over every split and view), :func:`finish` (``meta.json``,
then the directory into place), all inside one :func:`~kd_lightning.files.atomic_directory`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from kd_lightning.data.augment import RandomCropFlip, RecordedViews
from kd_lightning.data.batch import Batch, kept_labels
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.files import atomic_directory, atomic_write_text
from kd_lightning.models.outputs import model_logits
from kd_lightning.teacher.format import (
    FORMAT_VERSION,
    META_FILE,
    PROGRESS_FILE,
    RecordingSettings,
    draw_from_tail,
    file_digest,
    index_dtype,
)
from kd_lightning.vocab import check_padding_unused

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0  # a killed recording loses at most about this much work


class _Recorder(L.LightningModule):
    """``predict_step`` runs the teacher on every recorded view of a batch and writes the logits.

    Batches of samples already recorded (``done``, from a killed run) are skipped; every
    :data:`PROGRESS_EVERY_S` seconds the files are flushed and ``progress.json`` is rewritten.
    """

    def __init__(
        self,
        teacher: nn.Module,
        datamodule: InMemoryDataModule,
        top_k: int | None,
        tail_samples: int,
        width: int,
        vocab_size: int | None,
        progress: dict[str, Any],
        progress_file: Path,
    ) -> None:
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
        for slot in range(views.per_sample if views is not None else 1):
            view = (
                inputs
                if views is None
                else self.augment.apply(inputs, views.views(index, torch.full_like(index, slot)))
            )
            logits = model_logits(self.teacher, {**batch, "inputs": self.prepare_inputs(view)}).float()
            if logits.shape[-1] > self.width:
                if (
                    self.vocab_size is not None
                ):  # None: a teacher trained here, whose extra rows are padding by construction
                    check_padding_unused(logits, self.width, self.vocab_size)
                logits = logits[..., : self.width]
            # a token batch may be cut to its longest row (chat data): it fills the first positions of each sample
            at = (rows, slot) if logits.ndim == 2 else (rows, slot, slice(0, logits.shape[1]))
            if self.top_k is None:
                self.out["logits"][at] = logits.half().cpu().numpy()
                continue
            values, indices = logits.topk(self.top_k, dim=-1)
            logsumexp = logits.logsumexp(-1)
            self.out["topk_values"][at] = values.half().cpu().numpy()
            self.out["topk_indices"][at] = indices.cpu().numpy()
            self.out["logsumexp"][at] = logsumexp.cpu().numpy()
            if "label_logits" in self.out:
                labels = batch["labels"]
                label = torch.where(kept_labels(labels), labels, 0)[..., None]  # not counted: any class will do
                self.out["label_logits"][at] = logits.gather(-1, label)[..., 0].cpu().numpy()
            if self.tail_samples:
                draws = draw_from_tail(
                    logits, indices, self.tail_samples, seed=zlib.crc32(f"{self.split}:{rows[0]}:{slot}".encode())
                )
                self.out["tail_samples"][at] = draws.cpu().numpy()
            mass = (1 - torch.exp(values - logsumexp[..., None]).sum(-1)).clamp_min(0)  # outside the top k, at T=1
            tail["sum"] += float(mass.sum())
            tail["count"] += mass.numel()
            tail["max"] = max(tail["max"], float(mass.max()))
        done[self.split] = int(rows[-1]) + 1
        if time.monotonic() - self.last_save > PROGRESS_EVERY_S:
            self.save_progress()


def _open_array(path: Path, dtype: Any, shape: tuple[int, ...], resume: bool) -> tuple[np.ndarray, bool]:
    """A memory-mapped ``.npy`` file and whether it was reused: the existing one when resuming (same dtype and shape), else new."""
    if resume and path.is_file():
        try:
            array = np.load(path, mmap_mode="r+")
            if array.dtype == dtype and array.shape == shape:
                return array, True
        except (OSError, ValueError):
            pass  # torn by the kill: its split is recorded again from the start
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape), False


@dataclass
class Plan:
    """What a recording of this teacher and data holds: recorded classes, positions, views, and each split's files."""

    width: int  # recorded classes: the teacher's, or the tokenizer's when the teacher has padding rows
    positions: tuple[int, ...]  # () for images, (L,) for tokens
    views: RecordedViews | None
    files: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]  # split -> name -> (shape, dtype)

    @property
    def bytes_per_position(self) -> int:
        """Bytes per training sample (or token) and view."""
        return sum(
            dtype.itemsize * (shape[-1] if name != "logsumexp" else 1)
            for name, (shape, dtype) in self.files["train"].items()
        )


def plan(
    teacher: nn.Module, datamodule: InMemoryDataModule, settings: RecordingSettings, vocab_size: int | None
) -> Plan:
    """Run the teacher on one example to learn its width and positions; lay out each split's files."""
    datamodule.setup("fit")
    example = {
        "inputs": datamodule.prepare_inputs(datamodule.splits["train"].inputs[:1]).to(next(teacher.parameters()).device)
    }
    with torch.no_grad():
        example_logits = model_logits(teacher.eval(), example)
    width = min(example_logits.shape[-1], vocab_size) if vocab_size is not None else example_logits.shape[-1]
    positions = tuple(example_logits.shape[1:-1])
    settings.check_classes(width)
    augment = datamodule.augment
    views = (
        RecordedViews.draw(augment, len(datamodule.splits["train"]), settings.views_per_sample)
        if augment is not None
        else None
    )
    files = {}
    for split, data in datamodule.splits.items():
        shape = (len(data), views.per_sample if views is not None and split == "train" else 1) + positions
        if settings.top_k is None:
            files[split] = {"logits": (shape + (width,), np.dtype(np.float16))}
            continue
        files[split] = {
            "topk_values": (shape + (settings.top_k,), np.dtype(np.float16)),
            "topk_indices": (shape + (settings.top_k,), index_dtype(width)),
            "logsumexp": (shape, np.dtype(np.float32)),
        }
        if settings.samples:
            files[split]["tail_samples"] = (shape + (settings.samples,), index_dtype(width))
        if split != "train":  # the teacher's perplexity on the evaluation splits stays exact
            files[split]["label_logits"] = (shape, np.dtype(np.float32))
    return Plan(width, positions, views, files)


def resume(partial: Path, identity: dict[str, Any], settings: RecordingSettings, layout: Plan) -> dict[str, Any]:
    """The progress of a killed recording of the same identity and settings in ``partial``; else a fresh start there."""
    fresh = {
        "identity": identity,
        "settings": [settings.views_per_sample, settings.top_k, settings.samples, layout.width],
        "done": {},
        "tail_mass": {},
    }
    progress_file = partial / PROGRESS_FILE
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    if progress is not None and all(
        progress.get(k) == json.loads(json.dumps(fresh[k])) for k in ("identity", "settings")
    ):
        log.info("teacher recording: resuming %s (%s done)", partial, progress["done"])
        return progress
    for stale in partial.iterdir():
        stale.unlink()
    return fresh


def record(
    teacher: nn.Module,
    datamodule: InMemoryDataModule,
    partial: Path,
    layout: Plan,
    settings: RecordingSettings,
    progress: dict[str, Any],
    accelerator: str,
    precision: Any,
    vocab_size: int | None,
) -> None:
    """``Trainer.predict`` over every split not yet done, each view of the training split, into ``partial``'s files."""
    if layout.views is not None:
        np.save(partial / "views.offsets.npy", layout.views.offsets.numpy())
        np.save(partial / "views.flips.npy", layout.views.flips.numpy())
    recorder = _Recorder(
        teacher,
        datamodule,
        settings.top_k,
        settings.samples,
        layout.width,
        vocab_size,
        progress,
        partial / PROGRESS_FILE,
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    for split, files in layout.files.items():
        recorder.split, recorder.views = split, layout.views if split == "train" else None
        opened = {
            name: _open_array(partial / f"{split}.{name}.npy", dtype, shape, progress["done"].get(split, 0) > 0)
            for name, (shape, dtype) in files.items()
        }
        recorder.out = {name: array for name, (array, _) in opened.items()}
        if not all(reused for _, reused in opened.values()):
            progress["done"][split] = 0
            progress["tail_mass"][split] = {"sum": 0.0, "count": 0, "max": 0.0}
        if progress["done"].get(split, 0) < len(datamodule.splits[split]):
            log.info(
                "teacher recording: recording %d x %d views of split %s", *next(iter(files.values()))[0][:2], split
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*predict returned None.*")  # the outputs go to the files
                trainer.predict(recorder, dataloaders=datamodule.loader(split, train=False), return_predictions=False)
        recorder.save_progress()
        recorder.out = {}


def finish(
    partial: Path,
    layout: Plan,
    settings: RecordingSettings,
    progress: dict[str, Any],
    identity: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Write ``meta.json`` (the recording is complete once it is there) and drop the progress file; return the meta."""
    tails = progress["tail_mass"].values()
    tail = {
        "sum": sum(t["sum"] for t in tails),
        "count": sum(t["count"] for t in tails),
        "max": max((t["max"] for t in tails), default=0.0),
    }
    meta = {
        "format": FORMAT_VERSION,
        "identity": identity,
        "num_classes": layout.width,
        "top_k": settings.top_k,
        "tail_samples": settings.samples,
        "label_logits": settings.top_k is not None,
        "views_per_sample": settings.views_per_sample,
        "views": layout.views is not None,
        "splits": {split: list(next(iter(files.values()))[0][:2]) for split, files in layout.files.items()},
        "positions": list(layout.positions),
        "bytes_per_position": layout.bytes_per_position,
        "tail_mass": {"mean": tail["sum"] / tail["count"], "max": tail["max"]} if tail["count"] else None,
        "seconds": round(seconds, 1),
        "sha256": {path.name: file_digest(path) for path in sorted(partial.glob("*.npy"))},
    }
    atomic_write_text(partial / META_FILE, json.dumps(meta, indent=2) + "\n")
    (partial / PROGRESS_FILE).unlink()
    return meta


def record_teacher(
    teacher: nn.Module,
    datamodule: InMemoryDataModule,
    directory: Path,
    identity: dict[str, Any],
    settings: RecordingSettings,
    accelerator: str = "auto",
    precision: Any = "32-true",
    vocab_size: int | None = None,
    trained_here: bool = False,
) -> None:
    """Run ``teacher`` over every split of ``datamodule`` (training views included) and write a recording.

    The files go to ``.<name>.partial/`` beside ``directory``, renamed to ``directory`` when complete, so a later run
    never trusts a half-written recording; a killed recording of the same identity resumes where it stopped.
    ``vocab_size`` (tokens): a teacher with more output rows than the tokenizer has tokens is recorded on the
    tokenizer's rows, after checking the others are unused padding (unless the teacher was ``trained_here``, on this
    tokenizer: its other rows are padding by construction).
    """
    started = time.perf_counter()
    layout = plan(teacher, datamodule, settings, vocab_size)
    with atomic_directory(Path(directory), resumable=True) as partial:
        progress = resume(partial, identity, settings, layout)
        record(
            teacher,
            datamodule,
            partial,
            layout,
            settings,
            progress,
            accelerator,
            precision,
            None if trained_here else vocab_size,
        )
        meta = finish(partial, layout, settings, progress, identity, time.perf_counter() - started)
    what = "token" if layout.positions else "sample"
    tail = meta["tail_mass"]
    log.info(
        "teacher recording: recorded in %.1f s at %s, %d bytes per %s%s",
        meta["seconds"],
        directory,
        layout.bytes_per_position,
        what,
        ""
        if tail is None
        else f"; the top {settings.top_k} hold {100 * (1 - tail['mean']):.2f}% of the teacher's probability "
        f"on average (tail mass: mean {tail['mean']:.4f}, max {tail['max']:.4f})"
        + (f", {settings.samples} draws from the tail per {what}" if settings.samples else ""),
    )
