"""Checks that need the data or the models, run once before any training: what the config alone cannot tell.

Each failure is one ``KdrunError`` line naming the setting to change. Nothing here touches the run's random state
or writes a file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from kdrun.core.errors import KdrunError
from kdrun.core.modes import eval_mode
from kdrun.data import Data, build_data, with_train_subset
from kdrun.losses import build_objective
from kdrun.models import build_model, model_name
from kdrun.models.checkpoint import checkpoint_format, load_model
from kdrun.training.optim import build_optimizer, build_scheduler
from kdrun.training.runtime import determinism_error


def preflight(cfg: DictConfig, data: Data | None = None) -> None:
    """Class count, image size against each model, steps per epoch, checkpoints, the method's layers, and the
    optimizer and schedule, each as the run will build them."""
    with torch.random.fork_rng(devices=[]):  # leave the run's random state as it was
        data = data if data is not None else build_data(cfg.dataset)
        if data.spec.num_classes < 2:
            raise KdrunError(
                f"dataset={data.name} has {data.spec.num_classes} class(es); classification needs at least 2"
            )
        teacher, student = (_model(cfg, role, data) for role in ("teacher", "student"))
        for stage, recipe in (("teacher", cfg.train.teacher), ("student", cfg.train.student)):
            _check_steps(stage, recipe, data, cfg)
        spec = data.spec
        objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
        if objective.uses_features:  # a wrong layer name fails in seconds, not after the teacher has trained
            objective.bind(student, teacher, torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size))
        for stage, recipe in (("teacher", cfg.train.teacher), ("student", cfg.train.student)):
            _check_optimizer(stage, recipe, cfg, student if stage == "student" else teacher, data)


def _model(cfg: DictConfig, role: str, data: Data) -> nn.Module:
    """The model as the run builds it (the teacher from its checkpoint, if any), probed with a batch of 2."""
    node = cfg[role]
    if role == "teacher" and node.get("checkpoint"):
        model = load_model(node.checkpoint, node, data.spec, key="teacher.checkpoint", fmt=checkpoint_format(node))
    else:
        model = build_model(node, data.spec, key=role)
    for i, member in enumerate(node.get("members") or []):
        if member.get("checkpoint"):
            key = f"teacher.members[{i}].checkpoint"
            load_model(member.checkpoint, member, data.spec, key=key, fmt=checkpoint_format(member))
    spec = data.spec
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size))
    except RuntimeError as e:
        if cfg.get("deterministic") and determinism_error(e) is not None:
            raise  # not the image size: the run's determinism_errors says which op
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdrunError(
            f"{role}={model_name(node)} cannot take the dataset's {spec.image_size} x {spec.image_size} px images "
            f"({reason}); choose another {role} or a larger dataset.image_size"
        ) from e
    if out.shape[-1] != spec.num_classes:
        raise KdrunError(f"{role}={model_name(node)} gives {out.shape[-1]} outputs for {spec.num_classes} classes")
    return model


def _check_steps(stage: str, recipe: Any, data: Data, cfg: DictConfig) -> None:
    train = with_train_subset(data, recipe.get("max_samples"), cfg.dataset.get("split_seed", 0)).train
    if train.num_batches(int(recipe.batch_size), shuffle=True) == 0:
        raise KdrunError(
            f"train.{stage}.max_samples={recipe.get('max_samples')} leaves {len(train)} training image(s): "
            "no step of at least 2 images (BatchNorm needs 2); use more samples"
        )


def _check_optimizer(stage: str, recipe: Any, cfg: DictConfig, model: nn.Module, data: Data) -> None:
    try:
        optimizer = build_optimizer(cfg.optim, model.parameters(), float(recipe.lr))
        steps = data.train.num_batches(int(recipe.batch_size), shuffle=True)
        build_scheduler(cfg.sched, optimizer, steps, int(recipe.epochs))
    except (ValueError, TypeError) as e:  # torch's own checks of optimizer options
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KdrunError(f"optim={model_name(cfg.optim)} for the {stage}: {reason}") from e
