"""Model files: safetensors written atomically, their metadata in the header; checked against the run's config.

A model file is ``<stage>.safetensors``: the state_dict's tensors, and under the header's ``kdrun`` metadata key one
JSON object with the rest (model config, class and channel counts, image size, kdrun version, best epoch, training
history...). Reading one never unpickles. Files of earlier kdrun versions (``<stage>.pt``, ``torch.save``) and plain
state_dicts (``.pt`` or safetensors) still load; a ``torch.save`` file is read with ``weights_only=True``.

A teacher file (``teacher.checkpoint``) is read in one of these formats (``teacher.checkpoint_format``):

- ``kdrun``: kdrun's own model file (``save_model``) or a plain ``state_dict`` in kdrun's parameter names;
- ``repdistiller``: a file of RepDistiller's ``train_teacher.py`` / ``train_student.py``, ``{"model": state_dict,
  ...}`` (also ``<model>_last.pth``, whose ``opt`` is an ``argparse.Namespace``: read as data, never as code);
- ``mdistiller``: mdistiller's teacher files (RepDistiller's, the same layout) and its ``student_best`` /
  ``student_latest`` files (``{"model": student.state_dict()}``); its whole-distiller files are refused;
- ``auto`` (the default): told apart by their keys (``state_dict``: kdrun; ``model``: RepDistiller/mdistiller; a
  plain state_dict in kdrun's names, else in theirs).

RepDistiller's and mdistiller's CIFAR models share one naming; a kdrun model whose names differ from theirs lists
the renames in ``FOREIGN_NAMES`` (``(regex, replacement)`` pairs, e.g. ``downsample`` -> ``shortcut``). A
DataParallel ``module.`` prefix is dropped, and BatchNorm's ``num_batches_tracked`` (absent in files of PyTorch
< 0.4.1) may be missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from kdrun import __version__
from kdrun.core.errors import KdrunError
from kdrun.core.io import is_safetensors, read_state, read_tensors, save_tensors
from kdrun.core.schema import check
from kdrun.data import DataSpec
from kdrun.models.registry import architecture_cfg, build_model, model_name

CheckpointFormat = Literal["auto", "kdrun", "repdistiller", "mdistiller"]
SAFE_TYPES = (argparse.Namespace,)  # RepDistiller's <model>_last.pth keeps its command-line options under "opt"
DISTILLER_PREFIXES = ("student.", "teacher.")  # the keys of mdistiller's whole-distiller files (best, latest)
NOT_REQUIRED = ".num_batches_tracked"  # a BatchNorm buffer that files of PyTorch < 0.4.1 lack

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
    return _as_kdrun(read_file(path, key), path, key)


def read_file(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, Any]:
    """The file's contents: a safetensors file as ``{**metadata, "state_dict": tensors}``, never unpickled; a
    ``torch.save`` file (older kdrun runs, RepDistiller, mdistiller) read with ``weights_only=True``."""
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
    return read_state(path, key, SAFE_TYPES)  # no such file, a torch.save file, or neither: read_state says which


def _as_kdrun(obj: dict[str, Any], path: str | os.PathLike, key: str) -> dict[str, Any]:
    foreign = isinstance(obj.get("model"), Mapping)
    if "state_dict" not in obj:  # a plain state_dict
        obj = {"state_dict": obj}
    state = obj["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = f"; it looks like a RepDistiller/mdistiller file: set {key}_format=auto" if foreign else ""
        raise KdrunError(f"{key}={path} has a state_dict with values that are not tensors{hint}")
    return obj


def detect_format(obj: Mapping[str, Any]) -> str:
    """``kdrun`` for a kdrun model file or a plain state_dict, ``mdistiller`` for a file with a whole mdistiller
    distiller under ``model``, ``repdistiller`` for another ``{"model": state_dict}`` (mdistiller's teachers)."""
    if isinstance(obj.get("state_dict"), Mapping) or not isinstance(obj.get("model"), Mapping):
        return "kdrun"
    keys = _without_parallel(obj["model"])
    return "mdistiller" if any(k.startswith(DISTILLER_PREFIXES) for k in keys) else "repdistiller"


def _without_parallel(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without DataParallel's ``module.`` prefix (when every key has it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def foreign_state(obj: Mapping[str, Any], path: str | os.PathLike, key: str, fmt: str) -> dict[str, torch.Tensor]:
    """The one model's state_dict in a RepDistiller / mdistiller file: its ``model`` entry (or the file itself, a
    plain state_dict), in the file's names."""
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdrunError(
            f"{key}={path} is not a {fmt} file: it has no 'model' state_dict of tensors (its keys: {_first(list(obj))})"
        )
    state = _without_parallel(state)
    if any(k.startswith(DISTILLER_PREFIXES) for k in state):
        raise KdrunError(
            f"{key}={path} ({fmt} format) holds a whole mdistiller distiller (student.* and teacher.* keys), not one "
            "model: give its student_best / student_latest file, or the teacher's own file"
        )
    return state


def rename(state: Mapping[str, torch.Tensor], rules) -> dict[str, str]:
    """kdrun's name -> the file's name for every key of ``state``, by the ``(regex, replacement)`` ``rules``."""
    names = {}
    for theirs in state:
        ours = theirs
        for pattern, replacement in rules:
            ours = re.sub(pattern, replacement, ours)
        names[ours] = theirs
    return names


def misfit(model: nn.Module, state: Mapping[str, torch.Tensor], names: Mapping[str, str], lenient: bool) -> list[str]:
    """What keeps ``state`` (the file's, reached by ``names``: ours -> theirs) from loading into ``model``: the
    missing, unexpected and mis-shaped keys, at most 3 of each; ``lenient`` lets ``num_batches_tracked`` be missing."""
    own = model.state_dict()
    missing = [k for k in own if k not in names and not (lenient and k.endswith(NOT_REQUIRED))]
    unexpected = [names[k] for k in names if k not in own]
    shapes = [
        f"{names[k]} {tuple(state[names[k]].shape)} vs {k} {tuple(v.shape)}"
        for k, v in own.items()
        if k in names and state[names[k]].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model): {'; '.join(shapes[:3])}")
    return parts


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def checkpoint_format(model_cfg: Any) -> str:
    """The format a teacher node's ``checkpoint`` is read in: its ``checkpoint_format`` (``auto`` if unset)."""
    return str(model_cfg.get("checkpoint_format", "auto"))


def load_model(
    path: str | os.PathLike, model_cfg: Any, spec: DataSpec, key: str = "teacher.checkpoint", fmt: str = "kdrun"
) -> nn.Module:
    """Build the configured model and load ``path`` into it; another architecture, class or channel count
    than the run's is a one-line error naming both."""
    return load_model_with_meta(path, model_cfg, spec, key, fmt)[0]


def load_model_with_meta(
    path: str | os.PathLike, model_cfg: Any, spec: DataSpec, key: str = "teacher.checkpoint", fmt: str = "kdrun"
) -> tuple[nn.Module, dict[str, Any]]:
    """``load_model``, and the file's other entries (``save_model``'s ``meta``; none for a plain state_dict or a
    foreign file) with ``checkpoint_format``: the format ``fmt`` (one of ``CheckpointFormat``; a user's teacher file
    is read in ``checkpoint_format(model_cfg)``, kdrun's own files in ``kdrun``) that the file was read in."""
    requested = check(f"{key}_format", fmt, CheckpointFormat)
    obj = read_file(path, key)
    fmt = detect_format(obj) if requested == "auto" else requested
    if fmt == "kdrun":
        ckpt = _as_kdrun(obj, path, key)
        _check_kdrun_meta(ckpt, path, model_cfg, spec, key)
        state, meta = ckpt["state_dict"], {k: v for k, v in ckpt.items() if k != "state_dict"}
    else:
        state, meta = foreign_state(obj, path, key, fmt), {}
    model = build_model(model_cfg, spec)
    rules = getattr(model, "FOREIGN_NAMES", ())
    names = rename(state, () if fmt == "kdrun" else rules)
    problems = misfit(model, state, names, lenient=fmt != "kdrun")
    if problems and requested == "auto" and fmt == "kdrun" and "state_dict" not in obj:  # plain: in their names?
        theirs = rename(state, rules)
        if not misfit(model, state, theirs, lenient=True):
            fmt, names, problems = "repdistiller", theirs, []
    if problems:
        raise KdrunError(
            f"{key}={path} does not fit {model_name(model_cfg)} for this dataset: {', '.join(problems)} "
            f"(read as a {fmt} file)"
        )
    own = model.state_dict()
    model.load_state_dict({k: state[names[k]] if k in names else own[k] for k in own})
    return model, {**meta, "checkpoint_format": fmt}


def _check_kdrun_meta(ckpt: Mapping[str, Any], path: str | os.PathLike, model_cfg: Any, spec: DataSpec, key: str):
    """A kdrun file's recorded model, class count and channel count are the run's."""
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
