"""Small students: a tutorial-style CNN, LeNet-5 and an MLP."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.core.schema import Dropout, Positive, Width, Widths
from kdrun.models.registry import MODELS


def _pooled_size(image_size: int, n_pools: int, model: str) -> int:
    size = image_size // 2**n_pools
    if size < 1:
        raise KdrunError(f"{model} halves the image {n_pools} times: {image_size} px is too small")
    return size


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """3x3 conv + BatchNorm + 2x2 max-pool + ReLU blocks, then a fully connected head with one hidden layer.

    BatchNorm keeps distillation stable at SGD learning rates where the T^2-scaled KD gradient would
    otherwise blow up a plain conv stack.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        channels: Widths = (16, 32),
        hidden: Width = 128,
        dropout: Dropout = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.MaxPool2d(2),  # before the ReLU: the same function (they commute), on a quarter of the values
                nn.ReLU(inplace=True),
            ]
            c = width
        size = _pooled_size(image_size, len(channels), "small_cnn")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 with ReLU, max-pooling and padded 5x5 convolutions (so that 8 px inputs fit)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        size = _pooled_size(image_size, 2, "lenet5")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * size * size, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@MODELS.register("mlp")
class MLP(nn.Module):
    """Fully connected layers on the flattened image. ``max_norm``: each unit's incoming weight vector is projected
    back to L2 norm <= ``max_norm`` before every training forward (the max-norm constraint that Srivastava et al.
    2014 pair with dropout and a high learning rate)."""

    def __init__(  # noqa: PLR0913 - the sizes and the model's own options, each a config key
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        hidden: Widths = (256, 128),
        dropout: Dropout = 0.1,
        input_dropout: Dropout = 0.0,
        max_norm: Positive | None = None,
    ):
        super().__init__()
        self.max_norm = max_norm
        layers: list[nn.Module] = [nn.Flatten()] + ([nn.Dropout(input_dropout)] if input_dropout else [])
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        if self.max_norm is not None and self.training:
            with torch.no_grad():  # a projection after each optimiser step, not part of the loss
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        layer.weight.renorm_(2, 0, self.max_norm)
        return self.net(x)
