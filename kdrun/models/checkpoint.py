"""Model files: written atomically, read with ``weights_only=True``, checked against the run's config."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from kdrun import __version__
from kdrun.core.errors import KdrunError
from kdrun.core.io import atomic_save, read_state
from kdrun.data import DataSpec
from kdrun.models.registry import architecture_cfg, build_model, model_name


def save_model(path: str | os.PathLike, model: nn.Module, model_cfg: Any, spec: DataSpec, **meta: Any) -> None:
    """Write ``{"state_dict", "model_cfg", "num_classes", "in_channels", ...}``: enough to rebuild the model."""
    atomic_save(
        {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_cfg": architecture_cfg(model_cfg),
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "image_size": spec.image_size,
            "kdrun_version": __version__,
            **meta,
        },
        path,
    )


def read_checkpoint(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, Any]:
    """A model checkpoint (kdrun's or a plain state_dict), read with ``read_state``."""
    obj = read_state(path, key)
    if "state_dict" not in obj:  # a plain state_dict
        obj = {"state_dict": obj}
    if not all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values()):
        raise KdrunError(f"{key}={path} has a state_dict with values that are not tensors")
    return obj


def load_model(path: str | os.PathLike, model_cfg: Any, spec: DataSpec, key: str = "teacher.checkpoint") -> nn.Module:
    """Build the configured model and load ``path`` into it; another architecture, class or channel count
    than the run's is a one-line error naming both."""
    return load_model_with_meta(path, model_cfg, spec, key)[0]


def load_model_with_meta(
    path: str | os.PathLike, model_cfg: Any, spec: DataSpec, key: str = "teacher.checkpoint"
) -> tuple[nn.Module, dict[str, Any]]:
    """``load_model``, and the file's other entries (``save_model``'s ``meta``; none for a plain state_dict)."""
    ckpt = read_checkpoint(path, key)
    want = model_name(model_cfg)
    saved_cfg = ckpt.get("model_cfg")
    if isinstance(saved_cfg, dict):
        have = str(saved_cfg.get("_target_") or saved_cfg.get("name"))
        if have != want:
            raise KdrunError(
                f"{key}={path} holds a {have} but the run's model is {want}; "
                f"choose the matching option (e.g. teacher={have}) or another checkpoint"
            )
    for field, ours in (("num_classes", spec.num_classes), ("in_channels", spec.in_channels)):
        if field in ckpt and int(ckpt[field]) != ours:
            raise KdrunError(f"{key}={path} was trained with {field}={ckpt[field]} but the dataset has {field}={ours}")
    model = build_model(model_cfg, spec)
    state = ckpt["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                f"{', ...' if len(unexpected) > 3 else ''})"
            )
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model): {'; '.join(shapes[:3])}")
        raise KdrunError(f"{key}={path} does not fit {want} for this dataset: {', '.join(parts)}")
    model.load_state_dict(state)
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}
