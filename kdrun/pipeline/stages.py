"""The three stages of a run: the teacher (trained, cached, loaded or an ensemble), the baseline and the distilled
student, each resumable inside its run dir and (teacher and baseline) shared through the artefact cache."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.io import file_sha256, is_safetensors, read_state, read_tensors, save_tensors
from kdrun.core.keys import dataset_identity, model_identity
from kdrun.core.registry import to_dict
from kdrun.data import Data, labels_of, with_augment, with_train_subset
from kdrun.data.augment import build_mix
from kdrun.losses import CrossEntropy, Objective, build_objective
from kdrun.models import architecture_cfg, build_model, count_params, model_name
from kdrun.models.checkpoint import (
    checkpoint_format,
    find_model_file,
    load_model,
    load_model_with_meta,
    model_file,
    save_model,
    write_checkpoint,
)
from kdrun.pipeline.cache import TRAINING_CODE_VERSION, ArtefactCache, cache_key
from kdrun.pipeline.history import logged_epochs, replay, stored_history
from kdrun.pipeline.rundir import finished_stage, record_stage, state_path
from kdrun.training.health import Chance, advice, assess
from kdrun.training.loop import EpochHook, FitResult, Stage, fit
from kdrun.training.predict import evaluate, predict, with_state
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import CachedLogits, OnlineTeacher, TeacherSource

log = logging.getLogger(__name__)

Made = tuple[nn.Module, dict[str, Any]]  # a stage's model (best-validation weights) and its metrics.json entry


@dataclass
class RunContext:
    """What every stage of one run shares."""

    cfg: DictConfig
    data: Data
    runtime: Runtime
    run_dir: Path
    writer: Any = None  # TensorBoard SummaryWriter (rank 0 only)
    cache: ArtefactCache | None = None
    student_epoch_end: EpochHook | None = None  # the distilled student's epoch-end hook (a search trial's pruner)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate(model, getattr(self.data, split), self.data, self.runtime, self.cfg.train.eval_batch_size)


def resumable(ctx: RunContext, name: str, model_cfg: DictConfig, make: Callable[[], Made]) -> Made:
    """``make()``, unless an earlier attempt of this run finished the stage: then its model and metrics."""
    distributed.barrier()  # every rank sees the same finished stages
    metrics = finished_stage(ctx.run_dir, name)
    if metrics is None:
        model, metrics = make()
        if distributed.is_main():
            record_stage(ctx.run_dir, name, metrics)
        return model, metrics
    path = find_model_file(ctx.run_dir, name)
    model = load_model(path, model_cfg, ctx.data.spec, key=f"{name} of the earlier attempt")
    model = model.to(ctx.runtime.device)
    acc = 100 * metrics["test_acc"]
    log.info("%s: finished by an earlier attempt of this run (%s), test acc %.2f%%", name, path, acc)
    return model, metrics


def teacher_stage(ctx: RunContext) -> Made:
    """Load the teacher from ``teacher.checkpoint``, or take it from the cache, or train it (an ensemble: each
    member so, then averaged)."""
    cfg = ctx.cfg
    if model_name(cfg.teacher) == "ensemble":
        return resumable(ctx, "teacher", cfg.teacher, lambda: ensemble_teacher(ctx))
    if cfg.teacher.get("checkpoint"):
        return resumable(ctx, "teacher", cfg.teacher, lambda: checkpoint_stage(ctx, "teacher", cfg.teacher))
    return resumable(ctx, "teacher", cfg.teacher, lambda: reusable_stage(ctx, "teacher", cfg.teacher))


def baseline_stage(ctx: RunContext) -> Made:
    """The student trained alone, with the student's recipe: the reference for ``kd_gain``."""
    return resumable(ctx, "baseline", ctx.cfg.student, lambda: reusable_stage(ctx, "baseline", ctx.cfg.student))


