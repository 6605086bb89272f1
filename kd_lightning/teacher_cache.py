"""Cached teacher: record the frozen teacher's logits once, replay them in every later run.

A KD step pays for a teacher forward pass; a sweep over T and alpha pays it again in every
job. With ``teacher.mode=cached`` one pass over the data (``Trainer.predict``) records the
teacher's logits into memory-mapped ``.npy`` files under ``paths.cache_dir/teacher_outputs/``,
keyed by the teacher's weights, the data's contents and the augmentation; every later run
with the same key looks the logits up by ``(index, view)`` and never loads the teacher.

Augmented training images: for each image, ``views_per_sample`` augmentation parameters
(crop offset, flip) are drawn once and the teacher is run on each of those views. Training
then picks one of the recorded views per image and step, so teacher and student still see
the same pixels. ``views_per_sample="all"`` records every distinct view (162 for a 32x32
crop with padding 4 and flips): cached KD is then live KD, up to float16 rounding.

Layout of one cache directory::

    meta.json                 identity (what the outputs were recorded from), shapes, top_k
    views.offsets.npy         (N or 1, V, 2) uint8 crop offsets     } training views; absent
    views.flips.npy           (N or 1, V) bool                      } without augmentation
    <split>.logits.npy        (N, V, C) float16                     (top_k null)
    <split>.topk_values.npy   (N, V, k) float16                     } top_k set: the rest of the
    <split>.topk_indices.npy  (N, V, k) int16/int32                 } distribution is rebuilt
    <split>.logsumexp.npy     (N, V) float32                        } from the log-sum-exp
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.data.augment import CropFlipViews, RandomCropFlip
from kd_lightning.errors import KDError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VIEW_SEED = 0  # fixed, so runs with different seeds share one recording
META_FILE = "meta.json"


@dataclass
class ViewBank:
    """Pre-drawn augmentation parameters: ``offsets (N or 1, V, 2)`` and ``flips (N or 1, V)``.

    A leading dimension of 1 means every sample has the same ``V`` views (``views_per_sample=all``).
    """

    offsets: Tensor
    flips: Tensor

    @property
    def num_views(self) -> int:
        return self.flips.shape[1]

    def views(self, index: Tensor, slot: Tensor) -> CropFlipViews:
        """The views ``slot`` ``(N,)`` of samples ``index`` ``(N,)``."""
        rows = index if self.offsets.shape[0] > 1 else torch.zeros_like(index)
        return CropFlipViews(self.offsets[rows, slot].long(), self.flips[rows, slot])

    def to(self, device: torch.device) -> ViewBank:
        return ViewBank(self.offsets.to(device), self.flips.to(device))


def draw_view_bank(augment: RandomCropFlip, num_samples: int, views_per_sample: int | str, seed: int = VIEW_SEED) -> ViewBank:
    """``views_per_sample`` random views per sample, or every distinct view once (``"all"``)."""
    if views_per_sample == "all":
        side = 2 * augment.padding + 1
        grid = torch.cartesian_prod(torch.arange(side), torch.arange(side))  # (side², 2)
        flips = [False, True] if augment.flip else [False]
        offsets = grid.repeat(len(flips), 1)
        flip_of = torch.tensor(flips).repeat_interleave(len(grid))
        return ViewBank(offsets[None].to(torch.uint8), flip_of[None])
    if not isinstance(views_per_sample, int) or views_per_sample < 1:
        raise KDError(f"teacher.cache.views_per_sample must be a positive integer or 'all', got {views_per_sample!r}.")
    generator = torch.Generator().manual_seed(seed)
    drawn = augment.draw(num_samples * views_per_sample, generator=generator)
    return ViewBank(drawn.offsets.view(num_samples, views_per_sample, 2).to(torch.uint8), drawn.flips.view(num_samples, views_per_sample))


def rebuild_logits(values: Tensor, indices: Tensor, logsumexp: Tensor, num_classes: int) -> Tensor:
    """Full ``(N, C)`` logits from the top-k ``(N, k)`` and the full log-sum-exp ``(N,)``.

    The k kept classes keep their exact (float16) logits; the mass the teacher put on the
    others, ``1 − Σ_topk p``, is spread evenly over them. At T=1 the rebuilt distribution has
    the teacher's top-k probabilities and tail mass; at other T the tail is approximated.
    """
    values = values.float()
    k = values.shape[-1]
    if k == num_classes:
        return torch.empty(values.shape[:-1] + (num_classes,), device=values.device).scatter_(-1, indices.long(), values)
    tail_mass = (1 - torch.exp(values - logsumexp[..., None]).sum(-1)).clamp_min(1e-12)
    tail_logit = logsumexp + torch.log(tail_mass / (num_classes - k))
    logits = tail_logit[..., None].expand(*values.shape[:-1], num_classes).clone()
    return logits.scatter_(-1, indices.long(), values)


class TeacherOutputs:
    """Recorded teacher logits of one cache directory, looked up by split, sample index and view."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise KDError(f"{self.directory} holds no recorded teacher outputs ({META_FILE} missing); point "
                          "teacher.cache.dir at a directory written by teacher.mode=cached, or unset it.") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KDError(f"{meta_path} is unreadable ({exc}); delete {self.directory} to record the outputs again.") from None
        self.num_classes: int = self.meta["num_classes"]
        self.top_k: int | None = self.meta["top_k"]
        self.arrays: dict[str, dict[str, Tensor]] = {}
        for split, shape in self.meta["splits"].items():
            names = ("logits",) if self.top_k is None else ("topk_values", "topk_indices", "logsumexp")
            self.arrays[split] = {name: self._open(f"{split}.{name}.npy", shape) for name in names}
        self.views: ViewBank | None = None
        if self.meta["views"]:
            self.views = ViewBank(self._open("views.offsets.npy"), self._open("views.flips.npy"))
        self._on_device: dict[torch.device, tuple[dict[str, dict[str, Tensor]], ViewBank | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory}  # spawned processes reopen the files instead of copying them

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])

    def _open(self, name: str, samples_and_views: list[int] | None = None) -> Tensor:
        path = self.directory / name
        try:
            array = np.load(path, mmap_mode="c")  # copy-on-write: a writable view, pages read on demand
        except (OSError, ValueError) as exc:
            raise KDError(f"recorded teacher outputs {path} are missing or corrupt ({exc}); delete {self.directory} "
                          "to record them again.") from None
        if samples_and_views is not None and list(array.shape[:2]) != samples_and_views:
            raise KDError(f"{path} has shape {array.shape}, expected {tuple(samples_and_views)} samples x views; "
                          f"the file is truncated or from another recording. Delete {self.directory} to record again.")
        return torch.from_numpy(array)

    def num_samples(self, split: str) -> int:
        return self.meta["splits"][split][0]

    def _arrays(self, device: torch.device) -> tuple[dict[str, dict[str, Tensor]], ViewBank | None]:
        """The outputs on ``device``: memory-mapped on the CPU, copied once to an accelerator."""
        if device.type == "cpu":
            return self.arrays, self.views
        if device not in self._on_device:
            moved = {split: {k: v.to(device) for k, v in arrays.items()} for split, arrays in self.arrays.items()}
            self._on_device[device] = (moved, self.views.to(device) if self.views is not None else None)
        return self._on_device[device]

    def view_bank(self, device: torch.device) -> ViewBank | None:
        return self._arrays(device)[1]

    def lookup(self, split: str, index: Tensor, slot: Tensor | None = None) -> Tensor:
        """Float32 teacher logits ``(N, C)`` of samples ``index`` ``(N,)``, view ``slot`` ``(N,)`` (default 0)."""
        arrays = self._arrays(index.device)[0].get(split)
        if arrays is None:
            raise KDError(f"the teacher outputs in {self.directory} have no split {split!r} (recorded: {sorted(self.arrays)}).")
        if slot is None:
            slot = torch.zeros_like(index)
        if self.top_k is None:
            return arrays["logits"][index, slot].float()
        return rebuild_logits(arrays["topk_values"][index, slot], arrays["topk_indices"][index, slot],
                              arrays["logsumexp"][index, slot], self.num_classes)


