"""The scale-out configs: SLURM launcher composes, submitit runs a sweep, torchrun runs DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_cli import run_cli

from kd_lightning.run.cli import config_dir

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'kd_lightning[cluster]'")


def test_slurm_launcher_config_composes_for_a_multinode_job() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.gpus_per_node=4",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
            ],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (cfg.trainer.num_nodes, cfg.trainer.devices)
    assert cfg.trainer.strategy == "ddp"


def test_slurm_launcher_composes_with_fsdp_for_nodes_times_gpus() -> None:
    from kd_lightning.run.settings import check_trainer

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=8",
                "hydra.launcher.gpus_per_node=8",
                "trainer=fsdp",
                "trainer.devices=8",
                "trainer.num_nodes=2",
                "trainer.strategy.data_parallel_size=16",
                "trainer.accelerator=gpu",
            ],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (cfg.trainer.num_nodes, cfg.trainer.devices)
    assert (
        cfg.trainer.strategy._target_ == "kd_lightning.sharding.ShardedStrategy"
        and cfg.trainer.strategy.data_parallel_size == 16
    )
    check_trainer(cfg.trainer)  # 16 processes: 2 nodes x 8 GPUs, all data-parallel


@pytest.mark.slow  # a process per job
def test_submitit_sweep_runs_each_job_in_its_own_process(tmp_path: Path) -> None:
    out = run_cli(
        tmp_path,
        "hydra/launcher=local",
        "distill.temperature=2,4",
        *FAST,
        "baseline=false",
        "hydra.sweep.dir=sweep",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(results) == 2 and all("distilled" in json.loads(p.read_text()) for p in results)


@pytest.mark.slow  # two processes
def test_torchrun_launches_ddp_from_outside(tmp_path: Path) -> None:
    env = {**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29531",
            "-m",
            "kd_lightning",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.enable_progress_bar=false",
            *FAST,
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("student distilled") == 1
    assert "distilled" in json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(list((tmp_path / "cache" / "trained_teachers").glob("*.pth"))) == 1
