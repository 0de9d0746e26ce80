"""The one training loop, shared by every stage (teacher, baseline, distilled student).

It knows nothing of KD: the objective is a black box that maps a ``LossInput`` to ``(total, terms)``, and the
``TeacherSource`` chosen before the loop supplies whatever the teacher contributes to a step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.signals import check_stop
from kdrun.data import Data, labels_of
from kdrun.data.augment import hard_labels
from kdrun.losses import LossInput, Objective
from kdrun.models.features import FeatureTap
from kdrun.training.optim import build_optimizer, build_scheduler
from kdrun.training.predict import evaluate
from kdrun.training.runtime import Runtime, peak_memory_mb, reset_peak_memory
from kdrun.training.state import TrainingState
from kdrun.training.teacher import TeacherSource

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # steps between host reads of the non-finite count (and at every epoch's end)
EpochHook = Callable[[int, dict[str, float]], bool]  # (epoch, its history row) -> whether to stop after it


@dataclass
class Stage:
    """How one stage trains and where it reports: everything ``fit`` needs besides the model, the objective, the
    data, the teacher and the runtime."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    optim: Any
    sched: Any
    seed: int
    eval_batch_size: int = 1024
    max_nonfinite_steps: int = 10
    clip_grad_norm: float | None = None  # the gradient's global L2 norm is clipped to this, after AMP unscaling
    mix: Any = None  # a ``kdrun.data.augment`` mix: each batch and its labels mixed; the teacher sees them mixed
    state_path: Path | None = None  # the training state is saved there after every epoch, and resumed from
    writer: Any = None  # a TensorBoard SummaryWriter
    # Called after each epoch (validated, state saved) with the epoch and its history row; True stops the stage
    # there, e.g. a search trial's pruner. It runs on every rank and must return the same on each.
    on_epoch_end: EpochHook | None = None


@dataclass
class FitResult:
    """A trained model (last epoch) and what the stage learned about itself."""

    model: nn.Module
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    val_acc_best: float
    train_time_s: float
    img_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    peak_mem_mb: float | None = None  # the highest of the epochs' peaks (see ``peak_memory_mb``)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss
    stopped_epoch: int | None = None  # the epoch after which ``Stage.on_epoch_end`` stopped the stage, if it did


def fit(
    stage: Stage, model: nn.Module, objective: Objective, data: Data, teacher: TeacherSource, runtime: Runtime
) -> FitResult:
    """Train ``model`` on ``data.train`` with ``objective``; validate every epoch; keep the best-val weights.

    Scalars go to ``stage.writer`` under ``<stage>/train/<loss and each term>``, ``<stage>/val/{loss,acc}``,
    ``<stage>/lr``, ``<stage>/img_per_s`` and ``<stage>/peak_mem_mb``. With ``stage.state_path`` the training state
    is saved after every epoch and resumed from: the result is the same as without the interruption. A step whose
    loss is not finite makes no update (the schedule still advances, as with AMP's skipped steps); more than
    ``max_nonfinite_steps`` of them stop the stage with an error. SIGINT and SIGTERM stop it at a step boundary.
    ``stage.on_epoch_end`` may end the stage after any epoch: the result is then that of the epochs trained.
    """
    return Trainer(stage, model, objective, data, teacher, runtime).fit()


