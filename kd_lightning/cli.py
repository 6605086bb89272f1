"""``python -m kd_lightning``: the Hydra entry point. All the work happens in :func:`train`.

``python -m kd_lightning export CKPT OUT`` (or ``kd-lightning export ...``) runs :mod:`kd_lightning.export`.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kd_lightning.config import config_dir, register_configs
from kd_lightning.errors import KDError

register_configs()


def format_summary(results: dict) -> str:
    """The table printed at the end of a run: accuracy, calibration and fidelity per stage."""
    def cell(metrics: dict, key: str, scale: float, fmt: str) -> str:
        value = metrics.get(key)
        return f"{'-':>{len(format(0.0, fmt))}}" if value is None else format(scale * value, fmt)

    stages = [("teacher", "teacher"), ("baseline", "student alone"), ("distilled", "student distilled")]
    lines = ["", f"{'test split':20s} {'acc %':>7s} {'ECE':>7s} {'agree %':>8s} {'KL(t‖s)':>8s}"]
    for key, name in stages:
        if key in results:
            m = results[key]
            lines.append(f"{name:20s} {cell(m, 'test/acc', 100, '7.2f')} {cell(m, 'test/ece', 1, '7.4f')} "
                         f"{cell(m, 'test/agreement', 100, '8.2f')} {cell(m, 'test/kl_t1', 1, '8.4f')}")
    if "gain" in results:
        lines.append(f"{'gain from KD':20s} {100 * results['gain']:+7.2f}")
    lines.append("agree: top-1 agreement with the teacher; KL(t‖s): KL(teacher ‖ student) at T=1; ECE: 15-bin calibration error")
    lines.append(f"outputs: {results['output_dir']}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kd_lightning.stages import is_global_zero
    from kd_lightning.train import train  # import torch/Lightning after Hydra parsed the command line

    try:
        results = train(cfg)
    except KDError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed, runs the others, and reports it at the end
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if is_global_zero():
        print(format_summary(results))
    return results["distilled"]["test/acc"]


def entry() -> None:
    """``kd-lightning`` / ``python -m kd_lightning``: ``export`` subcommand, else the Hydra app."""
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from kd_lightning.export import main as export_main

        export_main(sys.argv[2:])
    else:
        main()