def student_stage(ctx: RunContext, teacher: nn.Module, teacher_metrics: dict[str, Any]) -> Made:
    """The student distilled from ``teacher`` with the configured method."""

    def distil() -> Made:
        cfg = ctx.cfg
        objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
        log.info("distillation loss %s: %s", model_name(cfg.loss), objective.describe())
        source, how = teacher_source(ctx, objective, teacher, teacher_metrics)
        student, metrics = train_stage(ctx, "student", cfg.student, objective, source)
        return student, {**metrics, "teacher_logits": how}

    return resumable(ctx, "student", ctx.cfg.student, distil)


def checkpoint_stage(ctx: RunContext, name: str, model_cfg: DictConfig) -> Made:
    """A trained teacher read from ``model_cfg.checkpoint``, tested like a trained one, copied into the run dir
    (with its training curves, when the file has them: they are replayed into this run's TensorBoard)."""
    path = model_cfg.checkpoint
    fmt = checkpoint_format(model_cfg)
    teacher, meta = load_model_with_meta(path, model_cfg, ctx.data.spec, key=f"{name}.checkpoint", fmt=fmt)
    teacher = teacher.to(ctx.runtime.device)
    history = stored_history(meta, f"{name}.checkpoint={path}")
    log.info("%s %s loaded from %s", name, model_name(model_cfg), path)
    val, test = ctx.evaluate(teacher, "val"), ctx.evaluate(teacher, "test")
    save_run_model(model_file(ctx.run_dir, name), teacher, model_cfg, ctx.data.spec, source=str(path), history=history)
    return teacher, {
        "source": "checkpoint",
        "cache_key": None,
        "history_source": replay(ctx.writer, name, history, f"checkpoint {path}"),
        "checkpoint_sha256": file_sha256(Path(path).expanduser()),
        "checkpoint_format": meta["checkpoint_format"],  # the format it was read in (teacher.checkpoint_format)
        **tested_metrics(teacher, model_cfg, val, test),
    }


def ensemble_teacher(ctx: RunContext) -> Made:
    """Each member trained (or loaded, or taken from the cache, as its own artefact) as ``teacher_<i>``; then
    the ensemble of them, whose outputs average the members' softened distributions at the run's T."""
    cfg, members, member_metrics = ctx.cfg, [], []
    for i, member_cfg in enumerate(cfg.teacher.members, 1):
        name = f"teacher_{i}"

        def make(name: str = name, member_cfg: DictConfig = member_cfg) -> Made:
            if member_cfg.get("checkpoint"):
                return checkpoint_stage(ctx, name, member_cfg)
            return reusable_stage(ctx, "teacher", member_cfg, name)

        model, metrics = resumable(ctx, name, member_cfg, make)
        members.append(model)
        member_metrics.append({"name": name, **metrics})
    ensemble = build_model(cfg.teacher, ctx.data.spec, key="teacher").to(ctx.runtime.device)
    for slot, member in zip(ensemble.members, members, strict=True):  # type: ignore[arg-type]
        slot.load_state_dict(member.state_dict())
    val, test = ctx.evaluate(ensemble, "val"), ctx.evaluate(ensemble, "test")
    save_run_model(model_file(ctx.run_dir, "teacher"), ensemble, cfg.teacher, ctx.data.spec)
    identities = [model_identity(m) for m in member_metrics]
    log.info("teacher: ensemble of %d, test acc %.2f%%", len(members), 100 * test["acc"])
    return ensemble, {
        "source": "ensemble",
        "cache_key": None,
        "history_source": None,  # never trained as a whole: each member has its own
        # What the teacher-logits cache keys on: the members and the temperature of the average.
        "ensemble_key": cache_key({"members": identities, "T": float(cfg.T)}) if all(identities) else None,
        "members": member_metrics,
        **tested_metrics(ensemble, cfg.teacher, val, test),
        "train_time_s": sum(m["train_time_s"] for m in member_metrics),
    }


