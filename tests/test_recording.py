"""Recorded teacher: recorded logits replay live KD exactly, are recorded once, and refuse the wrong data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_image_tree

from kd_lightning import KDError
from kd_lightning.data import CIFARDataModule
from kd_lightning.data.augment import RecordedViews
from kd_lightning.models.cifar import build_cifar_model
from kd_lightning.run.train import train
from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher
from kd_lightning.teacher.format import rebuild_logits

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
FP16_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}  # float16 keeps 11 significant bits


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> CIFARDataModule:
    root = make_image_tree(tmp_path / "tree", classes=3, per_class={"train": 2, "test": 1})
    dm = CIFARDataModule(
        name="cifar10", num_classes=10, data_dir=str(root), val_size=2, batch_size=4, eval_batch_size=4
    )
    dm.setup()
    return dm


def teacher_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_cifar_model("resnet8", 10).eval()


def test_all_views_are_every_distinct_crop_and_flip(tiny_cifar: CIFARDataModule) -> None:
    bank = RecordedViews.draw(tiny_cifar.augment, len(tiny_cifar.splits["train"]), "all")
    assert bank.per_sample == tiny_cifar.augment.distinct_views == 162
    distinct = {(int(o[0]), int(o[1]), bool(f)) for o, f in zip(bank.offsets[0], bank.flips[0])}
    assert len(distinct) == 162


def test_a_recorded_teacher_with_all_views_is_the_live_teacher(tiny_cifar: CIFARDataModule, tmp_path: Path) -> None:
    from kd_lightning import DistillationModule, LiveTeacher

    teacher = teacher_model()
    record_teacher(teacher, tiny_cifar, tmp_path / "outputs", {}, RecordingSettings("all", None), accelerator="cpu")
    outputs = RecordedTeacher(tmp_path / "outputs")
    images = tiny_cifar.splits["train"].inputs
    index = torch.arange(len(images))
    bank = outputs.views
    assert bank.per_sample == 162
    with torch.no_grad():
        for slot in range(bank.per_sample):  # every recorded view of every image is the teacher's output on it
            slots = torch.full_like(index, slot)
            view = tiny_cifar.prepare_inputs(tiny_cifar.augment.apply(images, bank.views(index, slots)))
            torch.testing.assert_close(
                outputs.logits({"index": index, "view": slots}, "train"), teacher(view), **FP16_TOLERANCE
            )

    # a training batch as the datamodule builds it (random recorded views): the same loss from either teacher
    slots = torch.randint(0, 162, (len(index),), generator=torch.Generator().manual_seed(1))
    inputs = tiny_cifar.prepare_inputs(tiny_cifar.augment.apply(images, bank.views(index, slots)))
    batch = {"inputs": inputs, "labels": tiny_cifar.splits["train"].targets, "index": index, "view": slots}
    student = build_cifar_model("resnet8", 10)
    live, recorded = (
        DistillationModule(student, source, num_classes=10).training_step(dict(batch), 0)
        for source in (LiveTeacher(teacher), outputs)
    )
    torch.testing.assert_close(recorded, live, rtol=1e-3, atol=1e-5)
    for split in ("val", "test"):  # evaluation splits: one unaugmented view
        data = tiny_cifar.splits[split]
        with torch.no_grad():
            expected = teacher(tiny_cifar.prepare_inputs(data.inputs))
        torch.testing.assert_close(
            outputs.logits({"index": torch.arange(len(data))}, split), expected, **FP16_TOLERANCE
        )


def test_training_replays_recorded_views_and_never_runs_a_teacher(tiny_cifar: CIFARDataModule, tmp_path: Path) -> None:
    import lightning as L

    from kd_lightning import DistillationModule

    teacher = teacher_model()
    record_teacher(teacher, tiny_cifar, tmp_path / "outputs", {}, RecordingSettings(3, None), accelerator="cpu")
    outputs = RecordedTeacher(tmp_path / "outputs")
    tiny_cifar.replay_views(outputs.views)
    seen = []

    class Checking(DistillationModule):
        def teacher_forward(self, batch):
            logits = super().teacher_forward(batch)
            if self.trainer.training:
                with torch.no_grad():
                    seen.append((logits, teacher(batch["inputs"])))
            return logits

    module = Checking(build_cifar_model("resnet8", 10), outputs, num_classes=10)
    assert module.teacher is outputs
    L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    ).fit(module, datamodule=tiny_cifar)
    assert len(seen) == 2  # 4 training images, batch 4, 2 epochs
    for cached, live in seen:  # the student's augmented input is one the teacher was recorded on
        torch.testing.assert_close(cached, live, **FP16_TOLERANCE)
    assert not any(k.startswith("teacher") for k in module.state_dict())


def test_top_k_rebuilds_the_teacher_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=generator) * 3
    lse = logits.logsumexp(-1)
    values, indices = logits.topk(100, -1)
    torch.testing.assert_close(rebuild_logits(values, indices, lse, 100), logits)  # k = C: exact
    values, indices = logits.topk(10, -1)
    rebuilt = rebuild_logits(values, indices, lse, 100)
    p, q = logits.softmax(-1), rebuilt.softmax(-1)
    torch.testing.assert_close(
        q.gather(-1, indices), p.gather(-1, indices)
    )  # the top-k probabilities are the teacher's
    torch.testing.assert_close(q.sum(-1), torch.ones(6))
    tail = torch.ones_like(p, dtype=torch.bool).scatter_(-1, indices, False)
    torch.testing.assert_close((q * tail).sum(-1), (p * tail).sum(-1))  # and so is the tail's total mass


def test_top_k_rebuilt_with_the_label_s_logit_keeps_the_label_s_probability() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=generator) * 3
    lse = logits.logsumexp(-1)
    values, indices = logits.topk(10, -1)
    labels = torch.tensor([indices[0, 3].item(), 50, 51, -100, 7, 99])  # in the top k, outside, ..., not counted
    rebuilt = rebuild_logits(values, indices, lse, 100, labels, logits.gather(-1, labels.clamp_min(0)[:, None])[:, 0])
    p, q = logits.softmax(-1), rebuilt.softmax(-1)
    counted = labels >= 0
    torch.testing.assert_close(
        q[counted].gather(-1, labels[counted, None]), p[counted].gather(-1, labels[counted, None])
    )
    torch.testing.assert_close(q.gather(-1, indices), p.gather(-1, indices))  # the top k, still exact
    torch.testing.assert_close(q.sum(-1), torch.ones(6))
    torch.testing.assert_close(
        q[3], rebuild_logits(values, indices, lse, 100)[3].softmax(-1)
    )  # -100: the plain rebuild


def test_top_k_recording_is_smaller_and_close(tiny_cifar: CIFARDataModule, tmp_path: Path) -> None:
    teacher = teacher_model()
    record_teacher(teacher, tiny_cifar, tmp_path / "full", {}, RecordingSettings(2, None), accelerator="cpu")
    record_teacher(teacher, tiny_cifar, tmp_path / "top3", {}, RecordingSettings(2, 3), accelerator="cpu")
    full, top3 = RecordedTeacher(tmp_path / "full"), RecordedTeacher(tmp_path / "top3")
    index = torch.arange(len(tiny_cifar.splits["train"]))
    assert full.meta["views"] and torch.equal(full.views.offsets, top3.views.offsets)  # same seed, same views
    p = full.logits({"index": index, "view": torch.zeros_like(index)}, "train").softmax(-1)
    q = top3.logits({"index": index, "view": torch.zeros_like(index)}, "train").softmax(-1)
    kept = p.topk(3, -1).indices
    torch.testing.assert_close(q.gather(-1, kept), p.gather(-1, kept), **FP16_TOLERANCE)
    assert top3.arrays["train"]["topk_indices"].dtype == torch.uint8  # the smallest type that holds 10 class ids
    assert top3.meta["bytes_per_position"] == 3 * 2 + 3 * 1 + 4 and full.meta["bytes_per_position"] == 10 * 2
    assert 0 <= top3.meta["tail_mass"]["mean"] <= top3.meta["tail_mass"]["max"] <= 1 and full.meta["tail_mass"] is None


def test_a_run_from_the_cache_does_not_load_the_teacher(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train(make_cfg("teacher.mode=recorded", *FAST, output_dir=tmp_path / "a"))
    recordings = list((tmp_path / "cache" / "recordings").glob("*/meta.json"))
    assert len(recordings) == 1
    live = train(make_cfg(*FAST, output_dir=tmp_path / "live"))
    assert first["teacher"]["test/acc"] == pytest.approx(live["teacher"]["test/acc"])  # fidelity metrics from the cache

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its outputs are cached")

    from omegaconf import OmegaConf

    from kd_lightning.run import teachers
    from kd_lightning.run.settings import Factory

    cfg = make_cfg("teacher.mode=recorded", "distill.temperature=2", *FAST, output_dir=tmp_path / "b")
    teacher_network = OmegaConf.to_container(cfg.teacher.model, resolve=True)
    build = Factory.__call__
    monkeypatch.setattr(teachers, "teacher_model", no_teacher)
    monkeypatch.setattr(
        Factory, "__call__", lambda self, **kw: no_teacher() if self.settings == teacher_network else build(self, **kw)
    )
    second = train(cfg)
    assert second["teacher"] == first["teacher"]
    assert len(list((tmp_path / "cache" / "recordings").glob("*/meta.json"))) == 1


def test_recording_depends_on_what_the_outputs_depend_on(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("teacher.mode=recorded", *FAST, output_dir=tmp_path / "a"))
    train(make_cfg("teacher.mode=recorded", "teacher.recording.top_k=3", *FAST, output_dir=tmp_path / "b"))
    train(make_cfg("teacher.mode=recorded", "data.split_seed=1", *FAST, output_dir=tmp_path / "c"))
    assert len(list((tmp_path / "cache" / "recordings").glob("*/meta.json"))) == 3


def test_a_recording_for_other_data_or_another_teacher_is_refused(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("teacher.mode=recorded", *FAST, output_dir=tmp_path / "a"))
    (recording,) = (tmp_path / "cache" / "recordings").glob("*/meta.json")
    use = f"teacher.recording.dir={recording.parent}"
    with pytest.raises(KDError, match="recorded for another data"):
        train(make_cfg("teacher.mode=recorded", use, "data.split_seed=1", *FAST, output_dir=tmp_path / "b"))
    other = tmp_path / "other.pth"
    torch.save({"model": build_digits_teacher().state_dict()}, other)
    with pytest.raises(KDError, match="recorded for another teacher weights"):
        train(make_cfg("teacher.mode=recorded", use, f"teacher.checkpoint={other}", *FAST, output_dir=tmp_path / "c"))
    train(make_cfg("teacher.mode=recorded", use, *FAST, output_dir=tmp_path / "d"))  # the matching data is accepted


def build_digits_teacher() -> torch.nn.Module:
    from kd_lightning.models.digits import DigitsCNN

    torch.manual_seed(123)
    return DigitsCNN()


def test_a_corrupt_recording_is_named_with_the_fix(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("teacher.mode=recorded", *FAST, output_dir=tmp_path / "a"))
    (recording,) = (tmp_path / "cache" / "recordings").glob("*/meta.json")
    logits = recording.parent / "train.logits.npy"
    logits.write_bytes(logits.read_bytes()[:200])
    with pytest.raises(KDError, match=r"corrupt.*delete"):
        train(make_cfg("teacher.mode=recorded", *FAST, output_dir=tmp_path / "b"))
    with pytest.raises(KDError, match="teacher.mode must be live or recorded"):
        train(make_cfg("teacher.mode=lazy", *FAST, output_dir=tmp_path / "c"))
    with pytest.raises(KDError, match="holds no teacher recording"):
        train(make_cfg("teacher.mode=recorded", f"teacher.recording.dir={tmp_path}", *FAST, output_dir=tmp_path / "d"))


def damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_a_recording_changed_after_it_was_written_is_refused_by_name(
    tiny_cifar: CIFARDataModule, tmp_path: Path
) -> None:
    """Garbage written into a top-k recording trained on NaN and 6.5e4 (the values) or crashed with a 141-line traceback
    (the indices): each file's SHA-256 is checked when the recording is opened, and its values' ranges always."""
    import shutil

    record_teacher(teacher_model(), tiny_cifar, tmp_path / "top3", {}, RecordingSettings(2, 3), accelerator="cpu")
    RecordedTeacher(tmp_path / "top3")  # opens cleanly
    values = tmp_path / "top3" / "train.topk_values.npy"
    for garbage in (os.urandom(16), b"\x00" * 16):
        damaged = tmp_path / "damaged"
        shutil.copytree(tmp_path / "top3", damaged)
        damage(damaged / values.name, values.stat().st_size - 16, garbage)
        with pytest.raises(
            KDError,
            match=rf"{damaged / values.name} was changed after it was recorded .* delete {damaged} "
            "and it is recorded again",
        ):
            RecordedTeacher(damaged)
        shutil.rmtree(damaged)

    # a recording from before digests were kept: its values are range-checked all the same
    meta = json.loads((tmp_path / "top3" / "meta.json").read_text())
    del meta["sha256"]
    (tmp_path / "top3" / "meta.json").write_text(json.dumps(meta))
    indices = tmp_path / "top3" / "train.topk_indices.npy"
    good = indices.read_bytes()
    damage(indices, len(good) - 1, bytes([200]))  # class 200 of 10
    with pytest.raises(KDError, match=r"train.topk_indices.npy holds class ids outside 0..9 in samples from 0; delete"):
        RecordedTeacher(tmp_path / "top3")
    indices.write_bytes(good)
    damage(values, values.stat().st_size - 2, np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(KDError, match=r"train.topk_values.npy holds values that are not finite .*; delete"):
        RecordedTeacher(tmp_path / "top3")


def test_a_sweep_over_temperature_records_the_teacher_outputs_once(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_lightning",
            "-m",
            "distill.temperature=1,2,4,8",
            "teacher.mode=recorded",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "baseline=false",
            *FAST,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert log.count("teacher recording: recording") == 3  # train, val, test splits, once
    assert log.count("teacher recording: reusing") == 3
    results = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(4)]
    assert len({r["teacher"]["test/acc"] for r in results}) == 1
    assert np.isfinite([r["distilled"]["test/acc"] for r in results]).all()


def test_recorded_outputs_pickle_by_path(tiny_cifar: CIFARDataModule, tmp_path: Path) -> None:
    """ddp_spawn pickles the module: the recording travels as its path, not as a copy of the arrays."""
    import pickle

    record_teacher(teacher_model(), tiny_cifar, tmp_path / "outputs", {}, RecordingSettings(2, None), accelerator="cpu")
    outputs = RecordedTeacher(tmp_path / "outputs")
    payload = pickle.dumps(outputs)
    assert len(payload) < 1000
    again = pickle.loads(payload)
    index = torch.arange(3)
    batch = {"index": index, "view": torch.ones_like(index)}
    assert torch.equal(again.logits(batch, "train"), outputs.logits(batch, "train"))


def test_a_datamodule_without_sample_indices_is_refused(make_cfg) -> None:
    import lightning as L
    from conftest import settings_of

    from kd_lightning.run.teachers import prepare_teacher

    with pytest.raises(KDError, match="needs a datamodule derived from kd_lightning.data.InMemoryDataModule"):
        prepare_teacher(settings_of(make_cfg("teacher.mode=recorded")), L.LightningDataModule())


def test_a_failed_recording_leaves_nothing_behind(tiny_cifar: CIFARDataModule, tmp_path: Path) -> None:
    with pytest.raises(KDError, match="top_k=11 must be between 1 and the 10 classes"):
        record_teacher(
            teacher_model(), tiny_cifar, tmp_path / "outputs", {}, RecordingSettings(2, 11), accelerator="cpu"
        )
    assert list(tmp_path.iterdir()) == [tmp_path / "tree"]
