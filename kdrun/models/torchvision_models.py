"""torchvision classification models, adapted to the dataset's channels, image size and classes."""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError

STEMS = ("auto", "small", "imagenet")
SMALL_IMAGE_MAX = 16  # stem=auto uses the small stem at or below this side length


@functools.cache
def torchvision_names() -> frozenset[str]:
    import torchvision  # here, not at the top: see ``kdrun.models.features.feature_extraction``

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: Literal["auto", "small", "imagenet"] = "auto",
    weights: str | None = None,
) -> nn.Module:
    """``torchvision.models.get_model(name)`` with its first conv and classifier fitted to the data.

    ``stem``: ``small`` swaps the first conv for a 3x3 stride-1 one and drops the max-pool right after it
    (as CIFAR variants do), ``imagenet`` keeps torchvision's stem and only changes its input channels,
    ``auto`` picks ``small`` for images of at most 16 px.
    """
    import torchvision

    small = stem == "small" or (stem == "auto" and image_size <= SMALL_IMAGE_MAX)
    if weights:
        try:
            model = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash a RuntimeError
            raise KdrunError(
                f"cannot load torchvision weights {weights!r} for {name} ({e}); with no network, put the file in "
                f"{torch.hub.get_dir()}/checkpoints or use teacher.checkpoint=<path>"
            ) from e
        except (ValueError, KeyError) as e:
            raise KdrunError(f"weights={weights!r} is not a weights name of {name}: {e}") from e
        _replace_last_linear(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _adapt_stem(model, in_channels, small)
    return model


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _adapt_stem(model: nn.Module, in_channels: int, small: bool) -> None:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise KdrunError(f"{type(model).__name__} has no Conv2d stem to adapt")
    name, conv = convs[0]
    if small:
        new = nn.Conv2d(in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
        # The max-pool of the stem is the first one met before the second conv.
        second = convs[1][0] if len(convs) > 1 else None
        for n, m in model.named_modules():
            if n == second:
                break
            if isinstance(m, nn.MaxPool2d):
                _set_module(model, n, nn.Identity())
                break
    elif conv.in_channels != in_channels:
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]  # a Conv2d's own sizes are pairs
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            bias=conv.bias is not None,
        )
        with torch.no_grad():  # keep pretrained filters: average them over the old input channels
            new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    else:
        return
    _set_module(model, name, new)


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdrunError(f"{type(model).__name__} has no Linear classifier to resize to {num_classes} classes")
    name, fc = linears[-1]
    if fc.out_features != num_classes:
        _set_module(model, name, nn.Linear(fc.in_features, num_classes))
