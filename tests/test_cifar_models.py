"""The CIFAR zoo is drop-in compatible with RepDistiller / mdistiller checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from kd_lightning import KDError
from kd_lightning.checkpoints import load_weights, save_weights
from kd_lightning.models.cifar import MODELS, build_cifar_model

REFERENCE = SHARED / "reference" / "repdistiller_cifar"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference checkpoints not found at {REFERENCE}")
CHECKPOINTS = ["resnet8", "resnet20", "resnet56", "resnet8x4", "wrn_16_2", "wrn_40_1"]


@needs_reference
@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_and_shapes_match_the_reference_zoo(name: str) -> None:
    reference = json.loads((REFERENCE / "state_dict_keys.json").read_text())[name]
    model = build_cifar_model(name, num_classes=100)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


@needs_reference
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reference_checkpoint_loads_strictly_and_reproduces_logits(name: str) -> None:
    model = load_weights(build_cifar_model(name, 100), REFERENCE / f"{name}.pth").eval()
    io = torch.load(REFERENCE / f"{name}.io.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits = model(io["input"])
    assert (logits - io["logits"]).abs().max().item() < 1e-5


@needs_reference
def test_checkpoint_of_another_architecture_names_keys_and_model() -> None:
    with pytest.raises(KDError, match=r"does not fit the model ResNet.*(missing|unexpected|wrong shapes)"):
        load_weights(build_cifar_model("resnet20", 100), REFERENCE / "resnet56.pth")
    with pytest.raises(KDError, match=r"wrong shapes: fc\.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
        load_weights(build_cifar_model("resnet20", 10), REFERENCE / "resnet20.pth")


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "resnet8x4"])
@pytest.mark.parametrize("num_classes", [10, 100, 7])
def test_any_number_of_classes(name: str, num_classes: int) -> None:
    model = build_cifar_model(name, num_classes).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, num_classes)


def test_unknown_model_name_lists_the_zoo() -> None:
    with pytest.raises(KDError, match="unknown CIFAR model 'resnet57'.*resnet56"):
        build_cifar_model("resnet57")


def test_plain_and_lightning_checkpoints_are_accepted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_cifar_model("resnet8", 10)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save(
        {"state_dict": {f"student.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
        tmp_path / "lightning.ckpt",
    )
    save_weights(source, tmp_path / "repdistiller.pth", epoch=240)
    for file in ("plain.pt", "lightning.ckpt", "repdistiller.pth"):
        target = load_weights(build_cifar_model("resnet8", 10), tmp_path / file)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (file, key)
