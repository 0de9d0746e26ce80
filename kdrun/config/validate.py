"""Checks every user-facing value before any work starts; each problem is one line naming the key.

The types and ranges come from the schema (``kdrun/config/schema.py``); what a type cannot say (a folder that must
exist, a device that must be there, a model option's members) is checked here after it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kdrun.config.schema import hint_of, leaves
from kdrun.core.errors import KdrunError
from kdrun.core.schema import check
from kdrun.data import DATASETS
from kdrun.data.augment import MIXES
from kdrun.losses import LOSSES, build_objective
from kdrun.models import check_model_cfg
from kdrun.reporting.export import check_formats
from kdrun.training.optim import OPTIMIZERS, SCHEDULES

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
INTERPOLATION = re.compile(r"^\$\{.*\}$")
GROUPS = {
    "dataset": DATASETS.names,
    "loss": LOSSES.names,
    "optim": OPTIMIZERS.names,
    "sched": SCHEDULES.names,
    "augment": lambda: ["none", *MIXES.names()],
}


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
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    given = dict(leaves(raw))
    # Read off the unresolved values: OmegaConf.missing_keys resolves every interpolation, and parsing them is most of
    # validation's time. The one resolution below follows.
    missing = sorted(key for key, value in given.items() if value == "???")
    if missing:
        raise KdrunError(f"{missing[0]} is required but not set; add {missing[0]}=<value> to the command")
    _check_groups(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    assert isinstance(resolved, dict)
    for key, value in given.items():  # the values as given first, so an error names the key that was set
        if not (isinstance(value, str) and INTERPOLATION.match(value)):
            check_leaf(resolved, key, value)
    for key, value in leaves(resolved):  # then the interpolated ones, resolved
        if key in given and given[key] != value:
            check_leaf(resolved, key, value)
    _check_semantics(cfg)


def check_leaf(cfg: dict[Any, Any], key: str, value: Any) -> None:
    """``value`` of ``key`` against its declared type (a one-line ``KdrunError`` if it does not fit)."""
    hint = hint_of(cfg, key)
    if isinstance(hint, dict):  # a group of settings, such as dataset.augment
        if not isinstance(value, dict):
            raise KdrunError(f"{key}={value!r} is invalid: must be a group of settings ({', '.join(hint)})")
        return
    check(key, value, hint)


def _check_groups(cfg: DictConfig) -> None:
    for key in ("teacher", "student", "report", "cache", *GROUPS):
        if not isinstance(cfg.get(key), DictConfig):
            raise KdrunError(f"{key}={cfg.get(key)!r} is invalid: must be an option of the {key} group")
    for key, names in GROUPS.items():
        node = cfg[key]
        if "_target_" not in node and node.get("name") not in names():
            raise KdrunError(f"{key}.name={node.get('name')!r} is not known; choose one of: {', '.join(names())}")


def _check_semantics(cfg: DictConfig) -> None:
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise KdrunError(f"device={cfg.device!r} is invalid; choose one of: auto, cpu, cuda, cuda:N, mps")
    data = cfg.dataset
    if data.get("root") is not None and not data.get("download", False):
        root = os.path.expanduser(str(data.root))
        if not os.path.isdir(root):
            raise KdrunError(
                f"dataset.root={data.root} is not a folder (dataset.download=false, so the files must be there already)"
            )
        if not os.access(root, os.R_OK | os.X_OK):
            raise KdrunError(f"dataset.root={data.root} is not readable")
    for role in ("teacher", "student"):
        check_model_cfg(cfg[role], role)
    checkpoint = cfg.teacher.get("checkpoint")
    if checkpoint is not None and not os.path.isfile(os.path.expanduser(str(checkpoint))):
        raise KdrunError(f"teacher.checkpoint={checkpoint} is not a file")
    check_formats(cfg.export)
    build_objective(cfg.loss, cfg.T, cfg.alpha)  # layer lists and the like, before any training
    _check_search(cfg.get("search"))
    if cfg.cache.enabled:
        _writable_folder("cache.dir", cfg.cache.dir)


def _check_search(search: Any) -> None:
    """A search trial's keys come together (the kdrun_optuna sweeper sets all three) or not at all."""
    if search is None:
        return
    keys = ("storage", "study", "trial")
    unset = [f"search.{k}" for k in keys if search.get(k) is None]
    if unset and len(unset) < len(keys):
        raise KdrunError(
            f"{', '.join(unset)} not set while the other search keys are: the kdrun_optuna sweeper sets "
            "search.storage, search.study and search.trial together; leave all three null outside a search"
        )


def _writable_folder(key: str, path: Any) -> None:
    """``path`` is a folder, or can become one: its nearest existing ancestor is a writable folder."""
    existing = Path(os.path.expanduser(str(path))).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdrunError(f"{key}={path} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdrunError(f"{key}={path} is not writable ({existing} does not allow it)")
