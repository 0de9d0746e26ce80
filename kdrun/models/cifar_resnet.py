"""CIFAR-style ResNets of the KD literature (He et al. 2016; widths as in RepDistiller/mdistiller).

The same architecture as RepDistiller's ``models/resnet.py`` (and mdistiller's ``models/cifar/resnet.py``), whose
files name the projection shortcut ``downsample``: ``FOREIGN_NAMES`` maps their parameter names onto these.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.models.features import Taps
from kdrun.models.registry import MODELS


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # not in place: the sum before it is the block's pre-activation tap (``add``)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) init of every conv, as the CIFAR ResNet and WRN papers do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def make_stages(block, in_planes: int, widths, blocks) -> tuple[list[nn.Sequential], int]:
    """Stages of ``blocks`` blocks each (one count for all, or one per stage), one stage per width; every stage after
    the first halves the resolution. A block class with an ``expansion`` outputs ``expansion * width`` channels."""
    counts = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
    expansion = getattr(block, "expansion", 1)
    stages = []
    for i, (planes, count) in enumerate(zip(widths, counts, strict=True)):
        layers = []
        for j in range(count):
            layers.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
            in_planes = planes * expansion
        stages.append(nn.Sequential(*layers))
    return stages, in_planes


def stage_taps(stages: list[str], counts: list[int], embedding: str = "flatten", node: str = "add") -> Taps:
    """The taps of a net of residual stages: each stage's output, and (``preact``) its last block's ``node`` (the
    residual sum before the block's last ReLU)."""
    return Taps(list(stages), embedding, [f"{s}.{n - 1}.{node}" for s, n in zip(stages, counts, strict=True)])


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks (strides 1, 2, 2), global pool, linear."""

    FOREIGN_NAMES = ((r"\.downsample\.", ".shortcut."),)  # RepDistiller / mdistiller names -> these (regex, repl)

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, depth
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = make_stages(BasicBlock, widths[0], widths[1:], blocks)
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """``layer1..3`` (RepDistiller's ``feats[1:4]``), their pre-ReLU sums (``preact``) and ``flatten``."""
        return stage_taps(["layer1", "layer2", "layer3"], [len(self.layer1)] * 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _register(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    @MODELS.register(name)
    def build(num_classes: int, in_channels: int, image_size: int) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))
