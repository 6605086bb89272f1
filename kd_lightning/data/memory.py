"""A DataModule for data that fits in memory: whole splits as tensors, batches by fancy indexing.

Batches are :class:`~kd_lightning.data.batch.Batch` dicts ``{inputs, labels, index}``:
``index`` is each sample's position in its split, which a recorded teacher needs to look its
logits up. There is no per-sample Python work: the sampler's indices for one batch are
gathered in a single indexing operation.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kd_lightning.data.augment import RandomCropFlip, RecordedViews
from kd_lightning.data.batch import IGNORE_INDEX, Batch
from kd_lightning.errors import KDError, check_integer, is_number


class TensorSplit(Dataset):
    """One split held as tensors; ``__getitems__`` returns a whole batch at once.

    ``fields``: more per-sample tensors of the batch (``position_ids`` of packed rows, ``length``, ...), indexed the same way.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, fields: dict[str, Tensor] | None = None) -> None:
        self.fields = dict(fields or {})
        for name, tensor in {"targets": targets, **self.fields}.items():
            if len(tensor) != len(inputs):
                raise ValueError(f"{len(inputs)} inputs but {len(tensor)} {name}.")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Batch:
        fields = {name: tensor[i] for name, tensor in self.fields.items()}
        return Batch(inputs=self.inputs[i], labels=self.targets[i], index=torch.tensor(i), **fields)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        fields = {name: tensor[index] for name, tensor in self.fields.items()}
        return Batch(inputs=self.inputs[index], labels=self.targets[index], index=index, **fields)


class EpochShuffle(Sampler[int]):
    """A random order that depends only on the global seed and the epoch.

    Resuming from a checkpoint at epoch ``e`` therefore replays exactly the order the
    uninterrupted run used, whatever else consumed random numbers before.
    """

    def __init__(self, size: int, epoch_of: Callable[[], int]) -> None:
        self.size = size
        self.epoch_of = epoch_of

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by lightning.seed_everything
        generator = torch.Generator().manual_seed(seed * 100_003 + self.epoch_of())
        return iter(torch.randperm(self.size, generator=generator).tolist())


class LengthGroupedShuffle(EpochShuffle):
    """:class:`EpochShuffle`'s order, then within each run of ``50 * batch_size`` samples sorted by length (longest
    first), so that a batch holds sequences of similar lengths and little padding (as transformers'
    ``LengthGroupedSampler``); still a function of the global seed and the epoch alone."""

    def __init__(self, lengths: Tensor, batch_size: int, epoch_of: Callable[[], int], group: int = 50) -> None:
        super().__init__(len(lengths), epoch_of)
        self.lengths, self.run = lengths, group * batch_size

    def __iter__(self) -> Iterator[int]:
        order = torch.tensor(list(super().__iter__()), dtype=torch.long)
        runs = [run[self.lengths[run].argsort(descending=True, stable=True)] for run in order.split(self.run)]
        return iter(torch.cat(runs).tolist() if runs else [])


