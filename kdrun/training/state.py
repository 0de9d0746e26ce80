"""A stage's training state: every field a resumed run needs to continue as if it had never stopped, listed once
and used both to save and to load."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.io import atomic_save, read_state
from kdrun.losses import Objective

log = logging.getLogger(__name__)

# The objects whose ``state_dict`` is saved under their own name.
MODULES = ("model", "objective", "optimizer", "scheduler", "scaler")


@dataclass
class Progress:
    """What the loop has done and found so far (saved with the modules after every epoch)."""

    epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_acc: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    images_seen: int = 0
    nonfinite: int = 0


@dataclass
class TrainingState:
    """The live objects of a stage in training, and its ``Progress``.

    ``generator`` draws the batch order (alike on every rank) and, on one process, the augmentation; on several
    processes each rank augments its own share of the batch from ``augment``, a stream of its own.
    """

    stage: str
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    augment: torch.Generator
    progress: Progress = field(default_factory=Progress)

    def save(self, path: Path) -> None:
        """Write the state atomically (rank 0), with every RNG; on several ranks, every rank's own streams too."""
        world = distributed.world_size()
        ranks = distributed.gather({"augment": self.augment.get_state(), "rng": rng_state()}) if world > 1 else None
        if not distributed.is_main():
            return
        state = {name: getattr(self, name).state_dict() for name in MODULES}
        state.update({f.name: getattr(self.progress, f.name) for f in fields(Progress)})
        state.update(stage=self.stage, generator=self.generator.get_state(), world_size=world, ranks=ranks)
        atomic_save({**state, "rng": rng_state()}, path)

    def load(self, path: Path, epochs: int) -> bool:
        """Continue from the state saved at ``path``, if there is one; returns whether there was."""
        if not path.is_file():
            return False
        state = read_state(path, "training checkpoint")
        world, saved_world = distributed.world_size(), state.get("world_size", 1)
        if state["stage"] != self.stage or state["epoch"] > epochs:
            raise KdrunError(f"{path} holds {state['stage']} epoch {state['epoch']}, not a state of {self.stage}")
        if saved_world != world:
            raise KdrunError(
                f"{path} was saved by a run on {saved_world} process(es); resume it on the same number (now "
                f"{world}), e.g. torchrun --nproc_per_node={saved_world} -m kdrun resume=..."
            )
        set_rng_state(state["rng"])
        for name in MODULES:
            getattr(self, name).load_state_dict(state.get(name, {}))
        self.generator.set_state(state["generator"])
        self.progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})
        if world > 1:
            own = state["ranks"][distributed.ranks().rank]
            self.augment.set_state(own["augment"])
            set_rng_state(own["rng"])
        return True


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch and CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
