"""train(cfg): the stages, the teacher cache, checkpoints, and refusing bad input early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import settings_of

from kd_lightning import KDError
from kd_lightning.run.teachers import trained_teacher_path
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def test_train_runs_all_stages_and_writes_metrics(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*FAST)
    results = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == results
    assert {"teacher", "distilled", "baseline", "gain"} <= results.keys()
    assert 0 <= results["distilled"]["test/acc"] <= 1
    assert results["gain"] == pytest.approx(results["distilled"]["test/acc"] - results["baseline"]["test/acc"])
    for stage in ("teacher", "distilled", "baseline"):
        assert (tmp_path / "run" / stage / "metrics.csv").is_file(), stage
        assert (tmp_path / "run" / stage / "checkpoints" / "last.ckpt").is_file(), stage
    assert trained_teacher_path(settings_of(cfg)).is_file()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    for key in ("test/ece", "test/agreement", "test/kl_t1"):
        assert key in results["distilled"] and key in results["baseline"]
    assert results["teacher"]["test/ece"] is not None


def test_without_matplotlib_the_run_works_and_says_how_to_get_plots(
    make_cfg, tmp_path: Path, monkeypatch, caplog
) -> None:
    import kd_lightning.run.plots

    monkeypatch.setattr(kd_lightning.run.plots, "pyplot", lambda: None)
    train(make_cfg(*FAST, "baseline=false"))
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / "curves.png").exists()
    assert "pip install 'kd_lightning[plots]'" in caplog.text


def test_a_sweep_over_distillation_settings_trains_the_teacher_once(make_cfg, tmp_path: Path) -> None:
    first = make_cfg(*FAST, "distill.temperature=2", output_dir=tmp_path / "a")
    second = make_cfg(*FAST, "distill.temperature=8", "distill.alpha=0.5", output_dir=tmp_path / "b")
    assert trained_teacher_path(settings_of(first)) == trained_teacher_path(settings_of(second))
    train(first)
    stamp = trained_teacher_path(settings_of(first)).stat().st_mtime_ns
    results = train(second)
    assert not (tmp_path / "b" / "teacher").exists()  # no teacher stage the second time
    assert trained_teacher_path(settings_of(first)).stat().st_mtime_ns == stamp
    assert (
        results["teacher"]["test/acc"]
        == json.loads((tmp_path / "a" / "metrics.json").read_text())["teacher"]["test/acc"]
    )


def test_teacher_key_changes_with_what_defines_the_teacher(make_cfg) -> None:
    base = trained_teacher_path(settings_of(make_cfg()))
    assert trained_teacher_path(settings_of(make_cfg("seed=1"))) != base
    assert trained_teacher_path(settings_of(make_cfg("teacher.model.hidden=64"))) != base
    assert (
        trained_teacher_path(settings_of(make_cfg("trainer.fast_dev_run=true"))) != base
    )  # a smoke test never poisons real runs
    assert trained_teacher_path(settings_of(make_cfg("trainer.enable_progress_bar=true"))) == base


def test_teacher_checkpoint_is_loaded_instead_of_trained(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*FAST, output_dir=tmp_path / "a")
    train(cfg)
    cached = trained_teacher_path(settings_of(cfg))
    copy = tmp_path / "my_teacher.pth"
    copy.write_bytes(cached.read_bytes())
    cached.unlink()
    results = train(make_cfg(*FAST, f"teacher.checkpoint={copy}", "baseline=false", output_dir=tmp_path / "b"))
    assert not (tmp_path / "b" / "teacher").exists() and not cached.exists()
    assert "baseline" not in results


def test_same_seed_gives_identical_metrics(make_cfg, tmp_path: Path) -> None:
    first = train(make_cfg(*FAST, output_dir=tmp_path / "a"))
    second = train(make_cfg(*FAST, output_dir=tmp_path / "b"))
    for stage in ("teacher", "distilled", "baseline"):
        assert first[stage] == second[stage], stage


def test_existing_results_are_never_overwritten(make_cfg, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"mine": 1}')
    with pytest.raises(KDError, match="already holds the results"):
        train(make_cfg(*FAST))
    assert json.loads((run / "metrics.json").read_text()) == {"mine": 1}
    train(make_cfg(*FAST, "overwrite=true"))
    assert "distilled" in json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.temperature=0", "temperature must be between 0.01 and 100"),
        ("distill.alpha=1.2", r"alpha must be in \[0, 1\]"),
        ("teacher.model.num_classes=7", "teacher 7, student 10"),
        ("teacher.checkpoint=/nonexistent/ckpt_epoch_240.pth", "checkpoint not found"),
    ],
)
def test_bad_input_is_refused_before_training(make_cfg, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(KDError, match=message):
        train(make_cfg(*FAST, override))
    assert not (tmp_path / "run").exists()


def test_corrupt_teacher_checkpoint_is_named(make_cfg, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(KDError, match="corrupt"):
        train(make_cfg(*FAST, f"teacher.checkpoint={bad}"))


def test_checkpoint_of_another_architecture_lists_the_keys(make_cfg, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}}, other)
    with pytest.raises(
        KDError,
        match=r"does not fit the model DigitsCNN.*missing keys: features\.0\.weight.*unexpected keys: fc\.weight",
    ):
        train(make_cfg(*FAST, f"teacher.checkpoint={other}"))
