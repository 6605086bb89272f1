"""Every config group option and every recipe composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import settings_of
from hydra.utils import instantiate

from kd_lightning import KDError
from kd_lightning.models.cifar import MODELS
from kd_lightning.run.config import MODEL_ROLES, config_dir, model_configs

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


RECIPES = options("recipe")
MODELS_OF_THE_GROUP = sorted(model_configs())


def test_recipes_are_listed() -> None:
    assert "digits_quick" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(make_cfg, recipe: str) -> None:
    cfg = make_cfg(f"+recipe={recipe}")
    assert cfg.distill.temperature > 0
    instantiate(cfg.optim.optimizer)
    instantiate(cfg.trainer, logger=False)


def test_recipe_file_opens_with_its_command() -> None:
    for recipe in RECIPES:
        text = (CONF / "recipe" / f"{recipe}.yaml").read_text()
        assert text.startswith("# @package _global_"), recipe
        assert f"+recipe={recipe}" in text.splitlines()[1], f"{recipe}: second line must be the command that runs it"


@pytest.mark.parametrize("name", MODELS_OF_THE_GROUP)
def test_every_model_serves_as_teacher_and_student(make_cfg, name: str, tmp_path: Path) -> None:
    model_file = CONF / "model" / f"{name}.yaml"
    if name == "from_teacher":  # a student made of a teacher's layers: tests/test_pretrained.py
        with pytest.raises(KDError, match="teacher=from_teacher names a student made from the teacher"):
            settings_of(make_cfg("teacher=from_teacher", "student=from_teacher"))
        return
    language_model = model_file.is_file() and "data.vocab_size" in model_file.read_text()
    pretrained = model_file.is_file() and "pretrained_causal_lm" in model_file.read_text()
    if pretrained or (language_model and "hf_causal_lm" in model_file.read_text()):
        pytest.importorskip("transformers", reason="transformers models need the 'lm' extra")
    data = ["data=shakespeare", "data.data_dir=unused"] if language_model else []  # sized by the tokenizer's vocabulary
    cfg = make_cfg(f"teacher={name}", f"student={name}", *data)
    assert cfg.teacher.model == cfg.student.model  # one model group for both roles
    if pretrained:  # read from a folder: one the test writes
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        ).save_pretrained(tmp_path / "model")
    model = instantiate(cfg.teacher.model, **({"path": str(tmp_path / "model")} if pretrained else {}))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_model_group_is_the_model_files_and_the_cifar_zoo() -> None:
    assert set(MODELS_OF_THE_GROUP) == set(MODELS) | set(options("model"))
    assert {"digits_cnn", "digits_small_cnn", "resnet56", "wrn_40_2", "vgg13"} <= set(MODELS_OF_THE_GROUP)
    assert all(not (CONF / role).exists() for role in MODEL_ROLES)  # no per-role copies of the model files


@pytest.mark.parametrize("group", ["data", "optim", "trainer", "callbacks", "logger", "distill"])
def test_every_option_of_a_group_composes(make_cfg, group: str) -> None:
    for name in options(group):
        cfg = make_cfg(f"{group}={name}")
        assert cfg is not None


def test_default_config_instantiates_everything(make_cfg) -> None:
    cfg = make_cfg()
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    assert {len(datamodule.splits[s]) for s in ("train", "val", "test")} == {1077, 360}
    instantiate(cfg.optim.scheduler)(
        instantiate(cfg.optim.optimizer)(params=instantiate(cfg.student.model).parameters())
    )
    for conf in cfg.callbacks.values():
        instantiate(conf)
    instantiate(cfg.logger)


@pytest.mark.parametrize("name", options("distill/loss"))
def test_every_objective_config_builds_a_callable_objective(make_cfg, name: str) -> None:
    import torch

    cfg = make_cfg(f"distill/loss={name}")
    objective = instantiate(cfg.distill.loss)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    value = objective(s, t, temperature=cfg.distill.temperature, labels=torch.randint(0, 10, (4,)))
    assert value.dim() == 0 and torch.isfinite(value)
    assert value > 0 or name == "sampled_kl"  # a one-sample estimate of a KL may be below 0
    assert options("distill/loss") == ["dkd", "jsd", "kd", "reverse_kl", "sampled_kl", "skew_kl", "tvd"]
