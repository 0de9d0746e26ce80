"""Wide ResNets (Zagoruyko & Komodakis 2016), pre-activation, CIFAR-style.

The same architecture as RepDistiller's ``models/wrn.py`` (and mdistiller's ``models/cifar/wrn.py``), whose files
nest each stage's blocks in ``blockN.layer``, call the projection ``convShortcut`` and the last BatchNorm ``bn1``:
``FOREIGN_NAMES`` maps their parameter names onto these.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.core.schema import Dropout
from kdrun.models.cifar_resnet import kaiming_init, make_stages
from kdrun.models.features import Taps
from kdrun.models.registry import MODELS


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    FOREIGN_NAMES = (  # RepDistiller / mdistiller names -> these (regex, replacement), applied in order
        (r"^(block\d)\.layer\.", r"\1."),
        (r"\.convShortcut\.", ".shortcut."),
        (r"^bn1\.", "bn."),
    )

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, depth
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = make_stages(
            lambda i, o, stride: WideBlock(i, o, stride, dropout), widths[0], widths[1:], blocks
        )
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()  # not in place: ``bn`` before it is the last stage's pre-activation tap
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """``block1``, ``block2`` and the activated last stage ``relu`` (what the graph gives, kept for existing runs;
        RepDistiller's ``feats[3]`` is ``block3``), ``flatten``; ``preact`` as RepDistiller's: the BatchNorm that
        follows each stage (``block2.0.bn1``, ``block3.0.bn1``, ``bn``)."""
        return Taps(["block1", "block2", "relu"], "flatten", ["block2.0.bn1", "block3.0.bn1", "bn"])

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn(x))).flatten(1))


def _register(name: str, depth: int, widen: int) -> None:
    @MODELS.register(name)
    def build(num_classes: int, in_channels: int, image_size: int, dropout: Dropout = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, dropout)


for _depth in (16, 40):
    for _widen in (1, 2):
        _register(f"wrn_{_depth}_{_widen}", _depth, _widen)
