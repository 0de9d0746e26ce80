"""Model files: safetensors written atomically, their metadata in the header; checked against the run's config.

A model file is ``<stage>.safetensors``: the state_dict's tensors, and under the header's ``kdrun`` metadata key one
JSON object with the rest (model config, class and channel counts, image size, kdrun version, best epoch, training
history...). Reading one never unpickles. Files of earlier kdrun versions (``<stage>.pt``, ``torch.save``) and plain
state_dicts (``.pt`` or safetensors) still load; a ``torch.save`` file is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdrun import __version__
from kdrun.core.errors import KdrunError
from kdrun.core.io import is_safetensors, read_state, read_tensors, save_tensors
from kdrun.data import DataSpec
from kdrun.models.registry import architecture_cfg, build_model, model_name

MODEL_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"  # the torch.save model files of earlier kdrun versions
META_KEY = "kdrun"  # one metadata entry: safetensors orders several at random, and the file's bytes would vary


def model_file(folder: str | os.PathLike, stage: str) -> Path:
    """Where a run writes the model of ``stage``: ``<folder>/<stage>.safetensors``."""
    return Path(folder) / f"{stage}{MODEL_SUFFIX}"


def find_model_file(folder: str | os.PathLike, stage: str) -> Path:
    """The model file of ``stage`` to read in a run dir: ``<stage>.safetensors``, or the ``<stage>.pt`` of an
    earlier kdrun when only that one is there (``model_file`` when neither is)."""
    path = model_file(folder, stage)
    legacy = path.with_suffix(LEGACY_SUFFIX)
    return legacy if not path.is_file() and legacy.is_file() else path


def weights_size(path: str | os.PathLike) -> int:
    """The bytes of a model file's weights: its tensor data, without the header (whose metadata, e.g. the history's
    timings, varies in length from run to run); the whole file for a ``torch.save`` file."""
    size = os.path.getsize(path)
    if not is_safetensors(path):
        return size
    with open(path, "rb") as f:
        return size - 8 - int.from_bytes(f.read(8), "little")


def save_model(path: str | os.PathLike, model: nn.Module, model_cfg: Any, spec: DataSpec, **meta: Any) -> None:
    """Write ``{"state_dict", "model_cfg", "num_classes", "in_channels", ...}``: enough to rebuild the model.
    ``meta`` holds JSON values (numbers, strings, lists, dicts)."""
    write_checkpoint(
        path,
        {
            "state_dict": model.state_dict(),
            "model_cfg": architecture_cfg(model_cfg),
            "num_classes": spec.num_classes,
            "in_channels": spec.in_channels,
            "image_size": spec.image_size,
            "kdrun_version": __version__,
            **meta,
        },
    )


def write_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """``ckpt`` (a ``state_dict`` and JSON metadata, as ``read_checkpoint`` returns it) as a safetensors file."""
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    save_tensors(ckpt["state_dict"], path, {META_KEY: json.dumps(meta)})


def read_checkpoint(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, Any]:
    """A model checkpoint: kdrun's (safetensors, or ``torch.save`` of earlier versions) or a plain state_dict."""
    file = Path(path).expanduser()
    if file.suffix == MODEL_SUFFIX or (file.is_file() and is_safetensors(file)):  # else torch.save, or invalid
        tensors, header = read_tensors(path, key)
        try:
            meta = json.loads(header[META_KEY]) if META_KEY in header else {}
        except ValueError as e:
            raise KdrunError(f"{key}={path} has a kdrun header that is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise KdrunError(f"{key}={path} has a kdrun header that is not a JSON object")
        return {**meta, "state_dict": tensors}
    obj = read_state(path, key)  # no such file, a torch.save file, or neither: read_state says which
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
