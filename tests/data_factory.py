"""Tiny image-folder trees for tests: real PNG/JPEG files, generated on the spot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_tree(
    root: Path, classes: int = 3, per_class: dict[str, int] | None = None, suffix: str = ".png", size: int = 32
) -> Path:
    """``root/{train,test}/class_k/NNNN.png`` with random RGB images; returns ``root``."""
    from PIL import Image

    per_class = per_class or {"train": 6, "test": 2}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root


WORDS = (
    "the king queen lord lady good night day love death sword crown heart blood fair sweet speak know "
    "come go thou thee art hath doth shall will not my thy our his her and of to in"
).split()


def make_corpus(
    root: Path, works: tuple[str, ...] = ("alpha", "beta", "gamma", "delta", "epsilon"), words: int = 600
) -> Path:
    """``root/<work>.txt``: a few short 'works' of verse-like lines drawn from a small vocabulary; returns ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for work in works:
        picks = rng.choice(WORDS, size=words)
        lines = [" ".join(picks[i : i + 8]).capitalize() + "." for i in range(0, words, 8)]
        (root / f"{work}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
