"""The benchmarks still run (tiny settings; their figures come from the documented commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_factory import make_image_tree

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_step_overhead_runs_and_prints_the_ratio() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "step_overhead.py"),
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--pairs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio lightning / plain:" in out.stdout


def test_data_path_runs_on_a_generated_tree(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    root = make_image_tree(tmp_path / "tree", classes=2, per_class={"train": 2600, "test": 2})
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "data_path.py"), "--data-dir", str(root), "--workers", "0", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio torchvision / in_memory:" in out.stdout


def test_recorded_teacher_benchmark_prints_the_ratios(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "recorded_teacher.py"),
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--train-size",
            "64",
            "--batch-size",
            "16",
            "--repeats",
            "1",
            "--top-k",
            "3",
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio live / recorded:" in out.stdout and "ratio recorded / alone:" in out.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["full"]["epoch_s"]) == {"live", "recorded", "alone"}
    assert result["top_k"]["classes"] == 100 and result["top_k"]["top_k"] == 3


@pytest.mark.slow  # two processes
def test_sharded_generation_benchmark_gives_the_same_tokens_both_ways(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "sharded_generation.py"),
            "--rows",
            "2",
            "--prompt",
            "4",
            "--new-tokens",
            "4",
            "--dim",
            "32",
            "--depth",
            "2",
            "--vocab",
            "64",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio gathered / copy:" in out.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert (
        set(result["median_s"]) == {"gathered", "copy"}
        and result["extra_bytes"]["copy"] > result["extra_bytes"]["gathered"]
    )


@pytest.mark.slow  # every GPU benchmark in its dry mode, concurrent jobs included
def test_gpu_check_dry_mode_on_cpu_writes_the_json(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["precision"] == "bf16-mixed" and summary["channels_last"] is True
    assert set(summary["images_per_s"]) == {"live", "recorded", "alone"}
    assert summary["lightning_over_plain_time"] > 0 and summary["recorded_over_alone_time"] > 0
    assert set(summary["compiled_images_per_s"]) == {"eager"} and set(summary["concurrent_images_per_s"]) == {"1", "2"}
    rounds = summary["details"]["concurrent_jobs"]["rounds"]
    assert [len(r["per_job_images_per_s"]) for r in rounds] == [1, 2] and all(r["images_per_s"] > 0 for r in rounds)


def test_gpu_check_without_a_gpu_says_so(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode != 0 and "--device cpu" in out.stderr
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow  # half a minute of loss evaluations
def test_lm_loss_benchmark_reports_memory_time_and_exactness() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "lm_loss.py"),
            "--vocab",
            "4096",
            "--tokens",
            "1024",  # logits large enough that each variant raises the process's peak measurably
            "--hidden",
            "16",
            "--chunk-rows",
            "256",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout)
    assert figures["peak_mem_ratio"] > 0 and figures["time_ratio"] > 0
    assert figures["max_rel_loss_diff"] < 1e-5 and figures["max_abs_grad_diff"] < 1e-6


@pytest.mark.slow  # over 30 s on 2 cores
def test_the_trl_benchmark_runs_both_tools_on_the_same_batches_and_their_losses_agree() -> None:
    pytest.importorskip("trl", reason="benchmarks/vs_trl.py compares with TRL (pip install -e '.[lm,trl]')")
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "vs_trl.py"),
            "--shapes",
            "default",
            "--repeats",
            "1",
            "--steps",
            "2",
            "--rows",
            "2",
            "--length",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout)["shapes"]["default"]
    assert len(figures["kd"]["losses"]) == len(figures["trl"]["losses"]) == 2
    assert figures["kd"]["max_rel_loss_diff_vs_trl"] < 1e-5
    assert (
        figures["kd"]["tokens_per_s"] > 0
        and figures["trl"]["peak_rss_mib"] > 0
        and figures["kd"]["growth_ratio_vs_trl"] > 0
    )


@pytest.mark.slow  # three tools, each in its own process
def test_the_trl_benchmark_times_on_policy_steps_and_says_what_each_divides_by() -> None:
    pytest.importorskip("trl", reason="benchmarks/vs_trl.py compares with TRL (pip install -e '.[lm,trl]')")
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "vs_trl.py"),
            "--on-policy",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--steps",
            "2",
            "--rows",
            "2",
            "--length",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout)["shapes"]["default"]
    for tool in ("kd", "trl", "trl_distillation"):
        assert len(figures[tool]["generated"]) == 2 and all(0 < n <= 2 * 4 for n in figures[tool]["generated"])
    for tool in ("kd", "trl_distillation"):  # the generated tokens are the step's count
        assert figures[tool]["divided_by"] == figures[tool]["generated"]
    assert figures["kd"]["step_s_ratio_vs_trl"] > 0 and figures["kd"]["step_s_ratio_vs_trl_distillation"] > 0


def test_the_generation_benchmark_compares_cached_and_recomputed_tokens() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "generate.py"),
            "--new-tokens",
            "8",
            "--prompt",
            "4",
            "--rows",
            "2",
            "--dim",
            "16",
            "--depth",
            "1",
            "--vocab",
            "50",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result["tokens_per_s"]) == {"cached", "recomputed"} and result["ratio_cached_over_recomputed"] > 0


def test_the_generation_buffer_benchmark_times_sampling_and_steps_both_ways() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "generation_buffer.py"),
            "--micro-batches",
            "2",
            "--batch",
            "4",
            "--new-tokens",
            "6",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)["rows"]
    assert row["micro_batches"] == 2 and row["rows_per_step"] == 8
    assert row["tokens_per_s per step"] > 0 and row["s_per_step per micro-batch"] > 0 and row["generation_ratio"] > 0
