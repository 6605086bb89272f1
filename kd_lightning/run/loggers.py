"""The loggers a run configures, where they differ from Lightning's: a resumed stage keeps its earlier rows.

Lightning's ``CSVLogger`` starts ``metrics.csv`` afresh whenever a trainer opens it, so a stage resumed with
``ckpt_path=last`` lost every row logged before the interruption. :class:`CSVLogger` keeps them: when the resumed
stage first saves, the earlier file's rows logged before its first step stay (the rows of the steps it runs again are
replaced by the new ones), and the new rows follow. TensorBoard's event files are never removed (a resumed stage
writes a new one beside them).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, which keeps the rows of ``metrics.csv`` logged before the first step it writes."""

    def __init__(self, log_dir: str) -> None:
        path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.earlier: list[dict[str, str]] | None = None
        if os.path.isfile(path):
            with open(path, newline="") as file:
                self.earlier = list(csv.DictReader(file))
        super().__init__(log_dir)  # removes the earlier file

    def save(self) -> None:
        if self.earlier is not None and self.metrics:
            first = min(row["step"] for row in self.metrics)
            kept = [
                row for row in self.earlier if row.get("step") not in (None, "") and int(float(row["step"])) < first
            ]
            if kept:
                self.metrics_keys = sorted(set().union(*kept))
                with open(self.metrics_file_path, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)
            self.earlier = None
        super().save()


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` keeps the rows of an interrupted run of the stage it resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
