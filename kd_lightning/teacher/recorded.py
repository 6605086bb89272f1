"""A recorded teacher: the logits of a recording (:mod:`kd_lightning.teacher.format`) looked up by sample and view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.data.augment import RecordedViews
from kd_lightning.data.batch import Batch
from kd_lightning.data.memory import InMemoryDataModule
from kd_lightning.errors import KDError
from kd_lightning.loss.chunked import TeacherBlocks
from kd_lightning.teacher.format import META_FILE, check_file, rebuild_logits, sampled_tail, student_shaped_tail
from kd_lightning.teacher.interface import Teacher


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
            raise KDError(
                f"{self.directory} holds no teacher recording ({META_FILE} missing); point "
                "teacher.recording.dir at a directory written by teacher.mode=recorded, or unset it."
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise KDError(
                f"{meta_path} is unreadable ({exc}); delete {self.directory} to record the teacher again."
            ) from None
        self.num_classes: int = self.meta["num_classes"]
        self.top_k: int | None = self.meta["top_k"]
        self.tail_samples: int = self.meta.get("tail_samples", 0)
        self.tail = tail
        if tail == "sampled" and self.top_k is not None and not self.tail_samples:
            raise KDError(
                f"the teacher recording in {self.directory} holds no draws from the teacher's tail, which "
                "teacher.recording.tail=sampled needs; unset teacher.recording.dir to record them, or use tail=student."
            )
        self.arrays: dict[str, dict[str, Tensor]] = {}
        for split, shape in self.meta["splits"].items():
            names = ("logits",) if self.top_k is None else ("topk_values", "topk_indices", "logsumexp")
            names += ("tail_samples",) if self.tail_samples else ()
            names += (
                ("label_logits",)
                if self.top_k is not None and split != "train" and self.meta.get("label_logits")
                else ()
            )
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
            raise KDError(
                f"the teacher recording {path} is missing or corrupt ({exc}); delete {self.directory} "
                "to record the teacher again."
            ) from None
        if samples_and_views is not None and list(array.shape[:2]) != samples_and_views:
            raise KDError(
                f"{path} has shape {array.shape}, expected {tuple(samples_and_views)} samples x views; "
                f"the file is truncated or from another recording. Delete {self.directory} to record again."
            )
        check_file(
            path, array, None if name.startswith("views.") else self.num_classes, self.meta.get("sha256", {}).get(name)
        )
        return torch.from_numpy(array)

    def num_samples(self, split: str) -> int:
        return self.meta["splits"][split][0]

    def check_covers(self, datamodule: InMemoryDataModule, num_classes: int) -> None:
        """Refuse a recording whose classes or split sizes do not match this run's data."""
        if self.num_classes != num_classes and not (
            getattr(datamodule, "task", None) == "tokens" and self.num_classes > num_classes
        ):
            raise KDError(
                f"the teacher recording in {self.directory} has {self.num_classes} classes but the data has "
                f"{num_classes}; record the teacher for this data (unset teacher.recording.dir)."
            )
        for split, data in datamodule.splits.items():
            if split not in self.meta["splits"] or self.num_samples(split) != len(data):
                raise KDError(
                    f"the teacher recording in {self.directory} does not cover split {split!r} of this data "
                    f"({len(data)} samples); record the teacher for this data (unset teacher.recording.dir)."
                )

    def _arrays(self, split: str, device: torch.device) -> dict[str, Tensor]:
        if device.type != "cpu" and device not in self._on_device:
            self._on_device[device] = {s: {k: v.to(device) for k, v in a.items()} for s, a in self.arrays.items()}
        arrays = (self.arrays if device.type == "cpu" else self._on_device[device]).get(split)
        if arrays is None:
            raise KDError(
                f"the teacher recording in {self.directory} has no split {split!r} (recorded: {sorted(self.arrays)})."
            )
        return arrays

    def _lookup(self, batch: Batch, split: str) -> dict[str, Tensor]:
        """The recorded arrays of samples ``batch["index"]`` in views ``batch["view"]``."""
        if "index" not in batch:
            raise KDError(
                "a recorded teacher looks logits up by sample index: the DataModule's batches need an 'index' "
                "entry (kd_lightning.data.InMemoryDataModule provides it), or use teacher.mode=live."
            )
        index = batch["index"]
        slot = batch.get("view")
        if slot is None:
            if split == "train" and self.views is not None:
                raise KDError(
                    "the teacher was recorded on augmented views but the batch says which view it shows nowhere; "
                    "call datamodule.replay_views(teacher.views) before training."
                )
            slot = torch.zeros_like(index)
        found = {name: array[index, slot] for name, array in self._arrays(split, index.device).items()}
        labels = batch.get("labels")
        if labels is not None and labels.ndim == 2:  # tokens: a batch cut to its longest row reads that many positions
            found = {name: array[:, : labels.shape[1]] for name, array in found.items()}
        return found

    def logits(self, batch: Batch, split: str) -> Tensor:
        """Float32 logits ``(N, C)`` (``(N, L, V)`` for tokens) of samples ``batch["index"]`` in views ``batch["view"]``;
        a top-k recording's tail spread evenly (training completes it with :meth:`complete` instead)."""
        found = self._lookup(batch, split)
        if self.top_k is None:
            return found["logits"].float()
        return rebuild_logits(
            found["topk_values"],
            found["topk_indices"],
            found["logsumexp"],
            self.num_classes,
            batch.get("labels"),
            found.get("label_logits"),
        )

    def training_logits(self, batch: Batch, blockwise: bool = False) -> Tensor | TeacherBlocks:
        """Training's logits, by row of the flattened positions (:class:`~kd_lightning.loss.chunked.TeacherBlocks`). A top-k
        recording with ``tail`` ``student`` or ``sampled`` completes its tail there: from the student's probabilities
        (:func:`student_shaped_tail`) or the recorded draws (:func:`sampled_tail`), never rebuilt evenly first."""
        found = self._lookup(batch, "train")
        completes = self.top_k is not None and self.top_k < self.num_classes and self.tail in ("student", "sampled")
        if not completes and not blockwise:
            return self.logits(batch, "train")
        positions = found["logits"].ndim - 1 if self.top_k is None else found["logsumexp"].ndim
        flat = {name: array.flatten(0, positions - 1) for name, array in found.items()}  # (N·L, ...)

        def rows_logits(rows: slice, student_logits: Tensor) -> Tensor:
            part = {name: array[rows] for name, array in flat.items()}
            if self.top_k is None:
                return part["logits"].float()
            if not completes:
                return rebuild_logits(part["topk_values"], part["topk_indices"], part["logsumexp"], self.num_classes)
            if self.tail == "sampled":
                return sampled_tail(
                    part["topk_values"], part["topk_indices"], part["logsumexp"], part["tail_samples"], self.num_classes
                )
            return student_shaped_tail(
                part["topk_values"], part["topk_indices"], part["logsumexp"], student_logits[..., : self.num_classes]
            )

        return TeacherBlocks(rows_logits)
