"""Every job of a sweep checked before the first one starts (``python -m kd_lightning -m ...``).

Hydra's basic sweeper launches the jobs of a grid one after another; a bad value in the third would be found only
when it starts, after the first two trained. :class:`CheckEveryJob` (a Hydra callback, ``conf/train.yaml``) composes
each job's config when the sweep starts, parses it into :class:`~kd_lightning.run.settings.Settings` and builds its
data module (which reads nothing before its set-up), so that a value any job would refuse stops the sweep in one
line, naming the job, before anything trains. Checks that need the
data or the models built (:mod:`kd_lightning.run.preflight`) still run in each job. A search (Optuna) draws its
values as it goes: its jobs are checked as they start.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kd_lightning.errors import KDError, one_line

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands the command line and ``hydra.sweeper.params``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parsed = OverridesParser.create().parse_overrides([*params, *arguments])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_config(config: DictConfig, overrides: list[str], number: int) -> DictConfig:
    """The config job ``number`` of the sweep will run with, its ``paths.output_dir`` where the job will write, and
    Hydra's own node removed, as the task function receives it."""
    from hydra.core.global_hydra import GlobalHydra

    job = GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    with open_dict(job.hydra.job):
        job.hydra.job.num, job.hydra.job.id = number, f"check_{number}"
    task = copy.deepcopy(job)
    with read_write(task), open_dict(task):
        task.paths.output_dir = str(Path(job.hydra.sweep.dir) / str(job.hydra.sweep.subdir))
        del task["hydra"]
    return task


class CheckEveryJob(Callback):
    """Before a grid sweep's first job starts: each job's settings parsed and checked; the first refusal, naming its
    job and overrides, stops the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return
        from kd_lightning.run.settings import Settings

        jobs = job_overrides(config)
        before = HydraConfig.instance().cfg
        try:
            for number, overrides in enumerate(jobs):
                HydraConfig.instance().set_config(config)  # ${hydra:...} resolves as in the sweep
                try:
                    settings = Settings.from_config(job_config(config, overrides, number))
                    settings.data()  # the data's own arguments (nothing is read before setup)
                except KDError as error:  # Hydra turns a callback's exception into a warning: exit here
                    print(
                        f"error: sweep job {number} ({' '.join(overrides)}) would be refused: {one_line(error)} "
                        "Nothing was started; fix that value and start the sweep again.",
                        file=sys.stderr,
                    )
                    raise SystemExit(1) from None
        finally:
            if before is not None:
                HydraConfig.instance().set_config(before)
        log.info("sweep: the settings of all %d jobs checked", len(jobs))
