"""What a run dir keeps so that a killed or interrupted run continues where it stopped.

``<run dir>/checkpoints/``:
- ``config.json``: the run's settings; resuming with other settings is an error, not a silent mix;
- ``<stage>.state.pt``: the training state after the last complete epoch of the stage in progress
  (model, optimizer, scheduler, GradScaler, every RNG, best-validation weights, history);
- ``<stage>.json``: the metrics of a finished stage, whose model is ``<run dir>/<stage>.safetensors`` (``.pt`` in
  a run dir of an earlier kdrun version).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.io import write_json
from kdrun.core.keys import not_resumed
from kdrun.models.checkpoint import find_model_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def state_path(run_dir: Path, stage: str) -> Path:
    return checkpoint_dir(run_dir) / f"{stage}.state.pt"


def prepare_run_dir(run_dir: Path, cfg: DictConfig) -> bool:
    """Check that ``run_dir`` holds no run with other settings, record ours, and remove temp files of a killed
    run. Returns whether there was an earlier run to continue."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    temps = [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.tmp.*"), *folder.glob(".*.tmp")]
    for stale in [*temps, run_dir / ".teacher_logits.safetensors", run_dir / ".teacher_logits.pt"]:
        stale.unlink(missing_ok=True)  # written by a process that was killed before its rename
    ours = _comparable(cfg)
    recorded = folder / "config.json"
    if recorded.is_file():
        theirs = json.loads(recorded.read_text())
        if theirs != ours:
            key, old, new = _first_difference(theirs, ours)
            raise KdrunError(
                f"{run_dir} holds a run with other settings ({key}: {old!r} there, {new!r} now); "
                f"resume it with its own settings (kdrun resume={run_dir}) or choose another hydra.run.dir"
            )
        return True
    write_json(recorded, ours)
    return False


def finished_stage(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The metrics of ``stage`` if an earlier attempt of this run finished it (its model file is there too)."""
    record = checkpoint_dir(run_dir) / f"{stage}.json"
    if record.is_file() and find_model_file(run_dir, stage).is_file():
        return json.loads(record.read_text())
    return None


def record_stage(run_dir: Path, stage: str, metrics: dict[str, Any]) -> None:
    """Mark ``stage`` finished; its epoch checkpoint is no longer needed."""
    write_json(checkpoint_dir(run_dir) / f"{stage}.json", metrics)
    state_path(run_dir, stage).unlink(missing_ok=True)


def _comparable(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for dotted in not_resumed():
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.loads(json.dumps(plain, default=str))


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "config", old, new
