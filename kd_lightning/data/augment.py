"""Batched augmentation on the device, in two steps: draw a view's parameters, then apply them.

Keeping the parameters as data (crop offsets, flips) lets the teacher and the student see
the very same view, and lets a recorded teacher replay the exact view it scored:
:class:`RecordedViews` is that contract between a recording and the DataModule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class CropFlipViews:
    """Parameters of one view per image: crop offsets ``(N, 2)`` in ``[0, 2·pad]`` and flips ``(N,)``."""

    offsets: Tensor
    flips: Tensor


class RandomCropFlip:
    """Random crop of the original size from a zero-padded image, and an optional horizontal flip.

    The classic CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``),
    for a whole batch ``(N, C, H, W)`` at once with no Python loop over images.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}.")
        self.padding = padding
        self.flip = flip

    @property
    def distinct_views(self) -> int:
        """How many distinct views of one image exist: ``(2·pad + 1)²`` offsets × 2 flips."""
        return (2 * self.padding + 1) ** 2 * (2 if self.flip else 1)

    def draw(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> CropFlipViews:
        """Random parameters for ``n`` images."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), device=device, generator=generator)
        if self.flip:
            flips = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
        else:
            flips = torch.zeros(n, dtype=torch.bool, device=device)
        return CropFlipViews(offsets, flips)

    def apply(self, images: Tensor, views: CropFlipViews) -> Tensor:
        """``(N, C, H, W)`` images, any dtype -> the views described by ``views``, same shape."""
        n, _, height, width = images.shape
        padded = F.pad(images, [self.padding] * 4) if self.padding else images
        device = images.device
        rows = views.offsets[:, 0, None] + torch.arange(height, device=device)  # (N, H)
        cols = torch.arange(width, device=device).expand(n, width)
        cols = torch.where(views.flips[:, None], cols.flip(-1), cols) + views.offsets[:, 1, None]  # (N, W)
        batch = torch.arange(n, device=device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: Tensor) -> Tensor:
        return self.apply(images, self.draw(len(images), images.device))


VIEW_SEED = 0  # fixed, so runs with different seeds share one recording


@dataclass
class RecordedViews:
    """The augmentation views a recorded teacher scored: ``offsets (N or 1, V, 2)``, ``flips (N or 1, V)``.

    Slot ``v`` of sample ``i`` is one view of that training image. A leading dimension of 1
    means every sample has the same ``V`` views (all distinct views, ``views_per_sample=all``).
    A DataModule that replays them (:meth:`InMemoryDataModule.replay_views`) shows each image
    in one of its recorded views and puts the slot in the batch as ``view``.
    """

    offsets: Tensor
    flips: Tensor

    @classmethod
    def draw(
        cls, augment: RandomCropFlip, num_samples: int, views_per_sample: int | str, seed: int = VIEW_SEED
    ) -> RecordedViews:
        """``views_per_sample`` random views per sample, or every distinct view once (``"all"``)."""
        if views_per_sample == "all":
            side = 2 * augment.padding + 1
            grid = torch.cartesian_prod(torch.arange(side), torch.arange(side))  # (side², 2)
            flips = [False, True] if augment.flip else [False]
            offsets = grid.repeat(len(flips), 1)
            flip_of = torch.tensor(flips).repeat_interleave(len(grid))
            return cls(offsets[None].to(torch.uint8), flip_of[None])
        generator = torch.Generator().manual_seed(seed)
        drawn = augment.draw(num_samples * views_per_sample, generator=generator)
        return cls(
            drawn.offsets.view(num_samples, views_per_sample, 2).to(torch.uint8),
            drawn.flips.view(num_samples, views_per_sample),
        )

    @property
    def per_sample(self) -> int:
        """Views recorded per sample."""
        return self.flips.shape[1]

    def views(self, index: Tensor, slot: Tensor) -> CropFlipViews:
        """The views ``slot`` ``(N,)`` of samples ``index`` ``(N,)``."""
        rows = index if self.offsets.shape[0] > 1 else torch.zeros_like(index)
        return CropFlipViews(self.offsets[rows, slot].long(), self.flips[rows, slot])

    def to(self, device: torch.device) -> RecordedViews:
        return RecordedViews(self.offsets.to(device), self.flips.to(device))