def tested_metrics(model: nn.Module, model_cfg: DictConfig, val: dict, test: dict) -> dict[str, Any]:
    """The metrics.json entry of a teacher that was not trained in this stage (loaded, or an ensemble)."""
    return {
        "model": model_name(model_cfg),
        "params": count_params(model),
        "test_acc": test["acc"],
        "test_acc_best": test["acc"],
        "val_acc_best": val["acc"],
        "best_epoch": None,
        "test_top5": test.get("top5"),
        "test_top5_best": test.get("top5"),
        "test_loss": test["loss"],
        "epochs": 0,
        "train_time_s": 0.0,
        "img_per_s": None,
    }


def reusable_stage(ctx: RunContext, stage: str, model_cfg: DictConfig, name: str | None = None) -> Made:
    """The teacher and the baseline depend on neither T nor alpha: every run of a sweep shares one of each.

    They come from the artefact cache when an entry with the same key exists; otherwise this job trains and
    caches them while parallel jobs wanting the same key wait, then reuse it. ``name`` (default ``stage``)
    names the run-dir files and TensorBoard tags, e.g. ``teacher_2`` for an ensemble member.
    """
    name = name or stage
    if ctx.cache is None:
        return train_stage(ctx, stage, model_cfg, CrossEntropy(), TeacherSource(), name)
    trained: list[Made] = []

    def build() -> tuple[Path, dict]:
        trained.append(train_stage(ctx, stage, model_cfg, CrossEntropy(), TeacherSource(), name))
        return model_file(ctx.run_dir, name), trained[0][1]

    entry, hit = ctx.cache.fetch_or_build(stage, artefact_fields(ctx.cfg, stage, ctx.runtime.amp, model_cfg), build)
    if not hit:
        model, metrics = trained[0]
        return model, {**metrics, "cache_key": entry.key}
    key = f"cache entry {entry.dir}"
    model, meta = load_model_with_meta(entry.model_path, model_cfg, ctx.data.spec, key=key)
    model = model.to(ctx.runtime.device)
    into_run_dir(entry.model_path, model_file(ctx.run_dir, name), model, meta)
    done = logged_epochs(state_path(ctx.run_dir, name))  # by an earlier attempt of this run, killed while training
    replayed = replay(ctx.writer, name, stored_history(meta, key), f"cache {entry.key}", after=done)
    metrics = {**entry.metrics, "source": "cache", "cache_key": entry.key, "history_source": replayed}
    if metrics.get("flag_reason"):
        warn_flagged(name, metrics)
    log.info(
        "%s: %s reused from the cache (key %s, built %s), test acc %.2f%%",
        *(name, model_name(model_cfg), entry.key, entry.meta.get("created"), 100 * metrics["test_acc"]),
    )
    return model, metrics


