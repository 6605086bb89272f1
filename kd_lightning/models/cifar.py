"""The CIFAR model zoo of the KD literature, drop-in compatible with RepDistiller / mdistiller.

Parameter names, shapes and the computed function match the definitions those projects use
for their shared teacher checkpoints (``{'model': state_dict}`` files), so a checkpoint
made there loads here with ``strict=True`` and gives the same logits. Inputs are
``(N, 3, 32, 32)`` normalised images; outputs ``(N, num_classes)`` logits.

ResNets (He et al. 2016, CIFAR variant): ``resnet{8,14,20,32,44,56,110}``, and the 4x wider
``resnet8x4``, ``resnet32x4``. Wide ResNets (Zagoruyko & Komodakis 2016): ``wrn_{depth}_{width}``.
VGG with BatchNorm (Simonyan & Zisserman 2015, CIFAR variant): ``vgg{8,11,13,16,19}``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODELS", "ResNet", "WideResNet", "VGG", "build_cifar_model"]


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm, as in the reference definitions."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- ResNet -------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-bn-relu-conv-bn, + shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet: a 3x3 stem, three stages of ``(depth − 2) / 6`` basic blocks, global pooling.

    Args:
        depth: 6n + 2 (8, 14, 20, ...).
        num_filters: channels of the stem and the three stages, e.g. ``[16, 16, 32, 64]``.
    """

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 (8, 14, 20, ...), got {depth}.")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        in_planes = num_filters[0]
        stages = []
        for index, (planes, stride) in enumerate(zip(num_filters[1:], (1, 2, 2))):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(num_filters[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(x, x.shape[-1])  # 8x8 for 32x32 inputs
        return self.fc(torch.flatten(x, 1))


# --- Wide ResNet --------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv, with a 1x1 shortcut when shapes change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        # the reference shortcut takes the raw input when shapes match, the activated one when not
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    """``blocks`` wide blocks; named ``layer`` inside to match the reference keys."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width: depth = 6n + 4, stage widths ``16·k, 32·k, 64·k``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}.")
        blocks = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, padding=1, bias=False)
        self.block1 = WideStage(blocks, channels[0], channels[1], 1)
        self.block2 = WideStage(blocks, channels[1], channels[2], 2)
        self.block3 = WideStage(blocks, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        x = F.avg_pool2d(x, x.shape[-1])
        return self.fc(torch.flatten(x, 1))


# --- VGG ----------------------------------------------------------------------------------

VGG_STAGES = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _vgg_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-bn-relu repeated, without the final relu (applied in forward, as in the reference)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: five conv blocks, max-pooling after the first three, global pooling."""

    def __init__(self, depth: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth not in VGG_STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_STAGES)}, got {depth}.")
        stages = VGG_STAGES[depth]
        self.num_classes = num_classes
        in_channels = [3] + [s[-1] for s in stages[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _vgg_block(s, c) for s, c in zip(stages, in_channels)
        )
        self.classifier = nn.Linear(512, num_classes)
        _init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))  # no pooling here for 32x32 inputs (the reference pools only at 64x64)
        if x.shape[-1] == 8:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


# --- registry -----------------------------------------------------------------------------

MODELS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": (lambda n, d=d: ResNet(d, [16, 16, 32, 64], n)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda n: ResNet(8, [32, 64, 128, 256], n),
    "resnet32x4": lambda n: ResNet(32, [32, 64, 128, 256], n),
    **{f"wrn_{d}_{w}": (lambda n, d=d, w=w: WideResNet(d, w, n)) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": (lambda n, d=d: VGG(d, n)) for d in VGG_STAGES},
}


def build_cifar_model(name: str, num_classes: int = 100) -> nn.Module:
    """A zoo model by name (``resnet56``, ``wrn_40_2``, ``vgg13``, ...)."""
    if name not in MODELS:
        from kd_lightning.errors import KDError

        raise KDError(f"unknown CIFAR model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name](num_classes)