class _RecordTeacher(L.LightningModule):
    """``predict_step`` runs the teacher on every recorded view of a batch and writes the logits."""

    def __init__(self, teacher: nn.Module, prepare_inputs: Callable[[Tensor], Tensor], augment: RandomCropFlip | None,
                 views: ViewBank | None, top_k: int | None) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.prepare_inputs = prepare_inputs
        self.augment = augment
        self.bank = views
        self.top_k = top_k
        self.out: dict[str, np.ndarray] = {}
        self.bank_on_device: ViewBank | None = None

    def on_predict_start(self) -> None:
        self.bank_on_device = self.bank.to(self.device) if self.bank is not None else None

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        images, _, index = batch[:3]
        bank = self.bank_on_device
        num_views = bank.num_views if bank is not None else 1
        rows = index.cpu().numpy()
        for slot in range(num_views):
            view = images
            if bank is not None:
                view = self.augment.apply(images, bank.views(index, torch.full_like(index, slot)))
            logits = self.teacher(self.prepare_inputs(view)).float()
            if self.top_k is None:
                self.out["logits"][rows, slot] = logits.half().cpu().numpy()
            else:
                values, indices = logits.topk(self.top_k, dim=-1)
                self.out["topk_values"][rows, slot] = values.half().cpu().numpy()
                self.out["topk_indices"][rows, slot] = indices.cpu().numpy()
                self.out["logsumexp"][rows, slot] = logits.logsumexp(-1).cpu().numpy()