class Trainer:
    """``fit``'s loop. Everything that is not about one step is decided in ``__init__``."""

    def __init__(
        self, stage: Stage, model: nn.Module, objective: Objective, data: Data, teacher: TeacherSource, runtime: Runtime
    ):
        self.stage, self.data, self.teacher, self.runtime = stage, data, teacher, runtime
        if objective.uses_index:  # a per-sample memory (CRD's bank) is sized and labelled before the state is built
            objective.bind_data(labels_of(data.train))
        net = teacher.attach(runtime.prepare(model), objective, data, runtime, mixes=stage.mix is not None)
        self.st = _new_state(stage, model, objective, data, runtime)
        if stage.state_path is not None and self.st.load(stage.state_path, stage.epochs):
            log.info(
                "%s: resuming after epoch %d/%d (%s)",
                stage.name,
                self.st.progress.epoch,
                stage.epochs,
                stage.state_path,
            )
        tapped = isinstance(net, FeatureTap)  # returns (logits, features)
        if distributed.world_size() > 1:  # gradients averaged over the ranks; every rank starts from rank 0's weights
            cuda = runtime.device.type == "cuda"
            net = DistributedDataParallel(net, device_ids=[runtime.device.index] if cuda else None)
        compiled = runtime.forward(net)  # an untapped model is compiled once: validation reuses it
        self.forward = compiled if tapped else _with_no_features(compiled)
        self.rank, self.world = distributed.ranks().rank, distributed.world_size()
        self.steps_per_epoch = data.train.num_batches(stage.batch_size, shuffle=True, world=self.world)
        self.reported = 0  # skipped steps already warned about
        # torch's fused kernels take the skip decision on the device (SGD's first step creates its momentum, so
        # that one is decided on the host); other optimizers read it back.
        self.skip_on_device = bool(getattr(self.st.optimizer, "_step_supports_amp_scaling", False))
        self.stepped = bool(self.st.optimizer.state)
        self.params = [p for group in self.st.optimizer.param_groups for p in group["params"]]

    def fit(self) -> FitResult:
        stage, st, device = self.stage, self.st, self.runtime.device
        stopped = None
        for epoch in range(st.progress.epoch + 1, stage.epochs + 1):
            st.model.train()
            st.objective.set_epoch(epoch)
            reset_peak_memory(device)
            started = time.perf_counter()
            sums = self.train_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.end_epoch(epoch, sums, time.perf_counter() - started)
            if stage.on_epoch_end is not None and stage.on_epoch_end(epoch, st.progress.history[-1]):
                log.info("%s: stopped after epoch %d/%d by its epoch-end hook", stage.name, epoch, stage.epochs)
                stopped = epoch
                break
        p = st.progress
        assert p.best_state is not None
        throughput = p.images_seen / p.train_time if p.train_time > 0 else 0.0
        peak = max(row["peak_mem_mb"] for row in p.history)
        return FitResult(
            *(st.model, p.best_state, p.best_epoch, p.best_acc, p.train_time, throughput, p.history, peak),
            nonfinite_steps=p.nonfinite,
            stopped_epoch=stopped,
        )

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """One pass over this rank's share of the training split. Returns the sums of loss, terms, correct
        predictions, images and skipped steps, kept on the device: the steady-state step never waits for the host."""
        stage, st, data, runtime = self.stage, self.st, self.data, self.runtime
        batches = data.train.batches(
            stage.batch_size, shuffle=True, generator=st.generator, shard=(self.rank, self.world)
        )
        show = runtime.progress and self.rank == 0
        desc = f"{stage.name} {epoch}/{stage.epochs}"
        batches = tqdm(batches, total=self.steps_per_epoch, desc=desc, leave=False, disable=not show, file=sys.stderr)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
        step = 0
        for step, (images, labels, index) in enumerate(batches, 1):
            check_stop(f"in stage {stage.name}, epoch {epoch}, step {step}", self.saved())
            x = runtime.inputs(data.transform(images, train=True, generator=st.augment))
            if stage.mix is not None:
                x, labels = stage.mix(x, labels, data.spec.num_classes, st.augment)
            with runtime.autocast():
                logits, features = self.forward(x)
            t_logits, t_features = self.teacher(x, index)
            loss, terms = st.objective(LossInput(logits, labels, t_logits, features, t_features, index))
            kept = 1 - self.update(loss)
            n = kept * len(labels)
            sums["seen"] += n
            sums["skipped"] += 1 - kept
            sums["loss"] += torch.where(kept > 0, loss.detach(), 0) * n
            sums["correct"] += (logits.detach().argmax(1) == hard_labels(labels)).sum() * kept
            for name, value in terms.items():
                sums[name] += torch.where(kept > 0, value.detach(), 0) * n
            if step % CHECK_EVERY == 0:
                self.check_nonfinite(epoch, step, sums["skipped"])
        self.check_nonfinite(epoch, step, sums["skipped"])
        return sums

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward and optimizer step, skipped (weights and optimizer state unchanged) where the loss of any rank
        is not finite. Returns that flag, a float tensor (0 or 1) on the device, without reading it."""
        st = self.st
        skipped = distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float()).clamp_(max=1)
        st.optimizer.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        distributed.average_gradients(st.objective.parameters())  # DDP averages the model's own
        if self.stage.clip_grad_norm is not None:
            st.scaler.unscale_(st.optimizer)  # a no-op without fp16; clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(self.params, self.stage.clip_grad_norm, foreach=True)
        if st.scaler.is_enabled():
            st.scaler.step(st.optimizer)  # GradScaler skips steps with non-finite gradients itself
            st.scaler.update()
        elif self.skip_on_device and self.stepped:
            st.optimizer.found_inf = skipped  # type: ignore[attr-defined]  # torch's fused kernels skip the update on the device
            st.optimizer.step()
            del st.optimizer.found_inf  # type: ignore[attr-defined]
        elif not skipped.item():
            st.optimizer.step()
            self.stepped = True
        st.scheduler.step()
        return skipped

    def check_nonfinite(self, epoch: int, step: int, skipped: torch.Tensor) -> None:
        """Read the count of skipped steps (one host sync) and stop the stage when there were too many."""
        stage, amp = self.stage, self.runtime.amp
        count = self.st.progress.nonfinite + int(skipped.item())
        if count > self.reported:
            log.warning(
                "%s epoch %d: non-finite loss, %d step(s) skipped so far (by step %d)", stage.name, epoch, count, step
            )
            self.reported = count
        if count > stage.max_nonfinite_steps:
            recipe = "teacher" if stage.name.startswith("teacher") else "student"
            hint = {"fp16": "try amp=bf16 or amp=off", "bf16": "try amp=off"}.get(amp)
            precision = f"low-precision overflow (amp={amp}: {hint}), " if hint else ""
            raise KdrunError(
                f"stage {stage.name}, epoch {epoch}, step {step}: the loss was not finite in {count} steps "
                f"(more than train.max_nonfinite_steps={stage.max_nonfinite_steps}); likely causes: a learning rate "
                f"too high for this model (train.{recipe}.lr), {precision}or NaN/inf in the data"
            )

    def end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], epoch_time: float) -> None:
        """Reduce the epoch's sums over the ranks, validate, log, keep the best weights, save the training state."""
        st, stage, p = self.st, self.stage, self.st.progress
        if self.world > 1:
            keys = list(sums)
            sums = dict(
                zip(keys, distributed.all_reduce_sum(torch.stack([sums[k].float() for k in keys])), strict=True)
            )
            sums["skipped"] = sums["skipped"] / self.world  # every rank counted the same skipped steps
            distributed.sync_buffers(st.model)  # rank 0's BatchNorm statistics: every rank validates the same model
        seen = int(sums.pop("seen").item())
        p.nonfinite += int(sums.pop("skipped").item())
        p.train_time += epoch_time
        p.images_seen += seen
        if seen == 0:
            raise KdrunError(f"stage {stage.name}, epoch {epoch}: every step had a non-finite loss")
        train = {k: (v / seen).item() for k, v in sums.items() if k != "correct"}
        train["acc"] = sums["correct"].item() / seen
        val = evaluate(st.model, self.data.val, self.data, self.runtime, stage.eval_batch_size)
        row = {
            "epoch": epoch,
            "img_per_s": seen / epoch_time,
            "peak_mem_mb": peak_memory_mb(self.runtime.device),
            "lr": st.optimizer.param_groups[0]["lr"],
            **{f"train/{k}": v for k, v in train.items()},
            **{f"val/{k}": v for k, v in val.items()},
        }
        p.history.append(row)
        _log_epoch(stage, epoch, row)
        if val["acc"] > p.best_acc:
            p.best_acc, p.best_epoch = val["acc"], epoch
            p.best_state = {k: v.detach().to("cpu", copy=True) for k, v in st.model.state_dict().items()}
        p.epoch = epoch
        if stage.state_path is not None:
            st.save(stage.state_path)

    def saved(self) -> str:
        """What an interruption now would leave saved, for its message."""
        done = self.st.progress.epoch
        return (
            f"its epochs 1-{done} are saved in {self.stage.state_path}"
            if done and self.stage.state_path
            else ("no epoch of it is saved yet")
        )