class RankShare(DistributedSampler):
    """This process's share of each global batch of ``order``, so that ``processes`` processes of ``batch_size`` rows
    train on exactly the batches one process of ``processes * batch_size`` rows trains on.

    ``order`` (the same on every process: a function of the seed and the epoch) is cut into global batches of
    ``processes * batch_size`` samples, and process ``rank`` takes rows ``[rank * batch_size, (rank + 1) * batch_size)``
    of each. A last, shorter global batch is split as evenly as the processes allow; it is dropped with ``drop_last``,
    or when it has fewer samples than there are processes (one would have none). Lightning's own
    ``DistributedSampler`` would instead shuffle the order again and pad it with repeated samples.
    """

    def __init__(self, order: Sampler[int], batch_size: int, rank: int, processes: int, drop_last: bool) -> None:
        super().__init__(range(len(order)), num_replicas=processes, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.order, self.batch_size, self.drop_last = order, batch_size, drop_last

    def shares(self) -> Iterator[list[int]]:
        order, width = list(self.order), self.batch_size * self.num_replicas
        for start in range(0, len(order), width):
            batch = order[start : start + width]
            if len(batch) == width:
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            elif not self.drop_last and len(batch) >= self.num_replicas:
                yield [int(i) for i in torch.tensor(batch).tensor_split(self.num_replicas)[self.rank]]

    def __iter__(self) -> Iterator[int]:
        return (i for share in self.shares() for i in share)

    def __len__(self) -> int:
        return sum(map(len, self.shares()))


@dataclass(frozen=True)
class StepTick:
    """One training batch of :class:`StepBatches`: its samples, and the samples of each batch of its optimizer step."""

    rows: list[int]
    step: list[list[int]]
    position: int  # this batch's place in ``step``


class StepBatches(DistributedSampler):
    """The training batches of one process, each served with every batch of its optimizer step (``micro_batches``
    batches of ``batch_size`` rows, the last step of an epoch perhaps fewer), so that the step's completions can be
    sampled in one call (``speed.generate_per_step``).

    The batches are those a ``DataLoader`` of ``batch_size`` over ``order`` (this process's share of the epoch, as
    :class:`RankShare` gives it) would serve, in the same order; Lightning's optimizer steps fall at the same ones.
    """

    def __init__(
        self, order: Sampler[int], batch_size: int, drop_last: bool, micro_batches: int, rank: int, processes: int
    ) -> None:
        super().__init__(range(len(order)), num_replicas=processes, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.order, self.batch_size, self.drop_last, self.micro_batches = order, batch_size, drop_last, micro_batches

    def batches(self) -> list[list[int]]:
        rows = [int(i) for i in self.order]
        batches = [rows[start : start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[StepTick]:  # type: ignore[override]
        batches = self.batches()
        for first in range(0, len(batches), self.micro_batches):
            step = batches[first : first + self.micro_batches]
            for position, rows in enumerate(step):
                yield StepTick(rows, step, position)

    def __len__(self) -> int:
        return len(self.batches())


class StepSplit(Dataset):
    """A split served by :class:`StepBatches`: each item is a batch (made by ``collate``) that also holds
    ``step_batches``, the batches of its optimizer step, and ``step_position``, its place among them."""

    def __init__(self, data: TensorSplit, collate: Callable[[Batch], Batch]) -> None:
        self.data, self.collate = data, collate

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, tick: StepTick) -> Batch:  # type: ignore[override]
        own = self.collate(self.data.__getitems__(tick.rows))
        step = [
            own if position == tick.position else self.collate(self.data.__getitems__(rows))
            for position, rows in enumerate(tick.step)
        ]
        return Batch(**own, step_batches=step, step_position=tick.position)  # type: ignore[typeddict-item]


def served_as_made(batch: Batch) -> Batch:
    """The collate function of a loader whose dataset makes whole batches."""
    return batch


# The unlabelled training samples of labeled_fraction < 1 are drawn with this seed: the same for every run.
UNLABELED_SEED = 0


class InMemoryDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`load_splits`; this class serves the batches.

    ``labeled_fraction < 1`` makes a *transfer set* (Hinton et al. 2015): the students see the
    labels of only this fraction of the training samples (a fixed random subset); the others are
    labelled ``-100`` and teach the distilled student through the teacher's outputs alone. The
    teacher stage trains on every label (:meth:`teacher_view`).
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        num_classes: int | None = None,
        augment: RandomCropFlip | None = None,
        labeled_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if not is_number(labeled_fraction) or not 0 < labeled_fraction <= 1:
            raise KDError(
                f"data.labeled_fraction must be in (0, 1], got {labeled_fraction!r}: the share of training samples "
                "whose labels the students see (1: all)."
            )
        self.labeled_fraction = float(labeled_fraction)
        self.train_labels: Tensor | None = None  # every training label, for the teacher stage
        for key, size in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size)):
            if size is not None:
                check_integer(key, size, fix=f"; set e.g. {key}=64")
        self.augment = augment
        if num_classes is not None:
            self.num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.drop_last = drop_last
        self.splits: dict[str, TensorSplit] = {}
        self.recorded_views: RecordedViews | None = None  # training views replayed for a recorded teacher
        self.memory_format: torch.memory_format | None = None  # speed.channels_last: image batches as NHWC
        self.serve_steps = False  # speed.generate_per_step: each training batch holds its optimizer step's batches
        self._views_on_device: dict[torch.device, RecordedViews] = {}

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor] | TensorSplit]:
        """Return ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` (or :class:`TensorSplit` values, with more fields)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            splits = {
                name: split if isinstance(split, TensorSplit) else TensorSplit(*split)
                for name, split in self.load_splits().items()
            }
            empty = [name for name, split in splits.items() if len(split) == 0]
            if empty:
                raise KDError(
                    f"the {empty[0]} split of {type(self).__name__} holds no samples: a stage would train or "
                    "test on nothing. Check the data's location and split settings."
                )
            self.splits = splits
            if self.labeled_fraction < 1:
                train = self.splits["train"]
                self.train_labels = train.targets
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(UNLABELED_SEED))
                unlabeled = order[round(self.labeled_fraction * len(train)) :]
                train.targets = train.targets.clone().index_fill_(0, unlabeled, IGNORE_INDEX)

    @contextlib.contextmanager
    def teacher_view(self) -> Iterator[None]:
        """Within the block the training split is the teacher stage's: every label, whatever ``labeled_fraction``."""
        self.setup()
        if self.train_labels is None:
            yield
            return
        train = self.splits["train"]
        students = train.targets
        train.targets = self.train_labels
        try:
            yield
        finally:
            train.targets = students

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A zero batch of the model's input shape, for checking models before training."""
        return torch.zeros(batch_size, *self.input_shape)

    def prepare_inputs(self, inputs: Tensor) -> Tensor:
        """Turn stored inputs into model inputs (e.g. uint8 -> normalised float). Identity here."""
        return inputs

    def replay_views(self, views: RecordedViews | None) -> None:
        """Train on the augmentation views a recorded teacher scored (``None``: fresh random views)."""
        self.recorded_views = views
        self._views_on_device = {}

    def _recorded_views_on(self, device: torch.device) -> RecordedViews:
        if device not in self._views_on_device:
            self._views_on_device[device] = self.recorded_views.to(device)
        return self._views_on_device[device]

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Batched, on-device: training augmentation (one view per image), then :meth:`prepare_inputs`.

        Teacher and student both receive the batch returned here, so they see the same view.
        When replaying recorded views, each image gets one of its recorded views at random
        and the batch gains ``view``, the view's slot, for the recorded teacher's lookup.
        """
        batch = Batch(**batch)  # a copy: the loader's dict stays as it was
        inputs = batch["inputs"]
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            if self.recorded_views is None:
                inputs = self.augment(inputs)
            else:
                views = self._recorded_views_on(inputs.device)
                batch["view"] = torch.randint(views.per_sample, (len(inputs),), device=inputs.device)
                inputs = self.augment.apply(inputs, views.views(batch["index"], batch["view"]))
        inputs = self.prepare_inputs(inputs)
        if self.memory_format is not None and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=self.memory_format)
        batch["inputs"] = inputs
        return batch

    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def processes(self) -> tuple[int, int]:
        """``(rank, number)`` of the data-parallel processes of the run (``(0, 1)`` in one process)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_order(self, data: TensorSplit) -> Sampler[int]:
        """The order of the training samples in an epoch, the same on every process: :class:`EpochShuffle` here."""
        return EpochShuffle(len(data), self.current_epoch)

    def collate(self, batch: Batch) -> Batch:
        """A batch as ``TensorSplit`` gathered it, made ready for the step (on the CPU, in the loader). As it is here."""
        return batch

    def loader(self, split: str, train: bool) -> DataLoader:
        """Batches of ``split``: in :meth:`train_order` (and ``drop_last``) when ``train``, else in order.

        With more than one process, each takes its :class:`RankShare` of every global training batch; evaluation
        splits are shared out by Lightning's ``DistributedSampler``. With :attr:`serve_steps` and gradient
        accumulation, each training batch also holds the batches of its optimizer step (:class:`StepBatches`).
        """
        self.setup()
        data = self.splits[split]
        order = self.train_order(data) if train else None
        rank, processes = self.processes()
        if order is not None and processes > 1:
            order = RankShare(order, self.batch_size, rank, processes, self.drop_last)
        micro_batches = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if order is not None and self.serve_steps and micro_batches > 1:
            return DataLoader(
                StepSplit(data, self.collate),
                batch_size=None,
                sampler=StepBatches(order, self.batch_size, self.drop_last, micro_batches, rank, processes),
                collate_fn=served_as_made,
                num_workers=0,
                generator=torch.Generator(),
            )
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=order,
            drop_last=train and self.drop_last,
            collate_fn=self.collate,
            num_workers=0,  # the data is already in memory; workers would only copy it
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("train", train=False)
