"""Checks every user-facing value before any work starts; each problem is one line naming the key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kdrun.core.errors import KdrunError
from kdrun.data import DATASETS
from kdrun.data.augment import MIXES
from kdrun.losses import LOSSES, build_objective
from kdrun.models import check_model_cfg
from kdrun.reporting.export import check_formats
from kdrun.training.optim import OPTIMIZERS, SCHEDULES
from kdrun.training.runtime import AMP_CHOICES, CHANNELS_LAST_CHOICES

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _fail(key: str, value: Any, rule: str) -> KdrunError:
    return KdrunError(f"{key}={value!r} is invalid: {rule}")


def _number(key: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, value, "must be a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise _fail(
            key,
            value,
            f"must be {'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else ""),
        )
    if high is not None and value > high:
        raise _fail(key, value, f"must be >= {low:g} and <= {high:g}" if low is not None else f"must be <= {high:g}")
    return float(value)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(key, value, "must be an integer > 0")
    return value


def _nonnegative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "must be an integer >= 0")
    return value


def _writable_folder(key: str, path: Any) -> None:
    """``path`` is a folder, or can become one: its nearest existing ancestor is a writable folder."""
    existing = Path(os.path.expanduser(str(path))).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdrunError(f"{key}={path} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdrunError(f"{key}={path} is not writable ({existing} does not allow it)")


def _choice(key: str, value: Any, choices) -> Any:
    if value not in choices:
        raise KdrunError(f"{key}={value!r} is invalid; choose one of: {', '.join(map(str, choices))}")
    return value


def _named(key: str, node: Any, registry_names: list[str], extra: str = "") -> None:
    if not isinstance(node, DictConfig):
        raise KdrunError(f"{key} must be a config group option, got {node!r}")
    if "_target_" in node:
        return
    name = node.get("name")
    if name not in registry_names:
        raise KdrunError(f"{key}.name={name!r} is not known; choose one of: {', '.join(registry_names)}{extra}")


def validate(cfg: DictConfig) -> None:
    """Raise ``KdrunError`` for the first invalid value, before any data is read or model trained."""
    try:
        _validate(cfg)
    except MissingMandatoryValue as e:
        raise KdrunError(f"{e.full_key} is required but not set; add {e.full_key}=<value> to the command") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise KdrunError(f"{key}: {str(e).strip().splitlines()[0]}") from e


def _validate(cfg: DictConfig) -> None:
    for check in (_check_top, _check_train, _check_dataset, _check_models, _check_report, _check_groups, _check_cache):
        check(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def _check_top(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise KdrunError(f"{missing[0]} is required but not set; add {missing[0]}=<value> to the command")
    _number("T", cfg.T, 0, low_open=True)
    _number("alpha", cfg.alpha, 0, 1)
    _nonnegative_int("seed", cfg.seed)
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise KdrunError(f"device={cfg.device!r} is invalid; choose one of: auto, cpu, cuda, cuda:N, mps")
    _choice("amp", cfg.amp, AMP_CHOICES)
    _choice("channels_last", cfg.channels_last, CHANNELS_LAST_CHOICES)
    _choice("compile", cfg.compile, (True, False))
    _choice("baseline", cfg.baseline, (True, False))


def _check_train(cfg: DictConfig) -> None:
    for stage in ("teacher", "student"):
        node = cfg.train[stage]
        _positive_int(f"train.{stage}.epochs", node.epochs)
        _positive_int(f"train.{stage}.batch_size", node.batch_size)
        _number(f"train.{stage}.lr", node.lr, 0, low_open=True)
    _positive_int("train.eval_batch_size", cfg.train.eval_batch_size)
    _nonnegative_int("train.max_nonfinite_steps", cfg.train.get("max_nonfinite_steps", 10))
    _choice("train.progress", cfg.train.progress, ("auto", True, False))
    _choice("train.teacher_logits", cfg.train.get("teacher_logits", "auto"), ("auto", "online"))


def _check_dataset(cfg: DictConfig) -> None:
    _named("dataset", cfg.dataset, DATASETS.names())
    data = cfg.dataset
    _number("dataset.val_fraction", data.get("val_fraction", 0.1), 0, 1, low_open=True)
    if data.val_fraction >= 1:
        raise _fail("dataset.val_fraction", data.val_fraction, "must be > 0 and < 1")
    if data.get("root") is not None and not data.get("download", False):
        root = os.path.expanduser(str(data.root))
        if not os.path.isdir(root):
            raise KdrunError(
                f"dataset.root={data.root} is not a folder (dataset.download=false, so the files must be there already)"
            )
        if not os.access(root, os.R_OK | os.X_OK):
            raise KdrunError(f"dataset.root={data.root} is not readable")
    augment = data.get("augment") or {}
    if not isinstance(augment.get("crop_pad", 0), int) or augment.get("crop_pad", 0) < 0:
        raise _fail("dataset.augment.crop_pad", augment.get("crop_pad"), "must be an integer >= 0")


def _check_models(cfg: DictConfig) -> None:
    for role in ("teacher", "student"):
        if not isinstance(cfg[role], DictConfig):
            raise KdrunError(f"{role} must be a model option (e.g. {role}=resnet18), got {cfg[role]!r}")
        check_model_cfg(cfg[role], role)
    checkpoint = cfg.teacher.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(os.path.expanduser(str(checkpoint))):
        raise KdrunError(f"teacher.checkpoint={checkpoint} is not a file")


def _check_report(cfg: DictConfig) -> None:
    report = cfg.get("report")
    if not isinstance(report, DictConfig):
        raise KdrunError(f"report must be a group of settings (report.enabled=..., ...), got {report!r}")
    _choice("report.enabled", report.enabled, (True, False))
    for key in ("ece_bins", "latency_repeats", "throughput_batch"):
        _positive_int(f"report.{key}", report[key])
    _nonnegative_int("report.warmup", report.warmup)
    check_formats(cfg.export)


def _check_groups(cfg: DictConfig) -> None:
    _named("loss", cfg.loss, LOSSES.names())
    build_objective(cfg.loss, cfg.T, cfg.alpha)  # unknown or invalid loss options fail here, before any training
    _named("optim", cfg.optim, OPTIMIZERS.names())
    _named("sched", cfg.sched, SCHEDULES.names())
    _named("augment", cfg.augment, ["none", *MIXES.names()])
    if cfg.augment.name != "none":
        _number("augment.alpha", cfg.augment.get("alpha", 1.0), 0, low_open=True)


def _check_cache(cfg: DictConfig) -> None:
    if not isinstance(cfg.get("cache"), DictConfig):
        raise KdrunError(f"cache={cfg.get('cache')!r} is invalid; choose one of: on, off")
    _choice("cache.enabled", cfg.cache.enabled, (True, False))
    if cfg.cache.enabled:
        if not str(cfg.cache.get("dir") or "").strip():
            raise _fail("cache.dir", cfg.cache.get("dir"), "must be a folder path when the cache is on")
        _writable_folder("cache.dir", cfg.cache.dir)
