"""The benchmarks still run (tiny settings; their figures come from the documented commands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_factory import make_image_tree

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_step_overhead_runs_and_prints_the_ratio() -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "step_overhead.py"), "--teacher", "resnet8", "--student", "resnet8",
                          "--batch-size", "8", "--steps", "2", "--pairs", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio lightning / plain:" in out.stdout


def test_data_path_runs_on_a_generated_tree(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    root = make_image_tree(tmp_path / "tree", classes=2, per_class={"train": 2600, "test": 2})
    out = subprocess.run([sys.executable, str(BENCHMARKS / "data_path.py"), "--data-dir", str(root), "--workers", "0", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio torchvision / in_memory:" in out.stdout