def teacher_source(
    ctx: RunContext, objective: Objective, teacher: nn.Module, teacher_metrics: dict
) -> tuple[TeacherSource, str]:
    """Where the distilled student's steps get the teacher's outputs, and how that is described in metrics.json.

    Without random augmentation the teacher sees the same inputs every epoch, so one pass gives every logit
    the student will ever need: rows in split order, looked up by sample index. They go into the artefact
    cache, keyed by the teacher's identity and the data, so the runs of a sweep share one pass. With random
    augmentation, mixing, a feature loss (or ``train.teacher_logits=online``) the teacher runs on each batch.
    """
    cfg = ctx.cfg
    student_data, mix = stage_inputs(ctx, "student")
    online = cfg.train.teacher_logits == "online" or student_data.transform.augments or mix is not None
    if online or objective.uses_features:
        return OnlineTeacher(teacher), "online"
    split = student_data.train

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        logits, labels = predict(teacher, split, student_data, ctx.runtime, cfg.train.eval_batch_size)
        log.info("teacher logits for %d training images in %.1f s", len(split), time.perf_counter() - started)
        return logits, labels

    identity = model_identity(teacher_metrics)
    if ctx.cache is None or identity is None or not distributed.is_main():  # other ranks: no shared temp file
        return CachedLogits(compute()[0]), "cached in memory"
    fields = {
        "code": TRAINING_CODE_VERSION,
        "teacher": identity,
        "dataset": dataset_identity(cfg.dataset),
        "split": "train",
        "max_samples": cfg.train.student.get("max_samples"),
        "amp": ctx.runtime.amp,
    }
    tmp = ctx.run_dir / ".teacher_logits.safetensors"

    def build() -> tuple[Path, dict]:
        logits, labels = compute()
        save_tensors({"logits": logits, "labels": labels}, tmp, {})
        return tmp, {"samples": len(split)}

    try:
        entry, _ = ctx.cache.fetch_or_build_here("teacher_logits", fields, build)
    finally:
        tmp.unlink(missing_ok=True)
    where, path = f"cache entry {entry.dir}", entry.model_path  # checksum-verified by the cache
    stored = read_tensors(path, where)[0] if is_safetensors(path) else read_state(path, where)  # .pt: earlier kdrun
    labels = getattr(split, "labels", None)  # in-memory splits: check the rows are this run's samples, in order
    if stored["logits"].shape[0] != len(split) or (
        labels is not None and not torch.equal(stored["labels"], labels.cpu())
    ):
        raise KdrunError(f"cache entry {entry.dir} holds logits of other samples than this run's; delete it")
    return CachedLogits(stored["logits"].to(ctx.runtime.device)), f"cached ({entry.key})"


def artefact_fields(cfg: DictConfig, stage: str, amp: str, model_cfg: Any = None) -> dict[str, Any]:
    """Everything that determines a trained teacher or baseline, and nothing else: the key of its cache entry.

    Not T, alpha or the loss (they only shape the distilled student), nor where the data lives, the device
    or the evaluation batch size (see ``kdrun.core.keys``). ``amp`` is the run's resolved precision.
    """
    model_cfg = (cfg.teacher if stage == "teacher" else cfg.student) if model_cfg is None else model_cfg
    return {
        "code": TRAINING_CODE_VERSION,
        "objective": "ce",
        "dataset": dataset_identity(cfg.dataset),
        "model": architecture_cfg(model_cfg),
        "recipe": to_dict(recipe_of(cfg, stage)),  # with the stage's own augmentation
        "optim": to_dict(cfg.optim),
        "sched": to_dict(cfg.sched),
        "seed": int(cfg.seed),
        "amp": amp,
        **({"augment": to_dict(cfg.augment)} if custom_mix(cfg, stage) else {}),
    }


def teacher_is_baseline(cfg: DictConfig, amp: str) -> bool:
    """Whether the baseline is the teacher trained again: the same model, recipe and seed (self-distillation,
    e.g. born-again networks), so the teacher cannot lead it. Never for a loaded teacher (an ensemble's fields
    always differ from a student's)."""
    return not cfg.teacher.get("checkpoint") and artefact_fields(cfg, "teacher", amp) == artefact_fields(
        cfg, "baseline", amp
    )


def recipe_of(cfg: DictConfig, stage: str) -> DictConfig:
    """The training recipe of a stage: ``train.teacher``, or ``train.student`` for the baseline and the student."""
    return cfg.train.teacher if stage == "teacher" else cfg.train.student


def custom_mix(cfg: DictConfig, stage: str) -> bool:
    """Whether the student's recipe mixes with a mixing of the user's own (an ``augment`` node with ``_target_``),
    which its recipe's ``mix`` name cannot describe."""
    return stage != "teacher" and "_target_" in cfg.augment


