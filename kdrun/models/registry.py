"""The model registry and ``build_model(cfg, spec)``: a leaf module that the model families register into.

A model is a registered builder ``fn(num_classes, in_channels, image_size, **options)``; the YAML in
``conf/model/`` names it and sets its options. A config with ``_target_`` builds the model with any importable
class or function instead (a factory such as timm's ``create_model``), and ``name`` may be any torchvision
classification model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from hydra.utils import get_object, instantiate

from kdrun.core.errors import KdrunError
from kdrun.core.registry import Registry, to_dict
from kdrun.core.schema import check, parameter_hints
from kdrun.data import DataSpec
from kdrun.models.torchvision_models import STEMS, build_torchvision, torchvision_names

MODELS = Registry("model")

# Keys of a teacher/student node that describe where weights come from, not the architecture.
ROLE_KEYS = ("checkpoint", "checkpoint_format")


def architecture_cfg(cfg: Any) -> dict[str, Any]:
    """The part of a teacher/student config that determines the architecture (what a checkpoint records)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ROLE_KEYS}


def model_name(cfg: Any) -> str:
    arch = architecture_cfg(cfg)
    return str(arch.get("_target_") or arch.get("name"))


def build_model(cfg: Any, spec: DataSpec, key: str = "model") -> nn.Module:
    """Build the model that ``cfg`` (a teacher/student node) describes, sized for ``spec``."""
    arch = architecture_cfg(cfg)
    sizes = {"num_classes": spec.num_classes, "in_channels": spec.in_channels, "image_size": spec.image_size}
    if "_target_" in arch:
        arch.pop("name", None)
        return _build_target(arch, sizes, key)
    check_model_cfg(arch, key)
    name = str(arch.pop("name"))
    if name in MODELS:
        return MODELS.get(name)(**sizes, **arch)
    return build_torchvision(name, **sizes, **arch)  # type: ignore[arg-type]  # options checked above


def _build_target(arch: dict[str, Any], sizes: dict[str, int], key: str) -> nn.Module:
    """The model of a ``_target_`` node: a class or a function that returns an ``nn.Module``, passed the sizes its
    signature takes (all of them with ``**kwargs``) unless the node sets them."""
    target = arch["_target_"]
    try:
        fn = get_object(str(target))
    except Exception as e:  # whatever importing the user's module raises
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise KdrunError(f"{key}._target_={target!r} cannot be imported: {reason}") from e
    if not callable(fn):
        raise KdrunError(
            f"{key}._target_={target!r} is a {type(fn).__name__}, not a class or function that builds a model"
        )
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature: pass it no sizes
        params = {}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in sizes.items() if k not in arch and (takes_all or k in params)}
    model = instantiate(arch, **extra)
    if not isinstance(model, nn.Module):
        raise KdrunError(f"{key}._target_={target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model_cfg(cfg: Any, key: str = "model") -> None:
    """Raise a one-line ``KdrunError`` if ``cfg`` names no known model or an invalid stem (``_target_`` passes)."""
    arch = architecture_cfg(cfg)
    if "_target_" in arch:
        return
    name = arch.get("name")
    if name not in MODELS and name not in torchvision_names():
        raise KdrunError(
            f"{key}.name={name!r} is not a known model; choose one of: {', '.join(MODELS.names())}, "
            "or any torchvision classification model name"
        )
    if arch.get("stem", "auto") not in STEMS:
        raise KdrunError(f"{key}.stem={arch['stem']!r} is invalid; choose one of: {', '.join(STEMS)}")
    if name == "ensemble":
        if key == "student":
            raise KdrunError("student=ensemble is not supported: an ensemble can only be the teacher")
        members = arch.get("members")
        if not isinstance(members, (list, tuple)) or len(members) < 2:
            raise KdrunError(f"teacher.members must list at least 2 teacher configs, got {members!r}")
        for i, member in enumerate(members):
            check_model_cfg(member, f"teacher.members[{i}]")
    _check_options(arch, str(name), key)


def _check_options(arch: dict[str, Any], name: str, key: str) -> None:
    """Every option of the model node is one its builder takes, with a value of the declared type."""
    builder = MODELS.get(name) if name in MODELS else build_torchvision
    hints = parameter_hints(builder)
    options = [p for p in hints if p not in ("name", "num_classes", "in_channels", "image_size")]
    for option, value in arch.items():
        if option == "name" or (option == "members" and name == "ensemble"):
            continue
        if option not in options:
            raise KdrunError(
                f"{key}.{option} is not an option of {name}; its options are: {', '.join(options) or 'none'}"
            )
        check(f"{key}.{option}", value, hints[option])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
