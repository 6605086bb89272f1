"""Fail before anything trains, in one line; never leave a half-written file; recover from damaged ones."""

from __future__ import annotations

import contextlib
import subprocess
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import settings_of
from test_cli import run_cli

from kd_lightning import KDError
from kd_lightning.files import atomic_directory
from kd_lightning.run.teachers import trained_teacher_path
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.temperature=1e6"], "temperature must be between 0.01 and 100, got 1000000.0"),
        (["distill.temperature=1e-9"], "temperature must be between 0.01 and 100"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be a positive integer, got 0"),
        (["trainer.max_epochs=-1"], r"got -1 \(-1 trains forever unless trainer.max_steps is set\)"),
        (["teacher.fit.max_epochs=0"], "teacher.fit.max_epochs must be a positive integer"),
        (["distill/loss=jsd", "distill.loss.beta=2"], r"distill.loss is set wrong: beta must be in \[0, 1\]"),
        (["+distill.schedules.temperature={kind:exp,start:1}"], "schedule kind must be one of"),
        (["distill.features=[{student:layer9,teacher:features}]"], "the student has no module 'layer9'"),
        (["teacher.mode=recorded", "teacher.recording.top_k=11"], "top_k=11 must be between 1 and the 10 classes"),
        (
            ["teacher.mode=recorded", "teacher.recording.views_per_sample=0"],
            "views_per_sample must be a positive integer",
        ),
        (
            ["teacher.mode=recorded", "teacher.recording.tail=sampled"],
            "tail=sampled draws from the classes outside the top k; set",
        ),
        (
            [
                "teacher.mode=recorded",
                "teacher.recording.top_k=3",
                "teacher.recording.tail=sampled",
                "distill/loss=reverse_kl",
            ],
            "tail=sampled stands in for the teacher in forward KL only .* distill.loss is kd_lightning.loss.objectives.reverse_kl_loss",
        ),
        (
            ["teacher.mode=recorded", "teacher.recording.top_k=10", "teacher.recording.tail=sampled"],
            "leaves no tail to draw from",
        ),
        (
            [
                "teacher.mode=recorded",
                "teacher.recording.top_k=3",
                "teacher.recording.tail=sampled",
                "teacher.recording.tail_samples=0",
            ],
            "tail_samples must be a positive integer, got 0",
        ),
        (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
        (["speed.chunk_rows=64"], "speed.chunk_rows is for language models"),
        (["speed.chunk_rows=0"], "speed.chunk_rows must be a positive integer"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["trainer.max_steps=0"], r"trainer.max_steps must be -1 \(no limit\) or a positive integer, got 0"),
        (["optim.optimizer.lr=nan"], "optim.optimizer is set wrong: Invalid learning rate: nan"),
        (["optim.optimizer.lr=-0.01"], "optim.optimizer is set wrong: Invalid learning rate: -0.01"),
        (
            ["+optim.optimizer.momentum=0.9"],
            "unknown setting optim.optimizer.momentum: nothing reads it \\(AdamW takes no argument momentum\\)",
        ),
        (
            ["+optim.scheduler.bogus=1"],
            "unknown setting optim.scheduler.bogus: nothing reads it \\(CosineAnnealingLR takes no argument bogus\\)",
        ),
        (["trainer.precision=bogus"], "trainer.precision must be one of .*32-true.*, got 'bogus'"),
        (["trainer.devices=999"], "trainer.devices=999 starts 999 CPU processes but this machine has"),
        (
            ["distill/loss=dkd", "distill.loss.nckd_weight=-8"],
            "distill.loss is set wrong: nckd_weight must be a finite number >= 0",
        ),
        (["+foo=1"], "unknown setting foo: nothing reads it"),
        (["+teacher.recording.topk=3"], "unknown setting teacher.recording.topk"),
        (
            ["+distill.tempreature=3"],
            r"unknown setting distill.tempreature: nothing reads it; did you mean distill.temperature\?",
        ),
    ],
)
def test_bad_input_stops_before_any_stage_trains(make_cfg, tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = make_cfg(*FAST, *overrides)
    with pytest.raises(KDError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()  # no stage started, nothing written
    assert not (tmp_path / "cache").exists()


def test_an_unknown_setting_without_plus_gets_our_line_and_the_closest_names(tmp_path: Path) -> None:
    """Hydra's own refusal ("Could not override ... To append to your config use +foo=1") sends users the wrong way."""
    from kd_lightning.run.config import unknown_setting

    out = run_cli(tmp_path, "distill.tempreature=3", "hydra.run.dir=run")
    assert out.returncode == 1 and out.stderr.startswith(
        "error: unknown setting distill.tempreature: nothing reads it; did you "
        "mean distill.temperature? Otherwise remove it (the settings here are "
    )
    assert len(out.stderr.strip().splitlines()) == 1 and "+" not in out.stderr
    assert str(unknown_setting("trainer.max_epoch")) == (
        "unknown setting trainer.max_epoch: nothing reads it (Trainer takes no argument max_epoch); did you mean "
        "trainer.max_epochs? Otherwise remove it."
    )
    assert str(unknown_setting("foo")).startswith(
        "unknown setting foo: nothing reads it; remove it (the settings here are "
    )
    assert "hydra" not in str(unknown_setting("foo")) and "override" not in str(unknown_setting("foo"))


def test_a_renamed_setting_is_refused_with_its_new_name(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "distill.chunk_rows=64", "hydra.run.dir=run")
    assert out.returncode == 1
    assert (
        out.stderr == "error: distill.chunk_rows was renamed to speed.chunk_rows; set speed.chunk_rows=... instead.\n"
    )
    assert not (tmp_path / "run").exists()


UNKNOWN_IN_OPEN_NODES = [
    # the names of the config node and the arguments of what it builds, with or without +
    (
        "data.batchsize=3",
        "unknown setting data.batchsize: nothing reads it (DigitsDataModule takes no argument batchsize); did you mean data.batch_size or data.eval_batch_size?",
    ),
    (
        "+data.batchsize=3",
        "unknown setting data.batchsize: nothing reads it (DigitsDataModule takes no argument batchsize); did you mean data.batch_size or data.eval_batch_size?",
    ),
    (
        "+trainer.max_epoch=2",
        "unknown setting trainer.max_epoch: nothing reads it (Trainer takes no argument max_epoch); did you mean trainer.max_epochs?",
    ),
    (
        "optim.optimizer.lrr=3",
        "unknown setting optim.optimizer.lrr: nothing reads it (AdamW takes no argument lrr); did you mean optim.optimizer.lr?",
    ),
    (
        "+optim.optimizer.lrr=3",
        "unknown setting optim.optimizer.lrr: nothing reads it (AdamW takes no argument lrr); did you mean optim.optimizer.lr?",
    ),
    (
        "student.model.widht=3",
        "unknown setting student.model.widht: nothing reads it (DigitsCNN takes no argument widht); did you mean student.model.width?",
    ),
    (
        "logger.save_dirr=x",
        "unknown setting logger.save_dirr: nothing reads it (CSVLogger takes no argument save_dirr); did you mean logger.save_dir?",
    ),
    (
        "trainer.barebones=true",
        "trainer.barebones is an argument of Trainer that the config does not list: add it with "
        "+trainer.barebones=VALUE.",
    ),
]


@pytest.mark.parametrize(("override", "line"), UNKNOWN_IN_OPEN_NODES)
def test_an_unknown_setting_anywhere_names_the_closest_known_ones(make_cfg, override: str, line: str) -> None:
    """With + (Hydra composes it): refused by check_known_keys before anything is built. Without + (Hydra refuses to
    compose): the line the command line prints, from the node the override was meant for."""
    from hydra.errors import ConfigCompositionException

    from kd_lightning.run.config import composed_node, unknown_setting

    try:
        cfg = make_cfg(override)
    except ConfigCompositionException:
        key = override.split("=")[0]
        error = unknown_setting(key, node=composed_node(key.rpartition(".")[0], []))
    else:
        with pytest.raises(KDError) as raised:
            settings_of(cfg)
        error = raised.value
    assert str(error).startswith(line)


def test_an_unknown_setting_in_an_open_node_is_one_line_from_the_command_line(tmp_path: Path) -> None:
    override, line = UNKNOWN_IN_OPEN_NODES[0]
    out = run_cli(tmp_path, override, "trainer.fast_dev_run=true", "hydra.run.dir=run")
    assert out.returncode == 1 and out.stderr.startswith(f"error: {line}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not list((tmp_path / "run").rglob("*"))  # nothing written


@pytest.mark.slow  # several command-line runs, over 25 s on 2 cores
def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "distill.temperature=1e6", "hydra.run.dir=run")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(
        "error: distill.temperature"
    )
    out = run_cli(tmp_path, "distill.temperature=abc")
    assert out.returncode == 1 and out.stderr.startswith(
        "error: Error merging override distill.temperature=abc: Value 'abc'"
    )


@contextlib.contextmanager
def small_file_system(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (root only); the test is skipped where it cannot be mounted."""
    where.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_leaves_no_half_written_checkpoint_and_says_so_in_one_line(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "small", "600k") as small:
        out = run_cli(tmp_path, "trainer.max_epochs=2", f"hydra.run.dir={small / 'run'}")
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: No space left on device, ") and "ckpt_path=last" in last
        for checkpoint in small.rglob("*.ckpt*"):  # whatever is there is complete
            with zipfile.ZipFile(checkpoint) as archive:
                assert archive.testzip() is None, checkpoint


def test_a_read_only_run_directory_is_one_line(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "ro", "100k", read_only=True) as read_only:
        out = run_cli(tmp_path, "trainer.fast_dev_run=true", f"hydra.run.dir={read_only / 'run'}")
        assert out.returncode == 1
        assert out.stderr.strip() == (
            f"error: Read-only file system, {read_only / 'run'}; that file system is read-only: point "
            "the run (hydra.run.dir=...) or the caches (paths.cache_dir=..., $KD_LIGHTNING_CACHE) "
            "at a writable directory."
        )


def test_a_corrupt_cached_teacher_is_set_aside_and_trained_again(make_cfg, tmp_path: Path, caplog) -> None:
    first = make_cfg(*FAST, "baseline=false", output_dir=tmp_path / "a")
    train(first)
    cached = trained_teacher_path(settings_of(first))
    cached.write_bytes(cached.read_bytes()[:100])
    results = train(make_cfg(*FAST, "baseline=false", output_dir=tmp_path / "b"))
    assert (tmp_path / "b" / "teacher").is_dir() and 0 <= results["teacher"]["test/acc"] <= 1
    (aside,) = cached.parent.glob(f"{cached.name}.corrupt-*")
    assert aside.stat().st_size == 100 and cached.stat().st_size > 100
    assert "set aside as" in caplog.text


def test_a_damaged_stage_checkpoint_is_named_when_resuming(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(*FAST, "baseline=false"))
    last = tmp_path / "run" / "distilled" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(
        KDError, match=r"the distilled stage's checkpoint .*last.ckpt is damaged .*; delete it to restart"
    ):
        train(make_cfg(*FAST, "baseline=false", "ckpt_path=last", "overwrite=true"))


def test_a_killed_writer_s_temporary_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "recordings" / "resnet8-0123"
    stale = target.with_name(f".{target.name}.tmp-99999")
    stale.mkdir(parents=True)
    (stale / "train.logits.npy").write_bytes(b"half")
    with atomic_directory(target) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert not stale.exists() and (target / "meta.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_a_directory_given_as_teacher_checkpoint_is_named_as_one(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "teachers"
    folder.mkdir()
    torch.save({}, folder / "ckpt_epoch_240.pth")
    with pytest.raises(KDError, match=r"is a directory, not a checkpoint file; .* \(it holds ckpt_epoch_240.pth\)"):
        train(make_cfg(*FAST, f"teacher.checkpoint={folder}"))
