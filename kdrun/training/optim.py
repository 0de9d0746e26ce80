"""Optimizers and per-step learning-rate schedules, by name (or any ``_target_``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch

from kdrun.core.errors import KdrunError
from kdrun.core.registry import Registry, to_dict
from kdrun.core.schema import Fraction, LearningRate, NonEmpty, Range, check

OPTIMIZERS = Registry("optim")
Momentum = Annotated[float, Range(ge=0, lt=1)]
WeightDecay = Annotated[float, Range(ge=0, le=1)]
Betas = Annotated[list[Momentum], NonEmpty()]
Eps = Annotated[float, Range(gt=0, le=1)]
# sched.warmup_epochs: a linear warm-up over this many epochs (a fraction of one is fine), or ``auto``
WarmupEpochs = Annotated[float, Range(ge=0, le=100_000)] | Literal["auto"]
AUTO_WARMUP_EPOCHS = 0.5  # warmup_epochs=auto: half an epoch ...
AUTO_WARMUP_SHARE = 0.2  # ... but at most this share of the stage's steps, so a short recipe is not dominated by it


@OPTIMIZERS.register("sgd")
def sgd(  # noqa: PLR0913 - torch.optim.SGD's own options, each a config key
    params,
    lr: LearningRate,
    momentum: Momentum = 0.0,
    dampening: Momentum = 0.0,
    weight_decay: WeightDecay = 0.0,
    nesterov: bool = False,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov, fused=fused, foreach=foreach)


def _adam(cls):
    def build(  # noqa: PLR0913 - torch.optim.Adam's own options, each a config key
        params,
        lr: LearningRate,
        betas: Betas = (0.9, 0.999),  # type: ignore[assignment]
        eps: Eps = 1e-8,
        weight_decay: WeightDecay = 0.0,
        amsgrad: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> torch.optim.Optimizer:
        if len(betas) != 2:
            raise KdrunError(f"optim.betas={list(betas)} is invalid: must be a list of 2 numbers >= 0 and < 1")
        b1, b2 = betas
        return cls(params, lr, (b1, b2), eps, weight_decay, amsgrad, fused=fused, foreach=foreach)

    return build


OPTIMIZERS.register("adam")(_adam(torch.optim.Adam))
OPTIMIZERS.register("adamw")(_adam(torch.optim.AdamW))

SCHEDULES = Registry("sched")


FUSED = ("sgd", "adam", "adamw")  # torch has one-kernel steps for these


def build_optimizer(cfg: Any, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer that the ``optim`` node names; ``lr`` is the stage's learning rate.

    SGD, Adam and AdamW use torch's fused implementation on CPU and CUDA unless the node sets ``fused`` or
    ``foreach`` itself: the same update in one kernel instead of a few per parameter.
    """
    options = to_dict(cfg)
    options["lr"] = lr
    params = list(params)
    if options.get("fused") is None and options.get("foreach") is None and _fusable(options, params):
        try:
            return OPTIMIZERS.build({**options, "fused": True}, "optim", params=params)
        except (RuntimeError, TypeError, ValueError):
            pass  # a device or dtype without a fused kernel: the default implementation below
    return OPTIMIZERS.build(options, "optim", params=params)


def _fusable(options: dict[str, Any], params: list) -> bool:
    name = str(options.get("name"))
    if "_target_" in options or name not in FUSED:
        return False
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)


def build_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR stepped once per batch: linear warm-up (``warmup_steps``), then the named decay."""
    options = to_dict(cfg)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, warmup_steps(options.pop("warmup_epochs", 0), steps_per_epoch, total))
    decay = SCHEDULES.build(options, "sched", total_steps=total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(step - warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps(warmup_epochs: Any, steps_per_epoch: int, total: int) -> int:
    """The warm-up's length in steps: ``warmup_epochs`` epochs, or for ``auto`` half an epoch but at most a fifth of
    the stage. It keeps the first steps, taken from random weights at the full learning rate (and, in distillation,
    against a KD gradient that grows with T), from throwing the model into a constant prediction."""
    value = check("sched.warmup_epochs", warmup_epochs or 0, WarmupEpochs)
    if value == "auto":
        return int(min(AUTO_WARMUP_EPOCHS * steps_per_epoch, AUTO_WARMUP_SHARE * total))
    return int(round(float(value) * steps_per_epoch))


@SCHEDULES.register("cosine")
def cosine(total_steps: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


@SCHEDULES.register("step")
def step(
    total_steps: int,
    milestones: list[Fraction] = (0.5, 0.75),  # type: ignore[assignment]
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1,
):
    at = [int(m * total_steps) for m in milestones]
    return lambda s: gamma ** sum(s >= m for m in at)


@SCHEDULES.register("none")
def constant(total_steps: int):
    return lambda step: 1.0
