"""The one training and evaluation loop, shared by every stage (teacher, baseline, student)."""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.functional.classification import multiclass_accuracy
from tqdm.auto import tqdm

from kdrun import distributed
from kdrun.data import Data, Split
from kdrun.errors import KdrunError
from kdrun.features import FeatureTap
from kdrun.losses import Objective
from kdrun.mixing import hard_labels
from kdrun.optim import build_optimizer, build_scheduler
from kdrun.resume import load_training_state, rng_state, save_training_state, set_rng_state
from kdrun.runtime import Runtime, peak_memory_mb, reset_peak_memory
from kdrun.signals import check_stop

log = logging.getLogger(__name__)


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


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, data: Data, runtime: Runtime, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of a whole split, in split order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    forward = runtime.forward(runtime.prepare(model))
    logits, labels = [], []
    for images, y, _ in split.batches(batch_size):
        with runtime.autocast():
            logits.append(forward(runtime.inputs(data.transform(images))).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, runtime: Runtime):
    """The frozen teacher's float32 logits for a batch, in inference mode (no autograd bookkeeping at all);
    for a ``FeatureTap``, ``(logits, [features])``."""
    with torch.inference_mode(), runtime.autocast():
        out = runtime.forward(teacher)(x)
    # Normal tensors again: inference tensors cannot take part in the student's backward.
    if isinstance(out, tuple):
        logits, features = out
        return logits.float().clone(), [f.clone() for f in features]
    return out.float().clone()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, top-1 accuracy and (with more than 5 classes) top-5 accuracy of logits against labels."""
    num_classes = logits.shape[1]
    out = {
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "acc": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
    }
    if num_classes > 5:
        out["top5"] = multiclass_accuracy(logits, labels, num_classes, top_k=5, average="micro").item()
    return out


def evaluate(model: nn.Module, split: Split, data: Data, runtime: Runtime, batch_size: int) -> dict[str, float]:
    return classification_metrics(*predict(model, split, data, runtime, batch_size))


def fit(
    stage: str,
    model: nn.Module,
    objective: Objective,
    data: Data,
    train_cfg: Any,
    optim_cfg: Any,
    sched_cfg: Any,
    runtime: Runtime,
    seed: int,
    writer=None,
    teacher: nn.Module | None = None,
    eval_batch_size: int = 1024,
    teacher_logits: torch.Tensor | None = None,
    state_path: Path | None = None,
    max_nonfinite_steps: int = 10,
    mix=None,
) -> FitResult:
    """Train ``model`` on ``data.train`` with ``objective``; validate every epoch; keep the best-val weights.

    The objective gets the teacher's logits for the same batch: rows of ``teacher_logits`` (the teacher's
    outputs for the whole split, in split order) picked by each batch's sample indices, or else ``teacher``
    run on the batch in inference mode. ``mix`` (see ``kdrun.mixing``) mixes each batch and its labels;
    the teacher then sees the mixed batch.
    Scalars go to ``writer`` under ``<stage>/train/<loss and each term>``, ``<stage>/val/{loss,acc}``,
    ``<stage>/lr``, ``<stage>/img_per_s`` and ``<stage>/peak_mem_mb``.

    With ``state_path``, the whole training state is saved there after every epoch, and a state found there
    is resumed from: the result is the same as without the interruption. A step whose loss is not finite is
    skipped (no update); more than ``max_nonfinite_steps`` of them stop the stage with an error. SIGINT and
    SIGTERM (see ``kdrun.signals``) stop it at the next step boundary.
    """
    epochs, batch_size = int(train_cfg.epochs), int(train_cfg.batch_size)
    device = runtime.device
    student_net = runtime.prepare(model)
    if mix is not None and teacher_logits is not None:
        raise ValueError(f"stage {stage}: mixed batches need the teacher online, not cached logits")
    if objective.uses_features and teacher_logits is not None:
        raise ValueError(f"stage {stage}: a feature loss needs the teacher online, not cached logits")
    if objective.needs_teacher:
        if teacher_logits is not None:
            if teacher_logits.shape[0] != len(data.train):
                raise ValueError(f"stage {stage}: {len(teacher_logits)} teacher logits for {len(data.train)} samples")
            teacher_logits = teacher_logits.to(device)
        elif teacher is None:
            raise ValueError(f"stage {stage}: the objective needs a teacher")
        else:
            runtime.prepare(teacher).eval().requires_grad_(False)
    if objective.uses_features:
        spec = data.spec
        example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, device=device)
        objective.bind(model, teacher, runtime.inputs(example))  # resolves the layers, builds any adapter
        log.info("%s: %s", stage, objective.describe())
        student_net = FeatureTap(model, objective.student_layers)
        teacher = FeatureTap(teacher, objective.teacher_layers).eval()
    objective.to(device)
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = build_optimizer(optim_cfg, params, float(train_cfg.lr))
    rank, world = distributed.ranks().rank, distributed.world_size()
    steps_per_epoch = data.train.num_batches(batch_size, shuffle=True, world=world)
    scheduler = build_scheduler(sched_cfg, optimizer, steps_per_epoch, epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp == "fp16")
    generator = torch.Generator().manual_seed(seed)  # batch order (alike on every rank) and augmentation
    # On several ranks each augments its own share of the batch, from a stream of its own.
    augment = generator if world == 1 else torch.Generator().manual_seed(seed + 7919 * rank)

    best_state, best_epoch, best_acc = None, 0, -1.0
    history, train_time, images_seen, nonfinite, done = [], 0.0, 0, 0, 0
    state = load_training_state(state_path) if state_path is not None else None
    if state is not None:
        if state["stage"] != stage or state["epoch"] > epochs:
            raise KdrunError(f"{state_path} holds {state['stage']} epoch {state['epoch']}, not a state of {stage}")
        if state.get("world_size", 1) != world:
            raise KdrunError(
                f"{state_path} was saved by a run on {state.get('world_size', 1)} process(es); resume it on the same "
                f"number (now {world}), e.g. torchrun --nproc_per_node={state.get('world_size', 1)} -m kdrun resume=..."
            )
        model.load_state_dict(state["model"])
        objective.load_state_dict(state.get("objective", {}))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        best_state, best_epoch, best_acc = state["best_state"], state["best_epoch"], state["best_acc"]
        history, train_time, images_seen = state["history"], state["train_time"], state["images_seen"]
        nonfinite, done = state["nonfinite"], state["epoch"]
        if world > 1:
            own = state["ranks"][rank]
            augment.set_state(own["augment"])
            set_rng_state(own["rng"])
        log.info("%s: resuming after epoch %d/%d (%s)", stage, done, epochs, state_path)
    saved = f"its epochs 1-{done} are saved in {state_path}" if done and state_path else "no epoch of it is saved yet"
    if world > 1:  # gradients averaged over the ranks; every rank starts from rank 0's weights
        student_net = DistributedDataParallel(student_net, device_ids=[device.index] if device.type == "cuda" else None)
    forward = runtime.forward(student_net)
    for epoch in range(done + 1, epochs + 1):
        model.train()
        objective.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        seen = 0
        reset_peak_memory(device)
        start = time.perf_counter()
        batches = tqdm(
            data.train.batches(batch_size, shuffle=True, generator=generator, shard=(rank, world)),
            total=steps_per_epoch,
            desc=f"{stage} {epoch}/{epochs}",
            leave=False,
            disable=not runtime.progress or rank != 0,
            file=sys.stderr,
        )
        for step, (images, labels, idx) in enumerate(batches, 1):
            check_stop(f"in stage {stage}, epoch {epoch}, step {step}", saved)
            x = runtime.inputs(data.transform(images, train=True, generator=augment))
            if mix is not None:
                x, labels = mix(x, labels, data.spec.num_classes, augment)
            with runtime.autocast():
                logits = forward(x)
            if not objective.needs_teacher:
                targets = None
            elif teacher_logits is not None:
                targets = teacher_logits[idx]  # by sample index, never by batch position
            else:
                targets = teacher_outputs(teacher, x, runtime)
            if objective.uses_features:
                (logits, student_features), (targets, teacher_features) = logits, targets
                loss, terms = objective(logits, labels, targets, student_features, teacher_features)
            else:
                loss, terms = objective(logits, labels, targets)
            if distributed.any_rank(not torch.isfinite(loss).item()):  # every rank skips alike
                nonfinite += 1
                _check_nonfinite(stage, epoch, step, nonfinite, max_nonfinite_steps, runtime)
                continue  # no update: the weights, optimizer and schedule stay as they were
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            distributed.average_gradients(objective.parameters())  # DDP averages the model's own
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = len(labels)
            seen += n
            sums["loss"] += loss.detach() * n  # summed on the device
            sums["correct"] += (logits.detach().argmax(1) == hard_labels(labels)).sum()
            for name, value in terms.items():
                sums[name] += value.detach() * n
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - start
        if world > 1:  # the epoch's sums over every rank's share
            keys = list(sums)
            totals = distributed.all_reduce_sum(
                torch.stack([sums[k].float() for k in keys] + [torch.tensor(seen, device=device, dtype=torch.float32)])
            )
            sums = dict(zip(keys, totals[:-1], strict=True))
            seen = int(totals[-1].item())
            distributed.sync_buffers(model)  # rank 0's BatchNorm statistics: every rank validates the same model
        train_time += epoch_time
        images_seen += seen
        if seen == 0:
            raise KdrunError(f"stage {stage}, epoch {epoch}: every step had a non-finite loss")
        train = {k: (v / seen).item() for k, v in sums.items() if k != "correct"}
        train["acc"] = sums["correct"].item() / seen
        val = evaluate(model, data.val, data, runtime, eval_batch_size)
        row = {
            "epoch": epoch,
            "img_per_s": seen / epoch_time,
            "peak_mem_mb": peak_memory_mb(device),
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train/{k}": v for k, v in train.items()},
            **{f"val/{k}": v for k, v in val.items()},
        }
        history.append(row)
        if writer is not None:
            for tag in ("lr", "img_per_s", "peak_mem_mb"):
                writer.add_scalar(f"{stage}/{tag}", row[tag], epoch)
            for k, v in train.items():
                writer.add_scalar(f"{stage}/train/{k}", v, epoch)
            for k in ("loss", "acc"):
                writer.add_scalar(f"{stage}/val/{k}", val[k], epoch)
        log.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
            stage,
            epoch,
            epochs,
            train["loss"],
            train["acc"],
            val["loss"],
            val["acc"],
            row["img_per_s"],
        )
        if val["acc"] > best_acc:
            best_acc, best_epoch = val["acc"], epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if state_path is not None:  # on several ranks, every rank's own streams too, for an exact resume
            per_rank = distributed.gather({"augment": augment.get_state(), "rng": rng_state()}) if world > 1 else None
            if rank == 0:
                save_training_state(
                    state_path,
                    {
                        "world_size": world,
                        "ranks": per_rank,
                        "stage": stage,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "objective": objective.state_dict(),  # e.g. FitNet's adapters
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "generator": generator.get_state(),
                        "best_state": best_state,
                        "best_epoch": best_epoch,
                        "best_acc": best_acc,
                        "history": history,
                        "train_time": train_time,
                        "images_seen": images_seen,
                        "nonfinite": nonfinite,
                    },
                )
                saved = f"its epochs 1-{epoch} are saved in {state_path}"
    assert best_state is not None
    return FitResult(
        model,
        best_state,
        best_epoch,
        best_acc,
        train_time,
        images_seen / train_time if train_time > 0 else 0.0,
        history,
        max(row["peak_mem_mb"] for row in history),
    )


def _check_nonfinite(stage: str, epoch: int, step: int, count: int, limit: int, runtime: Runtime) -> None:
    log.warning("%s epoch %d step %d: non-finite loss, step skipped (%d so far)", stage, epoch, step, count)
    if count > limit:
        recipe = "teacher" if stage.startswith("teacher") else "student"
        raise KdrunError(
            f"stage {stage}, epoch {epoch}, step {step}: the loss was not finite in {count} steps "
            f"(more than train.max_nonfinite_steps={limit}); likely causes: a learning rate too high for this "
            f"model (train.{recipe}.lr), fp16 overflow (amp={runtime.amp}: try amp=bf16 or amp=off), "
            "or NaN/inf in the data"
        )


def with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state`` (e.g. its best-validation weights)."""
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other
