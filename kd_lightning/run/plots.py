"""Pictures of a run (``curves.png``) and of a sweep (``sweep.png``); matplotlib is optional."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from kd_lightning.files import atomic_write

log = logging.getLogger(__name__)

NO_MATPLOTLIB = "matplotlib is not installed, so no %s was drawn; pip install 'kd_lightning[plots]' to get it."


def pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of Lightning's CSVLogger as ``{name: [(step, value), ...]}``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name not in ("epoch", "step") and value not in ("", None):
                    series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


def plot_curves(output_dir: Path, teacher_acc: float | None = None) -> Path | None:
    """``curves.png``: train/val loss and val accuracy of each student stage, the teacher as a line."""
    plt = pyplot()
    if plt is None:
        log.warning(NO_MATPLOTLIB, "curves.png")
        return None
    stages = [(s, output_dir / s / "metrics.csv") for s in ("distilled", "baseline")]
    stages = [(s, p) for s, p in stages if p.is_file()]
    if not stages:
        return None
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for (stage, path), color in zip(stages, ("tab:blue", "tab:orange")):
        series = read_metrics_csv(path)
        label = "distilled" if stage == "distilled" else "alone"
        for name, style in (("train/loss", ":"), ("val/loss", "-")):
            if series.get(name):
                steps, values = zip(*series[name])
                loss_ax.plot(steps, values, style, color=color, label=f"{label} {name}")
        if series.get("val/acc"):
            steps, values = zip(*series["val/acc"])
            acc_ax.plot(steps, [100 * v for v in values], "-o", ms=3, color=color, label=f"student {label}")
    if teacher_acc is not None:
        acc_ax.axhline(100 * teacher_acc, color="black", ls="--", lw=1, label="teacher")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss (train: CE/KD mix, val: CE)")
    acc_ax.set(xlabel="step", ylabel="validation accuracy (%)", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    target = output_dir / "curves.png"
    atomic_write(target, lambda tmp: figure.savefig(tmp, dpi=100))
    plt.close(figure)
    return target


def plot_sweep(rows: list[dict], target: Path) -> Path | None:
    """``sweep.png``: test accuracy (perplexity, for language models) of every job, distilled and alone; failed jobs marked."""
    plt = pyplot()
    if plt is None:
        log.warning(NO_MATPLOTLIB, "sweep.png")
        return None
    figure, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    labels = [r["overrides"] or r["job"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["distilled"] or 0 for r in rows], width=0.4, label="student distilled")
    ax.bar([i + 0.2 for i in x], [r["alone"] or 0 for r in rows], width=0.4, label="student alone")
    teachers = [r["teacher"] for r in rows if r["teacher"] is not None]
    if teachers:
        ax.axhline(sum(teachers) / len(teachers), color="black", ls="--", lw=1, label="teacher (mean)")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(i, 1, "FAILED", ha="center", rotation=90, color="red")
    scores = [v for r in rows for v in (r["distilled"], r["alone"]) if v is not None] + teachers
    perplexity = any(r.get("measure") == "ppl" for r in rows)
    if scores and not perplexity:
        ax.set_ylim(max(0, min(scores) - 5), min(100, max(scores) + 2))
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
    exact = any(r.get("measure") == "exact_match" for r in rows)
    ax.set(
        ylabel="test perplexity" if perplexity else "test exact match (%)" if exact else "test accuracy (%)",
        title="sweep",
    )
    ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(target, lambda tmp: figure.savefig(tmp, dpi=100))
    plt.close(figure)
    return target