def stage_inputs(ctx: RunContext, stage: str) -> tuple[Data, Any]:
    """The data a stage trains on (its recipe's subset and augmentation) and its batch mixing (or None)."""
    cfg, recipe = ctx.cfg, recipe_of(ctx.cfg, stage)
    augment = recipe.augment
    data = with_train_subset(ctx.data, recipe.get("max_samples"), cfg.dataset.get("split_seed", 0))
    data = with_augment(data, int(augment.crop_pad), bool(augment.flip))
    if custom_mix(cfg, stage):
        return data, build_mix(cfg.augment)
    return data, build_mix({"name": augment.mix, "alpha": augment.mix_alpha})


def train_stage(
    ctx: RunContext, stage: str, model_cfg: DictConfig, objective: Objective, teacher: TeacherSource, name: str = ""
) -> Made:
    """Build, train and test one model; return its best-validation version and its metrics.json entry.

    The baseline and the distilled student are built and shuffled from the same seed, so they start from
    the same weights and see the same batches: the only difference is the objective.
    """
    cfg, name, recipe = ctx.cfg, name or stage, recipe_of(ctx.cfg, stage)
    data, mix = stage_inputs(ctx, stage)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, data.spec, key=stage if stage != "baseline" else "student")
    log.info(
        "%s: %s, %.3fM parameters, %d epochs, batch %d, lr %g",
        *(name, model_name(model_cfg), count_params(model) / 1e6, recipe.epochs, recipe.batch_size, recipe.lr),
    )
    plan = Stage(
        name=name,
        epochs=int(recipe.epochs),
        batch_size=int(recipe.batch_size),
        lr=float(recipe.lr),
        optim=cfg.optim,
        sched=cfg.sched,
        seed=int(cfg.seed),
        eval_batch_size=int(cfg.train.eval_batch_size),
        max_nonfinite_steps=int(cfg.train.max_nonfinite_steps),
        clip_grad_norm=None if recipe.get("clip_grad_norm") is None else float(recipe.clip_grad_norm),
        mix=mix,
        state_path=state_path(ctx.run_dir, name),
        writer=ctx.writer,
        on_epoch_end=ctx.student_epoch_end if stage == "student" else None,
    )
    result, init = fit_with_init(ctx, plan, model, objective, teacher, data)
    best = with_state(result.model, result.best_state)
    eval_batch = cfg.train.eval_batch_size
    last_test = evaluate(result.model, data.test, data, ctx.runtime, eval_batch)
    best_test = evaluate(best, data.test, data, ctx.runtime, eval_batch)
    path = model_file(ctx.run_dir, name)
    save_run_model(path, best, model_cfg, data.spec, epoch=result.best_epoch, history=result.history)
    return best, {
        "source": "trained",
        "cache_key": None,
        "history_source": "trained",
        "model": model_name(model_cfg),
        "params": count_params(model),
        "test_acc": last_test["acc"],
        "test_acc_best": best_test["acc"],
        "val_acc_best": result.val_acc_best,
        "best_epoch": result.best_epoch,
        "test_top5": last_test.get("top5"),
        "test_top5_best": best_test.get("top5"),
        "test_loss": last_test["loss"],
        "epochs": int(recipe.epochs),
        "train_time_s": result.train_time_s,
        "img_per_s": result.img_per_s,
        "peak_mem_mb": result.peak_mem_mb,
        "nonfinite_steps": result.nonfinite_steps,
        **outcome_flags(name, result, data),
        **init,
    }


def fit_with_init(
    ctx: RunContext, plan: Stage, model: nn.Module, objective: Objective, teacher: TeacherSource, data: Data
) -> tuple[FitResult, dict[str, Any]]:
    """``fit``, after the method's init phase if it has one; with that phase's metrics.json entry (or none)."""
    init = init_phase(ctx, plan, model, objective, teacher, data) if objective.init_epochs > 0 else {}
    result = fit(plan, model, objective, data, teacher, ctx.runtime)
    if init and distributed.is_main():
        state_path(ctx.run_dir, f"{plan.name}_init").unlink(missing_ok=True)  # kept until now for a resume
    return result, init


