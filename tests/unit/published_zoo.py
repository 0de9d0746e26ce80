"""An independent reference for the CIFAR zoo: the architectures of RepDistiller's ``models/*.py``
(HobbitLong/RepDistiller, read at commit eedab9d) transcribed with *their* module names, so that a state_dict of one of
these is laid out exactly as their training scripts save it (``{"model": model.state_dict(), ...}``).

mdistiller's ``mdistiller/models/cifar/*.py`` (megvii-research/mdistiller, e8c5bb3) are the same networks with the
same attribute names (only ``forward`` returns ``(logits, feats_dict)`` there), so one transcription serves both.

Each ``forward`` returns ``(logits, feats, preact)`` as their ``forward(x, is_feat=True, preact=...)`` does:
``feats`` is their ``[f0, f1, ..., pooled]``, ``preact`` the same list with the stages before their last ReLU. Written
for the tests only (not traceable, no options); the constructors follow theirs line by line in the parts that make
parameters, so that their parameter counts and names are what these give.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


# --- models/resnet.py ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):  # their resnet.BasicBlock
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        pre = out + residual
        return F.relu(pre), pre


def run_stage(stage, x):
    """A stage's output and its last block's pre-activation (their ``is_last`` blocks return both)."""
    pre = None
    for block in stage:
        x, pre = block(x)
    return x, pre


class ResNet(nn.Module):
    def __init__(self, depth, num_filters, num_classes=100):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [ResBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ResBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        f4 = self.avgpool(f3).view(x.size(0), -1)
        return self.fc(f4), [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


# --- models/wrn.py ------------------------------------------------------------------------------------------------


class WideBlock(nn.Module):  # their wrn.BasicBlock
    def __init__(self, in_planes, out_planes, stride, dropRate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.equalInOut else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            )
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = F.avg_pool2d(self.relu(self.bn1(f3)), 8).view(-1, self.nChannels)
        pre = [f0, self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3), f4]
        return self.fc(f4), [f0, f1, f2, f3, f4], pre


# --- models/vgg.py ------------------------------------------------------------------------------------------------

VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_vgg_layers(cfg, in_channels):
    layers = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):  # with batch_norm=True
    def __init__(self, depth, num_classes=100):
        super().__init__()
        cfg = VGG_CFG[depth]
        self.block0 = make_vgg_layers(cfg[0], 3)
        self.block1 = make_vgg_layers(cfg[1], cfg[0][-1])
        self.block2 = make_vgg_layers(cfg[2], cfg[1][-1])
        self.block3 = make_vgg_layers(cfg[3], cfg[2][-1])
        self.block4 = make_vgg_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        p1 = self.block1(self.pool0(f0))
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if h == 64 else f3)
        f4 = F.relu(p4)
        f5 = self.pool4(f4).view(x.size(0), -1)
        return self.classifier(f5), [f0, f1, f2, f3, f4, f5], [f0, p1, p2, p3, p4, f5]


# --- models/mobilenetv2.py ----------------------------------------------------------------------------------------


def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        hid = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):  # mobile_half: mobilenetv2_T_w(6, 0.5, num_classes)
    def __init__(self, T=6, feature_dim=100, input_size=32, width_mult=0.5):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2]]
        setting.append([T, 320, 1, 1])
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(input_size // (32 // 2), ceil_mode=True)

    def forward(self, x):
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        f5 = self.avgpool(self.conv2(f4)).view(x.size(0), -1)
        feats = [f0, f1, f2, f3, f4, f5]
        return self.classifier(f5), feats, feats  # their preact list is the same (blocks end without ReLU)


# --- models/ShuffleNetv1.py, models/ShuffleNetv2.py ---------------------------------------------------------------


class ShuffleBlock(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        N, C, H, W = x.size()
        g = self.groups
        return x.view(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)


class ShuffleV1Bottleneck(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(pre), pre


class ShuffleV1(nn.Module):
    def __init__(self, num_classes=100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        f4 = F.avg_pool2d(f3, 4).view(x.size(0), -1)
        return self.linear(f4), [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


class SplitBlock(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class ShuffleV2Basic(nn.Module):
    def __init__(self, in_channels, split_ratio=0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x):
        x1, x2 = self.split(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        pre = self.bn3(self.conv3(out))
        out = torch.cat([x1, F.relu(pre)], 1)
        return self.shuffle(out), torch.cat([x1, pre], 1)


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x):
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1)), None


class ShuffleV2(nn.Module):  # net_size=1
    def __init__(self, num_classes=100, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels, num_blocks):
        layers = [ShuffleV2Down(self.in_channels, out_channels)]
        for _ in range(num_blocks):
            layers.append(ShuffleV2Basic(out_channels))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        f4 = F.avg_pool2d(F.relu(self.bn2(self.conv2(f3))), 4).view(x.size(0), -1)
        return self.linear(f4), [f0, f1, f2, f3, f4], [f0, p1, p2, p3, f4]


# --- models/resnetv2.py -------------------------------------------------------------------------------------------


class V2Basic(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        return F.relu(pre), pre


class V2Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, 4 * planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(4 * planes)
            )

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre


class ResNetV2(nn.Module):
    def __init__(self, block, num_blocks, num_classes=100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        f4, p4 = run_stage(self.layer4, f3)
        f5 = self.avgpool(f4).view(x.size(0), -1)
        return self.linear(f5), [f0, f1, f2, f3, f4, f5], [f0, p1, p2, p3, p4, f5]


def _resnet(depth, wide=False):
    return lambda: ResNet(depth, [32, 64, 128, 256] if wide else [16, 16, 32, 64])


# kdrun's catalogue name -> (their name in RepDistiller's / mdistiller's model_dict, a builder with 100 classes)
PUBLISHED = {
    **{f"resnet{d}": (f"resnet{d}", _resnet(d)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ("resnet8x4", _resnet(8, wide=True)),
    "resnet32x4": ("resnet32x4", _resnet(32, wide=True)),
    **{f"wrn_{d}_{w}": (f"wrn_{d}_{w}", lambda d=d, w=w: WideResNet(d, w)) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}_cifar": (f"vgg{d}", lambda d=d: VGG(d)) for d in VGG_CFG},
    "mobilenet_v2_half": ("mobile_half / MobileNetV2", MobileNetV2),
    "shufflenet_v1": ("ShuffleV1", ShuffleV1),
    "shufflenet_v2_cifar": ("ShuffleV2", ShuffleV2),
    "resnet18_cifar": ("ResNet18", lambda: ResNetV2(V2Basic, [2, 2, 2, 2])),
    "resnet50_cifar": ("ResNet50", lambda: ResNetV2(V2Bottleneck, [3, 4, 6, 3])),
}
