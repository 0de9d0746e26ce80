"""The CIFAR VGGs of RepDistiller's ``models/vgg.py`` (mdistiller's ``models/cifar/vgg.py``), with BatchNorm: five
blocks of 3x3 conv + BN + ReLU (the last ReLU of a block applied outside it), max-pools between the first four (the
fourth only for 64 px images), global average pooling and one linear layer (no fully connected stack).

Parameter names are theirs (``blockN.i``, ``classifier``), so their files load without renaming. Named
``vgg<depth>_cifar``: torchvision's ``vgg11`` .. ``vgg19`` are the ImageNet networks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.models.features import Taps
from kdrun.models.registry import MODELS

CONFIGS = {  # the conv widths of each of the five blocks
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv (with bias) + BN + ReLU per width, without the last ReLU: the block's output is pre-activation."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


def normal_init(model: nn.Module) -> None:
    """RepDistiller's init of its VGG and MobileNetV2: convs N(0, 2 / (k * k * out)), linear N(0, 0.01), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class CifarVGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        cfg = CONFIGS[depth]
        self.block0 = vgg_block(cfg[0], in_channels)
        self.block1 = vgg_block(cfg[1], cfg[0][-1])
        self.block2 = vgg_block(cfg[2], cfg[1][-1])
        self.block3 = vgg_block(cfg[3], cfg[2][-1])
        self.block4 = vgg_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2) if image_size == 64 else nn.Identity()  # as theirs: pooled for 64 px only
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        normal_init(self)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """Blocks 1-4 after their ReLU (RepDistiller's ``feats[1:5]``), before it (``preact``), and ``flatten``."""
        return Taps(["relu_1", "relu_2", "relu_3", "relu_4"], "flatten", ["block1", "block2", "block3", "block4"])

    def forward(self, x):
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))  # F.relu nodes relu, relu_1, ...: the stage taps
        x = self.pool2(F.relu(self.block2(x)))
        x = self.pool3(F.relu(self.block3(x)))
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(torch.flatten(x, 1))


def _register(depth: int) -> None:
    @MODELS.register(f"vgg{depth}_cifar")
    def build(num_classes: int, in_channels: int, image_size: int) -> CifarVGG:
        return CifarVGG(depth, num_classes, in_channels, image_size)


for _depth in CONFIGS:
    _register(_depth)