def init_phase(
    ctx: RunContext, plan: Stage, model: nn.Module, objective: Objective, teacher: TeacherSource, data: Data
) -> dict[str, Any]:
    """The method's init phase (``objective.init_epochs`` > 0, e.g. AB, FT, FSP), run on ``model`` before
    distillation: the same loop, data and optimizer kind at a constant learning rate, logged as ``<stage>/init``
    (TensorBoard ``student/init/train/...``), resumable from its own state file. Returns its metrics.json entry."""
    phase = objective.init_phase()
    lr = plan.lr if objective.init_lr is None else float(objective.init_lr)
    stage = replace(
        plan,
        name=f"{plan.name}/init",
        epochs=int(objective.init_epochs),
        lr=lr,
        sched=OmegaConf.create({"name": "none"}),
        state_path=state_path(ctx.run_dir, f"{plan.name}_init"),
        on_epoch_end=None,  # the search's per-epoch reports (pruning) follow distillation, not this phase
    )
    log.info("%s: init phase, %d epochs at lr %g: %s", plan.name, stage.epochs, lr, phase.describe())
    kept = None if objective.init_trains_student else {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(stage, model, phase, data, teacher, ctx.runtime)
    if kept is not None:  # the phase trains the method's parts alone: the student as built, BatchNorm statistics too
        model.load_state_dict(kept)
    last = result.history[-1]
    return {
        "init_phase": {
            "epochs": stage.epochs,
            "lr": lr,
            "trains_student": objective.init_trains_student,
            "train_loss": last["train/loss"],
            "train_time_s": result.train_time_s,
        }
    }


def outcome_flags(name: str, result: FitResult, data: Data) -> dict[str, Any]:
    """``stopped_epoch`` of a stage cut short by its epoch-end hook (a search trial's pruner), which the health rules
    do not judge (they judge a whole training); else the stage's health flags."""
    if result.stopped_epoch is not None:
        return {"stopped_epoch": result.stopped_epoch}
    return health_flags(name, result.history, result.nonfinite_steps, data)


def health_flags(name: str, history: list[dict[str, float]], nonfinite_steps: int, data: Data) -> dict[str, Any]:
    """``collapsed`` / ``diverged`` and their reason for a finished stage, with one warning line when flagged."""
    flags = assess(history, nonfinite_steps, Chance.of(labels_of(data.val), data.spec.num_classes))
    if flags:
        warn_flagged(name, flags)
    return flags


def warn_flagged(name: str, metrics: dict[str, Any]) -> None:
    """The one warning line of a collapsed or diverged stage: what happened and what to change."""
    what = "diverged" if metrics.get("diverged") else "collapsed"
    log.warning("%s %s: %s. Its numbers are not a result: %s", name, what, metrics["flag_reason"], advice(name))


def save_run_model(path: Path, model: nn.Module, model_cfg: DictConfig, spec, **meta: Any) -> None:
    """``save_model`` into the run dir, by the process that writes the run's files (rank 0 of a distributed run)."""
    if distributed.is_main():
        save_model(path, model, model_cfg, spec, **meta)


def into_run_dir(src: Path, dst: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Give the run dir its ``<stage>.safetensors`` as a hard link to the cache entry's file (no copy; skipped
    across filesystems), or, for an entry of an earlier kdrun (``model.pt``), as that model converted.

    Rank 0 of a distributed run alone does it."""
    if not distributed.is_main():
        return
    if not is_safetensors(src):
        kept = {k: v for k, v in meta.items() if k != "checkpoint_format"}  # how it was read, not what it holds
        write_checkpoint(dst, {**kept, "state_dict": model.state_dict()})
        return
    try:
        dst.unlink(missing_ok=True)
        os.link(src, dst)
    except OSError:
        log.info("%s is not linked into the run dir (another filesystem); the model is %s", dst.name, src)
