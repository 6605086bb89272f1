"""``python -m kd_lightning``: the Hydra entry point. All the work happens in :func:`train`.

``python -m kd_lightning export CKPT OUT`` (or ``kd-lightning export ...``) runs :mod:`kd_lightning.run.export`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import KDError, one_line
from kd_lightning.files import atomic_write_text
from kd_lightning.run.config import config_dir, register_configs, unknown_override
from kd_lightning.run.report import FAILURE_FILE

register_configs()
# Hydra's usual switch shows tracebacks; the entry point sets HYDRA_FULL_ERROR for its own use and keeps
# the user's choice in KD_LIGHTNING_TRACEBACK, which processes it starts (DDP ranks) inherit
os.environ.setdefault("KD_LIGHTNING_TRACEBACK", os.environ.get("HYDRA_FULL_ERROR", "0"))
VERBOSE = os.environ["KD_LIGHTNING_TRACEBACK"] == "1"


def format_summary(results: dict) -> str:
    """The table printed at the end of a run: accuracy, calibration and fidelity per stage."""

    def cell(metrics: dict, key: str, scale: float, fmt: str) -> str:
        value = metrics.get(key)
        return f"{'-':>{len(format(0.0, fmt))}}" if value is None else format(scale * value, fmt)

    stages = [("teacher", "teacher"), ("baseline", "student alone"), ("distilled", "student distilled")] + [
        (key, f"distilled: {key}") for key in results.get("on_policy_stages", [])
    ]
    tokens = "test/ppl" in results.get("distilled", {})
    answers = "test/exact_match" in results.get("distilled", {})
    success = sorted(k.removeprefix("test/") for k in results.get("distilled", {}) if k.startswith("test/success_q"))
    second = ("ppl", "test/ppl", 1, "7.2f") if tokens else ("ECE", "test/ece", 1, "7.4f")
    width = max(20, *(len(name) for key, name in stages if key in results))
    lines = [
        "",
        f"{'test split':{width}s} {'acc %':>7s} {second[0]:>7s} {'agree %':>8s} {'KL(t‖s)':>8s}"
        + (f" {'exact %':>8s}" if answers else "")
        + "".join(f" {name.replace('success_', 'walks '):>10s}" for name in success),
    ]
    for key, name in stages:
        if key in results:
            m = results[key]
            lines.append(
                f"{name:{width}s} {cell(m, 'test/acc', 100, '7.2f')} {cell(m, *second[1:])} "
                f"{cell(m, 'test/agreement', 100, '8.2f')} {cell(m, 'test/kl_t1', 1, '8.4f')}"
                + (f" {cell(m, 'test/exact_match', 100, '8.2f')}" if answers else "")
                + "".join(f" {cell(m, f'test/{name}', 100, '10.1f')}" for name in success)
            )
    if "gain" in results:
        lines.append(
            f"{'gain from KD':{width}s} {100 * results['gain']:+7.2f}"
            + (f" {100 * (results['ppl_ratio'] - 1):+6.1f}%" if "ppl_ratio" in results else "")
        )
    lines.append(
        "agree: top-1 agreement with the teacher; KL(t‖s): KL(teacher ‖ student) at T=1; "
        + ("acc: next-token accuracy; ppl: perplexity per token" if tokens else "ECE: 15-bin calibration error")
        + ("; exact: greedy answers exactly right" if answers else "")
        + ("; walks q: % of test walks finished (greedy) when each move slips with chance q" if success else "")
    )
    lines.append(f"outputs: {results['output_dir']}")
    return "\n".join(lines)


def record_failure(output_dir: Path, line: str) -> None:
    """A failed sweep job leaves its one-line reason in ``error.txt`` for ``kd_lightning.run.report``, and its overrides
    where a job refused before it started has none (``.hydra/overrides.yaml``)."""
    try:
        atomic_write_text(output_dir / FAILURE_FILE, line + "\n")
        overrides = output_dir / ".hydra" / "overrides.yaml"
        if not overrides.exists():
            atomic_write_text(overrides, OmegaConf.to_yaml(HydraConfig.get().overrides.task))
    except OSError:
        pass  # the job's directory itself is unwritable: the sweep's own log has the error


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kd_lightning.run.stages import is_global_zero, leave_process_group
    from kd_lightning.run.train import train  # import torch/Lightning after Hydra parsed the command line

    try:
        results = train(cfg)
    except (KDError, OSError) as error:
        if VERBOSE:
            raise
        line = one_line(error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            record_failure(Path(cfg.paths.output_dir), line)
            raise  # Hydra marks this job failed, runs the others, and reports it at the end
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
    if is_global_zero():
        print(format_summary(results))
    leave_process_group()
    return results["distilled_val_acc"]


def entry() -> None:
    """``kd-lightning`` / ``python -m kd_lightning``: ``export`` subcommand, else the Hydra app."""
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from kd_lightning.run.export import main as export_main

        export_main(sys.argv[2:])
    else:
        run_reporting_errors(main)


def hydra_error_line(error: HydraException) -> str:
    """Hydra's refusal on one line; an override of a setting that does not exist as our unknown-setting line."""
    if isinstance(error, ConfigCompositionException):
        unknown = unknown_override(sys.argv[1:])
        if unknown is not None:
            return one_line(unknown)
    cause = f": {str(error.__cause__).splitlines()[0]}" if error.__cause__ is not None and str(error.__cause__) else ""
    return " ".join(f"{str(error).strip()}{cause}".split())


def run_reporting_errors(app) -> None:
    """Run the Hydra app; a user or operator error anywhere, Hydra's own set-up included (a read-only
    run directory), ends as one line on stderr and exit status 1. ``HYDRA_FULL_ERROR=1`` shows tracebacks."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a stripped traceback; we report
    try:
        app()
    except HydraException as error:  # a bad override or an unknown option: Hydra's own message (its options listed)
        if VERBOSE:
            raise
        print(f"error: {hydra_error_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (KDError, OSError) as error:
        if VERBOSE:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