def _with_no_features(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``forward`` returning ``(logits, [])``, the form of a tapped model's output."""
    return lambda x: (forward(x), [])


def _new_state(stage: Stage, model: nn.Module, objective: Objective, data: Data, runtime: Runtime) -> TrainingState:
    objective.to(runtime.device)
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = build_optimizer(stage.optim, params, stage.lr)
    steps = data.train.num_batches(stage.batch_size, shuffle=True, world=distributed.world_size())
    scheduler = build_scheduler(stage.sched, optimizer, steps, stage.epochs)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == "fp16")
    generator = torch.Generator().manual_seed(stage.seed)
    rank = distributed.ranks().rank
    augment = generator if distributed.world_size() == 1 else torch.Generator().manual_seed(stage.seed + 7919 * rank)
    return TrainingState(stage.name, model, objective, optimizer, scheduler, scaler, generator, augment)


def write_epoch(writer: Any, name: str, row: dict[str, float]) -> None:
    """One epoch's ``history`` row as TensorBoard scalars ``<name>/<tag>`` at step ``row["epoch"]``: the one
    place that writes them, for the live loop and for curves replayed from a cached or loaded model."""
    if writer is None:
        return
    for tag, value in row.items():
        if tag != "epoch" and (not tag.startswith("val/") or tag in ("val/loss", "val/acc")):
            writer.add_scalar(f"{name}/{tag}", value, int(row["epoch"]))


def _log_epoch(stage: Stage, epoch: int, row: dict[str, float]) -> None:
    write_epoch(stage.writer, stage.name, row)
    log.info(
        "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
        *(stage.name, epoch, stage.epochs, row["train/loss"], row["train/acc"], row["val/loss"], row["val/acc"]),
        row["img_per_s"],
    )