def record_teacher_outputs(teacher: nn.Module, datamodule: Any, directory: Path, identity: dict[str, Any],
                           views_per_sample: int | str, top_k: int | None, accelerator: str = "auto",
                           precision: Any = "32-true") -> None:
    """Run ``teacher`` over every split of ``datamodule`` (training views included) and write the cache.

    The files go to a temporary directory renamed to ``directory`` at the end, so a crash never
    leaves a half-written cache that a later run would trust.
    """
    datamodule.setup("fit")
    augment = getattr(datamodule, "augment", None)
    train_size = len(datamodule.splits["train"])
    bank = draw_view_bank(augment, train_size, views_per_sample) if augment is not None else None
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if bank is not None:
            np.save(tmp / "views.offsets.npy", bank.offsets.numpy())
            np.save(tmp / "views.flips.npy", bank.flips.numpy())

        recorder = _RecordTeacher(teacher, datamodule.prepare_inputs, augment, bank, top_k)
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        splits: dict[str, list[int]] = {}
        num_classes = None
        started = time.perf_counter()
        for split, data in datamodule.splits.items():
            num_views = bank.num_views if split == "train" and bank is not None else 1
            recorder.bank = bank if split == "train" else None
            if num_classes is None:
                with torch.no_grad():
                    example = datamodule.prepare_inputs(data.inputs[:1])
                    num_classes = teacher.eval()(example.to(next(teacher.parameters()).device)).shape[-1]
            shape = (len(data), num_views)
            if top_k is not None and not 1 <= top_k <= num_classes:
                raise KDError(f"teacher.cache.top_k={top_k} must be between 1 and the {num_classes} classes (or null for all).")
            if top_k is None:
                files = {"logits": (shape + (num_classes,), np.float16)}
            else:
                files = {"topk_values": (shape + (top_k,), np.float16),
                         "topk_indices": (shape + (top_k,), np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32),
                         "logsumexp": (shape, np.float32)}
            recorder.out = {name: np.lib.format.open_memmap(tmp / f"{split}.{name}.npy", mode="w+", dtype=dtype, shape=full)
                            for name, (full, dtype) in files.items()}
            log.info("teacher outputs: recording %d x %d views of split %s", len(data), num_views, split)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*predict returned None.*")  # the outputs go to the files
                trainer.predict(recorder, dataloaders=datamodule._loader(split, train=False), return_predictions=False)
            for array in recorder.out.values():
                array.flush()
            recorder.out = {}
            splits[split] = list(shape)
        meta = {"format": FORMAT_VERSION, "identity": identity, "num_classes": num_classes, "top_k": top_k,
                "views_per_sample": views_per_sample, "views": bank is not None, "splits": splits,
                "seconds": round(time.perf_counter() - started, 1)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():  # a stale, incomplete directory: the meta file is written last
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    log.info("teacher outputs: recorded in %.1f s at %s", meta["seconds"], directory)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_identity(datamodule: Any) -> dict[str, Any]:
    """What the recorded outputs depend on in the data: the contents of every split and the augmentation."""
    datamodule.setup("fit")
    splits = {}
    for split, data in sorted(datamodule.splits.items()):
        digest = hashlib.sha256()
        for tensor in (data.inputs, data.targets):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        splits[split] = digest.hexdigest()[:16]
    augment = getattr(datamodule, "augment", None)
    return {"splits": splits, "augment": None if augment is None else {"type": type(augment).__name__, **vars(augment)}}


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
