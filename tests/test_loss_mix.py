"""The loss mix: one place for each weight, every conflicting or unknown setting refused in one line."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from kd_lightning import KDError, LossMix, kd_loss
from kd_lightning.loss.objectives import dkd_loss, jsd_loss, reverse_kl_loss
from kd_lightning.loss.schedules import Schedule

RKL = {"objective": reverse_kl_loss, "weight": 0.5}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"weights": {"fitnet": 1.0}},
            r"distill.weights has \['fitnet'\], which is not a loss term; the terms are \['ce', 'kd'\]",
        ),
        (
            {"schedules": {"tau": {"kind": "constant", "start": 1}}},
            r"distill.schedules has \['tau'\], which is not a schedulable",
        ),
        (
            {"weights": {"kd": 1.0}, "schedules": {"kd": {"kind": "constant", "start": 1}}},
            r"the weight of \['kd'\] is set twice",
        ),
        ({"extra_terms": {"rkl": RKL}, "weights": {"rkl": 2.0}}, r"the weight of \['rkl'\] is set twice"),
        ({"extra_terms": {"kd": RKL}}, "two loss terms share a name"),
        ({"extra_terms": {"rkl": {"weight": 1.0}}}, "distill.extra_terms.rkl needs an objective"),
        ({"weights": {"ce": 1.0, "kd": 1.0}}, "distill.alpha has no effect here"),
        (
            {"weights": {"ce": 1.0}, "schedules": {"kd": {"kind": "linear", "start": 0, "end": 1, "length": 5}}},
            "distill.alpha has no effect",
        ),
        ({"alpha": None}, r"distill.alpha is null but \['ce', 'kd'\] take their weight from it"),
        ({"alpha": None, "weights": {"ce": 1.0}}, r"distill.alpha is null but \['kd'\]"),
        ({"objective": partial(jsd_loss, beta=2.0)}, r"distill.loss is set wrong: beta must be in \[0, 1\], got 2.0"),
        (
            {"objective": partial(jsd_loss, betta=0.5)},
            "distill.loss is set wrong: jsd_loss.. got an unexpected keyword argument 'betta'",
        ),
        (
            {"extra_terms": {"rkl": {"objective": partial(reverse_kl_loss, scale=2)}}},
            "distill.extra_terms.rkl.objective is set wrong",
        ),
        (
            {"weights": {"kd": -1.0}, "alpha": None, "schedules": {"ce": {"kind": "constant", "start": 1}}},
            "the weight of loss term 'kd' must be a finite number >= 0",
        ),
        ({"temperature": 0.0}, "temperature must be between 0.01 and 100"),
        (
            {
                "schedules": {"kd": {"kind": "linear", "start": 1, "end": -1, "length": 3}},
                "weights": {"ce": 1.0},
                "alpha": None,
            },
            r"distill.schedules.kd spans \[-1, 1\]; a loss term's weight must stay a finite number >= 0",
        ),
        ({"temperature": 1e6}, "temperature must be between 0.01 and 100"),
        ({"temperature": 1e-9}, "temperature must be between 0.01 and 100"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        (
            {"schedules": {"temperature": {"kind": "linear", "start": 4, "end": 0, "length": 3}}},
            r"temperature spans \[0, 4\]; the temperature must stay between 0.01 and 100",
        ),
        (
            {"schedules": {"alpha": {"kind": "step", "start": 0.5, "milestones": [2], "gamma": 3}}},
            r"alpha spans \[0.5, 1.5\]",
        ),
    ],
)
def test_unknown_terms_and_conflicting_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(KDError, match=message) as error:
        LossMix(**kwargs)
    assert "\n" not in str(error.value)


def test_each_weight_comes_from_one_place() -> None:
    mix = LossMix(
        alpha=0.3,
        extra_terms={"rkl": RKL},
        weights={"kd": 2.0},
        schedules={"rkl": {"kind": "linear", "start": 0, "end": 1, "length": 4}},
    )
    assert mix.term_names == ["ce", "kd", "rkl"]
    assert (mix.weight("ce"), mix.weight("kd")) == pytest.approx((0.7, 2.0))
    mix.advance(epoch=2, step=0)
    assert mix.weight("rkl") == 0.5 and mix.scheduled == {"rkl": 0.5}


def test_task_only_needs_no_teacher_and_dkd_as_published_ignores_no_setting() -> None:
    assert not LossMix.task_only().uses_teacher and LossMix.task_only().weight("ce") == 1.0
    dkd = LossMix(
        objective=dkd_loss,
        alpha=None,
        weights={"ce": 1.0},
        schedules={"dkd": {"kind": "warmup", "start": 0.0, "end": 1.0, "length": 20}},
    )
    assert dkd.uses_teacher and dkd.alpha is None


def test_dkd_warmup_is_the_published_ramp() -> None:
    """mdistiller: ``min(epoch / warmup, 1)`` with epochs counted from 1; Lightning counts from 0."""
    ramp = Schedule(kind="warmup", start=0.0, end=1.0, length=20)
    assert [ramp.value(e - 1, 0) for e in range(1, 25)] == pytest.approx([min(e / 20, 1.0) for e in range(1, 25)])


def test_terms_are_weighted_and_named() -> None:
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.randint(0, 10, (4,), generator=g)
    mix = LossMix(temperature=2.0, alpha=0.25, extra_terms={"rkl": RKL})
    batch = {"inputs": s, "labels": y}
    terms = mix.weighted(
        {
            "ce": torch.nn.functional.cross_entropy(s, y),
            "kd": mix.evaluate("kd", s, t, batch),
            **mix.extra_losses(s, t, batch),
        }
    )
    torch.testing.assert_close(terms["ce"], 0.75 * torch.nn.functional.cross_entropy(s, y))
    torch.testing.assert_close(terms["kd"], 0.25 * kd_loss(s, t, 2.0))
    torch.testing.assert_close(terms["rkl"], 0.5 * reverse_kl_loss(s, t, 2.0))


def test_the_warmup_cosine_learning_rate_is_stepped_per_step_over_the_whole_stage(tmp_path) -> None:
    from functools import partial

    import lightning as L

    from kd_lightning import DistillationModule
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.loss.schedules import WarmupCosineLR
    from kd_lightning.models import DigitsCNN

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = WarmupCosineLR(optimizer, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warm-up
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)

    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = DistillationModule(
        DigitsCNN(width=8, hidden=16),
        None,
        num_classes=10,
        alpha=0.0,
        optimizer=partial(torch.optim.SGD, lr=1.0),
        scheduler=partial(WarmupCosineLR, warmup_steps=2, min_lr_ratio=0.0),
    )
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    assert module.lr_schedulers().total_steps == 10  # set from the trainer: 2 epochs x 5 steps
    assert seen[:2] == pytest.approx([0.5, 1.0]) and seen[-1] == pytest.approx((1 + math.cos(math.pi * 7 / 8)) / 2)
