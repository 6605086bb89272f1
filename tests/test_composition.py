"""Loss composition from config: named weighted terms, custom objectives, schedules, feature
distillation through hooks, and the exported student."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_cli import run_cli
from torch import nn

from kd_lightning import DistillationModule, KDError, LossMix, kd_loss
from kd_lightning.loss.features import FeatureDistiller, attention_map
from kd_lightning.loss.schedules import Schedule
from kd_lightning.models.cifar import build_cifar_model
from kd_lightning.models.digits import DigitsCNN
from kd_lightning.run.export import export_student
from kd_lightning.run.train import train

FAST = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
]


def scaled_kd(student_logits, teacher_logits, temperature, labels=None, factor=1.0):
    """A user's objective, plugged in by _target_ (tests/test_composition.py is importable as a module)."""
    return factor * kd_loss(student_logits, teacher_logits, temperature)


class ConstantObjective:
    """A user's objective class: the term is logged under the class name."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, student_logits, teacher_logits, temperature, labels=None):
        return student_logits.sum() * 0 + self.value


def logged(run: Path, stage: str = "distilled") -> list[dict[str, str]]:
    with open(run / stage / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# -- terms ---------------------------------------------------------------------------------------


def test_every_term_is_logged_under_its_name_and_they_sum_to_the_loss(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "distill/loss=dkd",
        "+distill.extra_terms.rkl={objective:{_target_:kd_lightning.loss.objectives.reverse_kl_loss,_partial_:true},weight:0.5}",
        "distill.features=[{student:features,teacher:features,loss:fitnet,weight:3}]",
        "baseline=false",
        *FAST,
    )
    train(cfg)
    rows = [r for r in logged(Path(cfg.paths.output_dir)) if r.get("train/loss")]
    assert rows
    for r in rows:
        parts = sum(float(r[k]) for k in ("train/ce", "train/dkd", "train/rkl", "train/fitnet/features"))
        assert float(r["train/loss"]) == pytest.approx(parts, rel=1e-5)


def test_a_custom_objective_plugs_in_by_target(make_cfg, tmp_path: Path) -> None:
    base = train(make_cfg("baseline=false", *FAST, output_dir=tmp_path / "kd"))
    custom = train(
        make_cfg(
            "distill.loss._target_=test_composition.scaled_kd",
            "~distill.loss.scale_by_t2",
            "~distill.loss.standardize",
            "+distill.loss.factor=1.0",
            "baseline=false",
            *FAST,
            output_dir=tmp_path / "custom",
        )
    )
    assert custom["distilled"]["test/acc"] == base["distilled"]["test/acc"]  # the same loss, so the same run
    rows = logged(tmp_path / "custom")
    assert column(rows, "train/scaled_kd") and not column(rows, "train/kd")
    # a config file of the user's own, found through Hydra's search path: distill/loss=mine
    own = tmp_path / "my_conf" / "distill" / "loss"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text(
        "# @package distill\nloss:\n  _target_: test_composition.ConstantObjective\n  value: 2.0\n"
    )
    train(
        make_cfg(
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
            "distill/loss=mine",
            "baseline=false",
            *FAST,
            output_dir=tmp_path / "cls",
        )
    )
    assert column(logged(tmp_path / "cls"), "train/ConstantObjective") == pytest.approx([0.9 * 2.0] * 6)


@pytest.mark.slow  # a command line of over 15 s on 2 cores
def test_sweep_over_objectives_with_fast_dev_run(tmp_path: Path) -> None:
    out = run_cli(
        tmp_path,
        "distill/loss=kd,reverse_kl,jsd,dkd",
        "trainer.fast_dev_run=true",
        "baseline=false",
        "hydra.sweep.dir=sweep",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(4)]
    assert all(0 <= r["distilled"]["test/acc"] <= 1 for r in results)
    targets = [(tmp_path / "sweep" / str(i) / ".hydra" / "config.yaml").read_text() for i in range(4)]
    for text, name in zip(targets, ("kd_loss", "reverse_kl_loss", "jsd_loss", "dkd_loss")):
        assert f"kd_lightning.loss.objectives.{name}" in text


def test_bad_term_settings_are_refused(make_cfg) -> None:
    with pytest.raises(KDError, match="not a schedulable quantity"):
        train(make_cfg("+distill.schedules.tau={kind:constant,start:1}", *FAST))
    with pytest.raises(KDError, match=r"distill.weights has \['fitnet'\], which is not a loss term"):
        train(make_cfg("+distill.weights.fitnet=1.0", *FAST))
    with pytest.raises(KDError, match="schedule kind must be one of"):
        train(make_cfg("+distill.schedules.temperature={kind:exp,start:1}", *FAST))
    with pytest.raises(KDError, match="feature loss must be one of"):
        train(make_cfg("distill.features=[{student:features,teacher:features,loss:l1}]", *FAST))
    with pytest.raises(KDError, match="has no module 'layer9'"):
        train(make_cfg("distill.features=[{student:layer9,teacher:features}]", *FAST))
    with pytest.raises(KDError, match="needs the live teacher"):
        train(make_cfg("teacher.mode=recorded", "distill.features=[{student:features,teacher:features}]", *FAST))
    with pytest.raises(KDError, match="distill.alpha has no effect here: ce and dkd take their weights"):
        train(make_cfg("distill/loss=dkd", "distill.alpha=0.5", *FAST))  # DKD's CE and DKD weights are its own


# -- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"kind": "constant", "start": 3.0}, [3.0, 3.0, 3.0, 3.0, 3.0]),
        ({"kind": "linear", "start": 0.0, "end": 1.0, "length": 4}, [0.0, 0.25, 0.5, 0.75, 1.0]),
        ({"kind": "cosine", "start": 8.0, "end": 2.0, "length": 2}, [8.0, 5.0, 2.0, 2.0, 2.0]),
        ({"kind": "step", "start": 8.0, "milestones": [1, 3], "gamma": 0.5}, [8.0, 4.0, 4.0, 2.0, 2.0]),
    ],
)
def test_schedule_values(spec, expected) -> None:
    by_epoch = Schedule(**spec)
    assert [by_epoch.value(e, 1000) for e in range(5)] == pytest.approx(expected)
    by_step = Schedule(**spec, interval="step")
    assert [by_step.value(1000, s) for s in range(5)] == pytest.approx(expected)
    with pytest.raises(KDError, match="needs end"):
        Schedule(kind="linear", start=1.0)


def test_scheduled_temperature_and_weight_are_logged_every_step(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "+distill.schedules.temperature={kind:linear,start:8,end:2,length:6,interval:step}",
        "distill/loss=dkd",
        "distill.schedules.dkd.length=2",
        "distill.schedules.dkd.interval=step",
        "baseline=false",
        *FAST,
    )
    train(cfg)
    rows = logged(Path(cfg.paths.output_dir))
    assert column(rows, "train/temperature") == pytest.approx([8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    assert column(rows, "train/weight/dkd") == pytest.approx([0.5] + [1.0] * 5)  # DKD's warm-up, here over two steps
    assert column(rows, "train/dkd")[0] > 0


def test_weights_replace_the_alpha_defaults(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("+distill.weights.ce=1.0", "+distill.weights.kd=2.0", "distill.alpha=null", "baseline=false", *FAST)
    train(cfg)
    unweighted = make_cfg("distill.alpha=1.0", "baseline=false", *FAST, output_dir=tmp_path / "plain")
    train(unweighted)
    ce_weighted, kd_weighted = (
        column(logged(Path(cfg.paths.output_dir)), "train/ce"),
        column(logged(Path(cfg.paths.output_dir)), "train/kd"),
    )
    assert len(ce_weighted) == 6 and all(k > 0 for k in kd_weighted)
    # first step, same initial student: kd term is 2x the unweighted KD
    assert kd_weighted[0] == pytest.approx(2.0 * column(logged(tmp_path / "plain"), "train/kd")[0], rel=1e-5)


# -- feature distillation ------------------------------------------------------------------------


def test_adapters_are_sized_from_shapes_and_hooks_are_removed() -> None:
    teacher, student = build_cifar_model("resnet20", 10).eval(), build_cifar_model("resnet8x4", 10)
    distiller = FeatureDistiller(
        [
            {"student": "layer3", "teacher": "layer3", "loss": "fitnet"},
            {"student": "fc", "teacher": "fc", "loss": "fitnet", "name": "logits"},
            {"student": "layer2", "teacher": "layer2", "loss": "attention"},
        ]
    )
    distiller.attach(student, teacher)
    distiller.build_adapters(student, teacher, torch.zeros(2, 3, 32, 32))
    conv, linear = distiller.adapters["0"], distiller.adapters["1"]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (256, 64, (1, 1))
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (10, 10)
    assert "2" not in distiller.adapters  # attention transfer needs none
    distiller.detach()
    assert all(not m._forward_hooks for m in [*teacher.modules(), *student.modules()])


def test_attention_transfer_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    at = lambda f: torch.nn.functional.normalize(f.pow(2).mean(1).view(f.size(0), -1))  # noqa: E731  (RepDistiller)
    torch.testing.assert_close(attention_map(s, 2.0), at(s))
    distiller = FeatureDistiller([{"student": "s", "teacher": "t", "loss": "attention"}])
    distiller.captured = {"student": {"s": s}, "teacher": {"t": t}}
    loss = distiller.losses_from_captured()["at/s"]
    torch.testing.assert_close(loss, (at(s) - at(t)).pow(2).mean())


def test_fitnet_and_mse_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    distiller = FeatureDistiller(
        [{"student": "s", "teacher": "t", "loss": "fitnet"}, {"student": "t", "teacher": "t", "loss": "mse"}]
    )
    distiller.captured = {"student": {"s": s, "t": t + 1}, "teacher": {"t": t}}
    distiller.adapters["0"] = nn.Conv2d(4, 8, 1)
    losses = distiller.losses_from_captured()
    expected = (
        torch.nn.functional.adaptive_avg_pool2d(distiller.adapters["0"](s), (3, 3)).sub(t).pow(2).mean()
    )  # 6x6 pooled to 3x3
    torch.testing.assert_close(losses["fitnet/s"], expected)
    torch.testing.assert_close(losses["mse/t"], torch.tensor(1.0))


def test_fitnet_training_trains_adapters_keeps_teacher_frozen_and_exports_the_student_alone(tmp_path: Path) -> None:
    from kd_lightning.data import DigitsDataModule

    L.seed_everything(0)
    teacher, student = DigitsCNN(), DigitsCNN(width=8, hidden=16, dropout=0.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(
        student,
        teacher,
        num_classes=10,
        loss_mix=LossMix(
            features=[
                {"student": "features", "teacher": "features", "loss": "fitnet", "weight": 10},
                {"student": "classifier.3", "teacher": "classifier.3", "loss": "fitnet"},
            ]
        ),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    adapters = module.loss_mix.features.adapters
    assert isinstance(adapters["0"], nn.Conv2d) and isinstance(adapters["1"], nn.Linear)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in adapters.parameters())
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not m._forward_hooks for m in [*teacher.modules(), *student.modules()])  # removed after fit

    ckpt = tmp_path / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    assert any(k.startswith("loss_mix.features.adapters.") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    # a checkpoint written by kd_lightning 0.2 kept the adapters under "features.": they still load
    old = torch.load(ckpt, weights_only=False)
    old["state_dict"] = {k.removeprefix("loss_mix."): v for k, v in old["state_dict"].items()}
    again = DistillationModule(
        DigitsCNN(width=8, hidden=16, dropout=0.0),
        teacher,
        num_classes=10,
        loss_mix=LossMix(
            features=[
                {"student": "features", "teacher": "features", "loss": "fitnet"},
                {"student": "classifier.3", "teacher": "classifier.3", "loss": "fitnet"},
            ]
        ),
    )
    again.loss_mix.features.attach(again.student, teacher)
    again.loss_mix.features.build_adapters(again.student, teacher, torch.zeros(2, 1, 8, 8))
    again.loss_mix.features.detach()
    again.on_load_checkpoint(old)
    assert not again.load_state_dict(old["state_dict"], strict=False).unexpected_keys
    assert torch.equal(again.loss_mix.features.adapters["0"].weight, adapters["0"].weight)

    exported = export_student(ckpt, tmp_path / "student.pt", student=DigitsCNN(width=8, hidden=16, dropout=0.0))
    bare = DigitsCNN(width=8, hidden=16, dropout=0.0)
    bare.load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)  # nothing but the student
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(bare.eval()(x), student.eval()(x))
    torch.testing.assert_close(exported(x), student(x))


# -- export from a run ---------------------------------------------------------------------------


@pytest.mark.slow  # several command-line runs, over 25 s on 2 cores
def test_export_command_writes_a_strictly_loadable_student(tmp_path: Path, capsys) -> None:
    out = run_cli(
        tmp_path,
        "distill.features=[{student:features,teacher:features,loss:fitnet,weight:10}]",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "baseline=false",
        "hydra.run.dir=run",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = tmp_path / "run" / "distilled" / "checkpoints" / "last.ckpt"
    import subprocess
    import sys

    export = [
        sys.executable,
        "-m",
        "kd_lightning",
        "export",
        str(ckpt),
        str(tmp_path / "student.pt"),
        "--torchscript",
        str(tmp_path / "student.ts"),
        "--torch-export",
        str(tmp_path / "student.pt2"),
    ]
    done = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DigitsCNN" in done.stdout
    student = DigitsCNN(width=16, hidden=64, dropout=0.0)  # the default student
    student.load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)
    x = torch.rand(3, 1, 8, 8)
    expected = student.eval()(x)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "student.ts"))(x), expected)
    torch.testing.assert_close(torch.export.load(str(tmp_path / "student.pt2")).module()(x), expected)

    # the refusals, in this process (the export command's main, as the CLI calls it)
    from kd_lightning.run.export import main as export_main

    def refused(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_status:
            export_main(list(args))
        assert exit_status.value.code == 1
        return capsys.readouterr().err

    again = refused(*export[4:6])
    assert "already exists" in again and "--overwrite" in again
    lost = refused(
        str(tmp_path / "nowhere.ckpt"),
        str(tmp_path / "x.pt"),
        "--config",
        str(tmp_path / "run" / ".hydra" / "config.yaml"),
    )
    assert "checkpoint not found" in lost and "teacher.checkpoint" not in lost
    assert refused(str(tmp_path / "nowhere.ckpt"), str(tmp_path / "y.pt")).startswith(
        "error: checkpoint not found: "
    )  # not 'no .hydra/config.yaml'

    # refused before anything is written: onto its own checkpoint, onto an existing TorchScript file, the teacher's
    before = ckpt.read_bytes()
    assert (
        "is the checkpoint being exported" in refused(str(ckpt), str(ckpt), "--overwrite")
        and ckpt.read_bytes() == before
    )
    assert "student.ts already exists" in refused(
        str(ckpt), str(tmp_path / "other.pt"), "--torchscript", str(tmp_path / "student.ts")
    )
    assert not (tmp_path / "other.pt").exists()
    stage = tmp_path / "run" / "teacher" / "checkpoints" / "last.ckpt"
    teacher = refused(str(stage), str(tmp_path / "teacher.pt"))
    assert "is the teacher stage's checkpoint" in teacher and "wrong shapes" not in teacher
    assert not (tmp_path / "teacher.pt").exists()
    assert "--format hf writes transformers models" in refused(str(ckpt), str(tmp_path / "hf"), "--format", "hf")
    assert not (tmp_path / "hf").exists()
