"""Optimizers and per-step learning-rate schedules, by name (or any ``_target_``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from kdrun.registry import Registry, to_dict

OPTIMIZERS = Registry("optim")
OPTIMIZERS.register("sgd")(torch.optim.SGD)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)

SCHEDULES = Registry("sched")


def build_optimizer(cfg: Any, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer that the ``optim`` node names; ``lr`` is the stage's learning rate."""
    options = to_dict(cfg)
    options["lr"] = lr
    return OPTIMIZERS.build(options, "optim", params=params)


def build_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR stepped once per batch: linear warm-up over ``warmup_epochs``, then the named decay."""
    options = to_dict(cfg)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, int(round(float(options.pop("warmup_epochs", 0) or 0) * steps_per_epoch)))
    decay = SCHEDULES.build(options, "sched", total_steps=total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(step - warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@SCHEDULES.register("cosine")
def cosine(total_steps: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


@SCHEDULES.register("step")
def step(total_steps: int, milestones=(0.5, 0.75), gamma: float = 0.1):
    at = [int(m * total_steps) for m in milestones]
    return lambda s: gamma ** sum(s >= m for m in at)


@SCHEDULES.register("none")
def constant(total_steps: int):
    return lambda step: 1.0
