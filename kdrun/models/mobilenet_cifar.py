"""The CIFAR MobileNetV2 of RepDistiller's ``models/mobilenetv2.py`` (mdistiller's ``models/cifar/mobilenetv2.py``)
at the width of the KD tables: ``mobile_half`` (expansion 6, width multiplier 0.5; mdistiller's ``MobileNetV2``).

Unlike torchvision's ``mobilenet_v2``: a stride-2 stem for 32 px, a 1x1 expansion conv in every block (also those
of expansion 1), 1280 channels before the classifier at any width. Parameter names are theirs (``conv1``,
``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``), so their files load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.models.features import Taps
from kdrun.models.registry import MODELS
from kdrun.models.vgg_cifar import normal_init

SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# (expansion, channels, blocks, first stride) of the seven block groups; the expansions are RepDistiller's T = 6


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU, 3x3 depthwise (the stride) + BN + ReLU, 1x1 project + BN; residual where shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expansion: int):
        super().__init__()
        hidden = inp * expansion
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, c, n, s in SETTINGS:
            out = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(channels, out, s if i == 0 else 1, expansion))
                channels = out
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # theirs: AvgPool2d(2, ceil_mode=True) on the 2x2 map of 32 px
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        normal_init(self)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """Block groups 1, 2, 4 and 6 (RepDistiller's ``feats[1:5]``; they end without ReLU, so ``preact`` is the
        same), and ``flatten``."""
        stages = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        return Taps(stages, "flatten", list(stages))

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(torch.flatten(self.avgpool(self.conv2(x)), 1))


@MODELS.register("mobilenet_v2_half")
def mobilenet_v2_half(num_classes: int, in_channels: int, image_size: int) -> CifarMobileNetV2:
    """RepDistiller's ``mobile_half`` (= mdistiller's ``MobileNetV2``): expansion 6, width multiplier 0.5."""
    return CifarMobileNetV2(num_classes, in_channels, 0.5)
