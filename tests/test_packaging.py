"""The wheel carries conf/ and recipes/: an installed kd_lightning runs from any directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib
from data_factory import make_image_tree

REPO = Path(__file__).resolve().parents[1]


def test_conf_and_recipes_are_mapped_into_the_wheel() -> None:
    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "force-include"
    ]
    assert mapped == {"conf": "kd_lightning/conf"}
    recipe_group = REPO / "conf" / "recipe"
    assert recipe_group.is_symlink() and recipe_group.resolve() == (REPO / "recipes").resolve()  # the build follows it


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("kd_lightning-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Reuse this interpreter's torch & co. (whether it runs in a venv or not): its site-packages
    # come after the new venv's own, so the wheel installed there is what gets imported.
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")}
    where = subprocess.run(
        [
            python,
            "-c",
            "import kd_lightning, kd_lightning.run.cli as c; print(kd_lightning.__file__); print(c.config_dir())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(str(env_dir) in line for line in where), where  # the wheel, not the checkout
    make_image_tree(elsewhere / "cifar", classes=3, per_class={"train": 10, "test": 3})
    recipe = ["+recipe=cifar_resnet", "data.data_dir=cifar", "data.val_size=6", "trainer.fast_dev_run=true"]
    for args in (["trainer.fast_dev_run=true"], recipe):
        out = subprocess.run(
            [python, "-m", "kd_lightning", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "student distilled" in out.stdout
