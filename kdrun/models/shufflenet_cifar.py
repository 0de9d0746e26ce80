"""The CIFAR ShuffleNets of RepDistiller's ``models/ShuffleNetv1.py`` and ``models/ShuffleNetv2.py`` (mdistiller's
``models/cifar/``): a 1x1 stem of 24 channels at full resolution, three stages that each halve it, global average
pooling and a linear layer named ``linear``.

- ``shufflenet_v1``: ``ShuffleV1``, 3 groups, stages of 240 / 480 / 960 channels (4, 8, 4 blocks);
- ``shufflenet_v2_cifar``: ``ShuffleV2`` (net size 1), stages of 116 / 232 / 464 channels (each a down-sampling block
  and 3, 7, 3 basic blocks), a 1x1 conv to 1024 before pooling. torchvision's ``shufflenet_v2_x1_0`` is the ImageNet
  network (3x3 stride-2 stem and a max-pool).

Parameter names are theirs, so their files load without renaming. The channel shuffle and the split are written
with fixed sizes, so that ``torch.fx`` traces the nets for the feature taps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.models.cifar_resnet import stage_taps
from kdrun.models.features import Taps
from kdrun.models.registry import MODELS


class ChannelShuffle(nn.Module):
    """[N, g * c, H, W] -> [N, c * g, H, W]: channel ``i * c + j`` moves to ``j * g + i`` (Zhang et al. 2018)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)


class BottleneckV1(nn.Module):
    """Grouped 1x1 + BN + ReLU, shuffle, 3x3 depthwise (the stride) + BN, grouped 1x1 + BN; added to the input, or
    concatenated with its 3x3 average pool where the block down-samples; then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res  # the pre-activation tap
        return F.relu(preact)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths=(240, 480, 960), counts=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes, stages = 24, []
        for width, count in zip(widths, counts, strict=True):
            blocks = []
            for i in range(count):  # the first block down-samples and concatenates its input: it adds the rest
                blocks.append(
                    BottleneckV1(in_planes, width - in_planes if i == 0 else width, 2 if i == 0 else 1, groups)
                )
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # theirs: avg_pool2d(4) on the 4x4 map of 32 px
        self.linear = nn.Linear(widths[-1], num_classes)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """``layer1..3`` (RepDistiller's ``feats[1:4]``), the pre-ReLU sum of their last blocks, and ``flatten``."""
        return stage_taps(["layer1", "layer2", "layer3"], [len(self.layer1), len(self.layer2), len(self.layer3)])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class BasicBlockV2(nn.Module):
    """Half the channels pass; the other half: 1x1 + BN + ReLU, 3x3 depthwise + BN, 1x1 + BN + ReLU; concatenated and
    shuffled."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        c = channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        # RepDistiller's preact: the passed half and the branch before its ReLU. The passed half is already >= 0 (every
        # block ends in a ReLU or passes a ReLU's output), so one ReLU over both is theirs ReLU over the branch alone.
        preact = torch.cat([x1, self.bn3(self.conv3(out))], 1)
        return self.shuffle(F.relu(preact))


class DownBlockV2(nn.Module):
    """Two stride-2 branches (3x3 depthwise + BN, 1x1 + BN + ReLU; 1x1 + BN + ReLU, 3x3 depthwise + BN, 1x1 + BN +
    ReLU) of half the output channels each, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths=(116, 232, 464, 1024), counts=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes, stages = 24, []
        for width, count in zip(widths[:3], counts, strict=True):
            stages.append(nn.Sequential(DownBlockV2(in_planes, width), *(BasicBlockV2(width) for _ in range(count))))
            in_planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_planes, widths[-1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # theirs: avg_pool2d(4) on the 4x4 map of 32 px
        self.linear = nn.Linear(widths[-1], num_classes)

    def default_taps(self, example: torch.Tensor) -> Taps:
        """``layer1..3`` (RepDistiller's ``feats[1:4]``), their last blocks' unshuffled pre-ReLU concatenation
        (``preact``, RepDistiller's), and ``flatten`` (after the 1x1 conv to 1024 and pooling)."""
        stages = ["layer1", "layer2", "layer3"]
        return stage_taps(stages, [len(self.layer1), len(self.layer2), len(self.layer3)], node="cat")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@MODELS.register("shufflenet_v1")
def shufflenet_v1(num_classes: int, in_channels: int, image_size: int) -> ShuffleNetV1:
    """RepDistiller's / mdistiller's ``ShuffleV1``."""
    return ShuffleNetV1(num_classes, in_channels)


@MODELS.register("shufflenet_v2_cifar")
def shufflenet_v2_cifar(num_classes: int, in_channels: int, image_size: int) -> ShuffleNetV2:
    """RepDistiller's / mdistiller's ``ShuffleV2`` (net size 1)."""
    return ShuffleNetV2(num_classes, in_channels)
