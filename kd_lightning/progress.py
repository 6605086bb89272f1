"""What a run prints while it trains: one progress bar per stage, and nothing else of Lightning's.

On a terminal each stage shows a single bar over all its training steps, with the latest
training loss and validation accuracy; validation and test get no bars of their own. On a pipe,
in a file or in CI (no terminal) the same information comes as about five plain log lines per
stage (and the last epoch's), and a line at least every minute within long epochs (steps done,
loss, steps per second), so the output holds no carriage-return lines and never goes quiet. Lightning's banners and tips ("GPU available", "💡
Tip", "`Trainer.fit` stopped") are hushed unless Hydra's verbose switch asks for Lightning's
debug output (``hydra.verbose=lightning`` or ``hydra.verbose=true``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger(__name__)

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
SHOWN = {"train/loss": "loss", "val/acc": "val acc", "val/ppl": "val ppl"}


class StageProgress(ProgressBar):
    """One bar per stage (a terminal) or a few log lines per stage (anything else).

    Args:
        stage: the stage's name, shown before the bar or at the start of each line.
        terminal: draw a bar; default whether stderr is a terminal.
        refresh_steps: steps between two updates of the bar's loss (reading it waits for the device).
        lines_per_stage: about how many epochs of a stage get a line when there is no terminal.
        line_seconds: without a terminal, the most seconds between two lines while training.
    """

    def __init__(
        self,
        stage: str,
        terminal: bool | None = None,
        refresh_steps: int = 20,
        lines_per_stage: int = 5,
        line_seconds: float = 60.0,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.lines_per_stage = lines_per_stage
        self.line_seconds = line_seconds
        self.last_line = (time.monotonic(), 0)  # when the last line was written, and at which step
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.refresh_steps = refresh_steps
        self.enabled = True
        self.bar: Any = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def shown_metrics(self, trainer: L.Trainer) -> dict[str, str]:
        """The latest loss and validation metrics, read from the device only here (every ``refresh_steps`` steps)."""
        metrics = trainer.callback_metrics
        shown = {name: float(metrics[key]) for key, name in SHOWN.items() if key in metrics}
        return {
            name: f"{100 * value:.2f}%"
            if name == "val acc"
            else f"{value:.2f}"
            if name == "val ppl"
            else f"{value:.4f}"
            for name, value in shown.items()
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_line = (time.monotonic(), trainer.global_step)
        if not (self.enabled and self.terminal and trainer.is_global_zero):
            return
        from tqdm.auto import tqdm

        total = trainer.estimated_stepping_batches
        self.bar = tqdm(
            total=None if math.isinf(total) else int(total),
            desc=self.stage,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.bar is None:
            self.line_if_quiet(trainer)
            return
        self.bar.update(1)
        if self.bar.n % self.refresh_steps == 0:
            self.bar.set_postfix(self.shown_metrics(trainer), refresh=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None and not trainer.sanity_checking:
            self.bar.set_postfix(self.shown_metrics(trainer))

    def line_if_quiet(self, trainer: L.Trainer) -> None:
        """Without a terminal: a line when the last one is ``line_seconds`` old (steps done, loss, rate)."""
        now, (then, step_then) = time.monotonic(), self.last_line
        if not (self.enabled and not self.terminal and trainer.is_global_zero and now - then >= self.line_seconds):
            return
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        shown = ", ".join(f"{name} {value}" for name, value in self.shown_metrics(trainer).items())
        log.info(
            "stage %s: step %d%s, epoch %d%s, %.2f steps/s",
            self.stage,
            step,
            "" if math.isinf(total) else f"/{int(total)}",
            trainer.current_epoch + 1,
            f", {shown}" if shown else "",
            (step - step_then) / max(now - then, 1e-9),
        )
        self.last_line = (now, step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
        every = max(1, math.ceil(epochs / self.lines_per_stage)) if epochs and epochs > 0 else 1
        if self.enabled and not self.terminal and trainer.is_global_zero and (epoch % every == 0 or epoch == epochs):
            shown = ", ".join(f"{name} {value}" for name, value in self.shown_metrics(trainer).items())
            log.info("stage %s: epoch %d/%d%s", self.stage, epoch, epochs, f", {shown}" if shown else "")
            self.last_line = (time.monotonic(), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.shown_metrics(trainer))
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def lightning_hushed() -> Iterator[None]:
    """Lightning's info banners and known-harmless warnings off for the block (unless asked for)."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    asked = ("", "lightning", *LIGHTNING_LOGGERS)  # hydra.verbose=true / =lightning / =lightning.pytorch
    if not any(logging.getLogger(name).getEffectiveLevel() <= logging.DEBUG for name in asked):
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data needs none
            warnings.filterwarnings(
                "ignore", r".*module\(s\) in eval mode at the start of training.*"
            )  # the frozen teacher
            warnings.filterwarnings(
                "ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*"
            )  # inside Lightning
            warnings.filterwarnings(
                "ignore", ".*smaller than the logging interval.*"
            )  # short epochs: logged at their end
            warnings.filterwarnings(
                "ignore", ".*Checkpoint directory .* exists and is not empty.*"
            )  # resume, overwrite
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether the loggers write this training step (every ``trainer.log_every_n_steps``; always outside a Trainer)."""
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own test, as its loggers use it
    return trainer is None or bool(getattr(connector, "should_update_logs", True))
