"""The four-stage CIFAR ResNets of RepDistiller's ``models/resnetv2.py`` (mdistiller's ``models/cifar/resnetv2.py``):
torchvision's ResNet-18/50 widths (64..512) with a 3x3 stride-1 stem and no max-pool, for 32 px images.

Parameter names are theirs (``layerN.i.shortcut``, ``linear``), so their files load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.models.cifar_resnet import BasicBlock, kaiming_init, make_stages, stage_taps
from kdrun.models.features import Taps
from kdrun.models.registry import MODELS


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (the stride), 1x1 expand to ``4 * planes``; projection shortcut where the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()  # not in place: the sum before the last one is the pre-activation tap (``add``)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class CifarResNetV2(nn.Module):
    """3x3 stem (64), four stages (strides 1, 2, 2, 2; widths 64..512 times the block's expansion), pool, linear."""

    def __init__(self, block, counts: tuple[int, int, int, int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = make_stages(block, 64, (64, 128, 256, 512), counts)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """``layer1..4`` (RepDistiller's ``feats[1:5]``), their pre-ReLU sums (``preact``) and ``flatten``."""
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        return stage_taps(["layer1", "layer2", "layer3", "layer4"], [len(s) for s in stages])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_channels: int, image_size: int) -> CifarResNetV2:
    """RepDistiller's / mdistiller's ``ResNet18``: basic blocks, 2 per stage."""
    return CifarResNetV2(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("resnet50_cifar")
def resnet50_cifar(num_classes: int, in_channels: int, image_size: int) -> CifarResNetV2:
    """RepDistiller's / mdistiller's ``ResNet50``: bottleneck blocks, 3, 4, 6, 3 per stage."""
    return CifarResNetV2(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
