"""One run, top to bottom: data -> teacher -> baseline -> distilled student -> report."""

from __future__ import annotations

import logging
import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from kdrun import distributed
from kdrun.cache import TRAINING_CODE_VERSION, ArtefactCache, cache_key, file_sha256, model_identity
from kdrun.checkpoint import atomic_save, load_model, read_state, save_model
from kdrun.data import Data, build_data, dataset_identity, with_train_subset
from kdrun.engine import evaluate, fit, predict, with_state
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate_models
from kdrun.export import check_formats, export_student
from kdrun.losses import CrossEntropy, Objective, build_objective
from kdrun.mixing import build_mix
from kdrun.models import architecture_cfg, build_model, count_params, model_name
from kdrun.parallel import job_device
from kdrun.registry import to_dict
from kdrun.report import assemble, summary_table, write_hparams, write_json, write_report
from kdrun.resume import finished_stage, prepare_run_dir, record_stage, state_path
from kdrun.runtime import Runtime, resolve_runtime
from kdrun.signals import stop_on_signals

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Run the whole experiment that ``cfg`` describes; return the distilled student's best validation accuracy."""
    run_dir = Path(run_dir or _hydra_output_dir() or ".")
    with job_device(cfg.device) as device, stop_on_signals():
        runtime = resolve_runtime(device, cfg.amp, cfg.train.progress, cfg.channels_last, cfg.compile)
        return _run(cfg, run_dir, runtime)


def _run(cfg: DictConfig, run_dir: Path, runtime: Runtime) -> float:
    main = distributed.is_main()  # only rank 0 of a distributed run writes files
    if main and prepare_run_dir(run_dir, cfg):
        log.info("%s holds an earlier attempt of this run: finished stages are kept, the rest resumes", run_dir)
    distributed.barrier()
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset, runtime.device)
    log.info(
        "dataset %s: %d train / %d val / %d test images, %d classes, %d x %d px x %d channels; "
        "device %s, amp %s, channels_last %s, compile %s",
        data.name,
        len(data.train),
        len(data.val),
        len(data.test),
        data.spec.num_classes,
        data.spec.image_size,
        data.spec.image_size,
        data.spec.in_channels,
        runtime.device,
        runtime.amp,
        runtime.channels_last,
        runtime.compile,
    )
    check_feature_taps(cfg, data)
    cache = ArtefactCache(cfg.cache.dir) if cfg.cache.enabled else None
    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    if distributed.world_size() > 1:
        log.info(
            "%d processes: each trains on its share of every batch (global batch size as configured)",
            distributed.world_size(),
        )
    stages: dict[str, dict[str, Any]] = {}
    try:
        teacher, stages["teacher"] = resumable(
            "teacher",
            cfg.teacher,
            data,
            runtime,
            run_dir,
            partial(teacher_stage, cfg, data, runtime, writer, run_dir, cache),
        )
        models = {"teacher": teacher}
        if cfg.baseline:
            baseline = partial(reusable_stage, "baseline", cfg.student, cfg, data, runtime, writer, run_dir, cache)
            models["baseline"], stages["baseline"] = resumable(
                "baseline", cfg.student, data, runtime, run_dir, baseline
            )

        def distil() -> tuple[nn.Module, dict]:
            objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
            log.info("distillation loss %s: %s", model_name(cfg.loss), objective.describe())
            if objective.uses_features:  # the teacher's features too: it runs on every batch
                logits, how = None, "online"
            else:
                logits, how = teacher_logits(cfg, data, runtime, teacher, stages["teacher"], run_dir, cache)
            student, metrics = train_stage(
                "student", cfg.student, objective, cfg, data, runtime, writer, run_dir, teacher, logits
            )
            return student, {**metrics, "teacher_logits": how}

        models["student"], stages["student"] = resumable("student", cfg.student, data, runtime, run_dir, distil)
        metrics = assemble(run_config(cfg, runtime), stages)
        if not main:
            return float(metrics["objective"])
        outputs = None
        if cfg.report.enabled:
            started = time.perf_counter()
            metrics["evaluation"], outputs = evaluate_models(
                models, data, "test", runtime, run_dir, cfg.report, cfg.train.eval_batch_size
            )
            log.info("evaluation report in %.1f s", time.perf_counter() - started)
            for stage in models:  # the output contract's per-stage keys (of the saved, best-validation model)
                metrics[stage].update({k: metrics["evaluation"][stage][k] for k in stage_report_keys(cfg)})
        write_json(run_dir / "metrics.json", metrics)  # before the export, which may fail: nothing is lost
        formats = check_formats(cfg.export)
        if formats:
            example = data.transform(next(iter(data.test.batches(64)))[0])
            metrics["export"] = export_student(models["student"], example, run_dir, formats)
            write_json(run_dir / "metrics.json", metrics)
        if outputs is not None:
            write_report(run_dir, metrics, outputs, writer)
        write_hparams(writer, metrics)
    finally:
        if writer is not None:
            writer.close()
    log.info("results (%s):\n%s", run_dir / "metrics.json", summary_table(metrics))
    return float(metrics["objective"])


def check_feature_taps(cfg: DictConfig, data: Data) -> None:
    """A feature loss's layers, checked on freshly built models before any training: a wrong layer name or an
    untappable model fails in seconds, not after the teacher has trained."""
    objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
    if not objective.uses_features:
        return
    spec = data.spec
    with torch.random.fork_rng(devices=[]):  # leave the run's random state as it was
        student = build_model(cfg.student, spec, key="student")
        teacher = build_model(cfg.teacher, spec, key="teacher")
        objective.bind(student, teacher, torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size))


def stage_report_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The evaluation numbers that metrics.json also keeps inside each stage's entry, as the contract names them."""
    keys = ("agreement", "kl_to_teacher", "ece", "per_class_acc", "flops", "size_mb", "latency_ms_b1")
    return (*keys, f"throughput_b{int(cfg.report.throughput_batch)}")


def resumable(
    stage: str, model_cfg: DictConfig, data: Data, runtime: Runtime, run_dir: Path, run_stage
) -> tuple[nn.Module, dict]:
    """``run_stage()``, unless an earlier attempt of this run finished the stage: then its model and metrics."""
    distributed.barrier()  # every rank sees the same finished stages
    metrics = finished_stage(run_dir, stage)
    if metrics is None:
        model, metrics = run_stage()
        if distributed.is_main():
            record_stage(run_dir, stage, metrics)
        return model, metrics
    path = run_dir / f"{stage}.pt"
    model = load_model(path, model_cfg, data.spec, key=f"{stage} of the earlier attempt").to(runtime.device)
    log.info(
        "%s: finished by an earlier attempt of this run (%s), test acc %.2f%%", stage, path, 100 * metrics["test_acc"]
    )
    return model, metrics


def teacher_stage(
    cfg: DictConfig, data: Data, runtime: Runtime, writer, run_dir: Path, cache: ArtefactCache | None
) -> tuple[nn.Module, dict]:
    """Load the teacher from ``teacher.checkpoint``, or take it from the cache, or train it (an ensemble: each
    member so, then averaged)."""
    if model_name(cfg.teacher) == "ensemble":
        return ensemble_teacher(cfg, data, runtime, writer, run_dir, cache)
    if cfg.teacher.get("checkpoint"):
        return checkpoint_stage("teacher", cfg.teacher, cfg, data, runtime, run_dir)
    return reusable_stage("teacher", cfg.teacher, cfg, data, runtime, writer, run_dir, cache)


def checkpoint_stage(
    name: str, model_cfg: DictConfig, cfg: DictConfig, data: Data, runtime: Runtime, run_dir: Path
) -> tuple[nn.Module, dict]:
    """A trained teacher read from ``model_cfg.checkpoint``, tested like a trained one, copied into the run dir."""
    path = model_cfg.checkpoint
    teacher = load_model(path, model_cfg, data.spec, key=f"{name}.checkpoint").to(runtime.device)
    log.info("%s %s loaded from %s", name, model_name(model_cfg), path)
    val = evaluate(teacher, data.val, data, runtime, cfg.train.eval_batch_size)
    test = evaluate(teacher, data.test, data, runtime, cfg.train.eval_batch_size)
    save_run_model(run_dir / f"{name}.pt", teacher, model_cfg, data.spec, source=str(path))
    return teacher, {
        "source": "checkpoint",
        "cache_key": None,
        "checkpoint_sha256": file_sha256(Path(path).expanduser()),
        **_tested_metrics(teacher, model_cfg, val, test),
    }


def ensemble_teacher(
    cfg: DictConfig, data: Data, runtime: Runtime, writer, run_dir: Path, cache: ArtefactCache | None
) -> tuple[nn.Module, dict]:
    """Each member trained (or loaded, or taken from the cache, as its own artefact) as ``teacher_<i>``; then
    the ensemble of them, whose outputs average the members' softened distributions at the run's T."""
    members, member_metrics = [], []
    for i, member_cfg in enumerate(cfg.teacher.members, 1):
        name = f"teacher_{i}"
        if member_cfg.get("checkpoint"):
            make = partial(checkpoint_stage, name, member_cfg, cfg, data, runtime, run_dir)
        else:
            make = partial(reusable_stage, "teacher", member_cfg, cfg, data, runtime, writer, run_dir, cache, name)
        model, metrics = resumable(name, member_cfg, data, runtime, run_dir, make)
        members.append(model)
        member_metrics.append({"name": name, **metrics})
    ensemble = build_model(cfg.teacher, data.spec, key="teacher").to(runtime.device)
    for slot, member in zip(ensemble.members, members, strict=True):
        slot.load_state_dict(member.state_dict())
    val = evaluate(ensemble, data.val, data, runtime, cfg.train.eval_batch_size)
    test = evaluate(ensemble, data.test, data, runtime, cfg.train.eval_batch_size)
    save_run_model(run_dir / "teacher.pt", ensemble, cfg.teacher, data.spec)
    identities = [model_identity(m) for m in member_metrics]
    log.info("teacher: ensemble of %d, test acc %.2f%%", len(members), 100 * test["acc"])
    return ensemble, {
        "source": "ensemble",
        "cache_key": None,
        # What the teacher-logits cache keys on: the members and the temperature of the average.
        "ensemble_key": cache_key({"members": identities, "T": float(cfg.T)}) if all(identities) else None,
        "members": member_metrics,
        **_tested_metrics(ensemble, cfg.teacher, val, test),
        "train_time_s": sum(m["train_time_s"] for m in member_metrics),
    }


def _tested_metrics(model: nn.Module, model_cfg: DictConfig, val: dict, test: dict) -> dict[str, Any]:
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


def reusable_stage(
    stage: str,
    model_cfg: DictConfig,
    cfg: DictConfig,
    data: Data,
    runtime: Runtime,
    writer,
    run_dir: Path,
    cache: ArtefactCache | None,
    name: str | None = None,
) -> tuple[nn.Module, dict]:
    """The teacher and the baseline depend on neither T nor alpha: every run of a sweep shares one of each.

    They come from the artefact cache when an entry with the same key exists; otherwise this job trains and
    caches them while parallel jobs wanting the same key wait, then reuse it. ``name`` (default ``stage``)
    names the run-dir files and TensorBoard tags, e.g. ``teacher_2`` for an ensemble member.
    """
    name = name or stage
    train = partial(train_stage, stage, model_cfg, CrossEntropy(), cfg, data, runtime, writer, run_dir, name=name)
    if cache is None:
        return train()
    trained: list[tuple[nn.Module, dict]] = []

    def build() -> tuple[Path, dict]:
        trained.append(train())
        return run_dir / f"{name}.pt", trained[0][1]

    entry, hit = cache.fetch_or_build(stage, artefact_fields(stage, cfg, runtime, model_cfg), build)
    if not hit:
        model, metrics = trained[0]
        return model, {**metrics, "cache_key": entry.key}
    model = load_model(entry.model_path, model_cfg, data.spec, key=f"cache entry {entry.dir}").to(runtime.device)
    _link_or_skip(entry.model_path, run_dir / f"{name}.pt")
    metrics = {**entry.metrics, "source": "cache", "cache_key": entry.key}
    log.info(
        "%s: %s reused from the cache (key %s, built %s), test acc %.2f%%",
        name,
        model_name(model_cfg),
        entry.key,
        entry.meta.get("created"),
        100 * metrics["test_acc"],
    )
    return model, metrics


def teacher_logits(
    cfg: DictConfig,
    data: Data,
    runtime: Runtime,
    teacher: nn.Module,
    teacher_metrics: dict,
    run_dir: Path,
    cache: ArtefactCache | None,
) -> tuple[torch.Tensor | None, str]:
    """The teacher's logits on the student's training images, when they are the same every epoch.

    Without random augmentation the teacher sees the same inputs every epoch, so one pass gives every logit
    the student will ever need: rows in split order, looked up by sample index. They go into the artefact
    cache, keyed by the teacher's identity and the data, so the runs of a sweep share one pass. With random
    augmentation (or ``train.teacher_logits=online``) the teacher runs on each batch instead.
    """
    if cfg.train.teacher_logits == "online" or data.transform.augments or cfg.augment.name != "none":
        return None, "online"
    split_seed = cfg.dataset.get("split_seed", 0)
    student_data = with_train_subset(data, cfg.train.student.get("max_samples"), split_seed)
    split = student_data.train

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        logits, labels = predict(teacher, split, student_data, runtime, cfg.train.eval_batch_size)
        log.info("teacher logits for %d training images in %.1f s", len(split), time.perf_counter() - started)
        return logits, labels

    identity = model_identity(teacher_metrics)
    if cache is None or identity is None or not distributed.is_main():  # other ranks: no shared temp file
        return compute()[0], "cached in memory"
    fields = {
        "code": TRAINING_CODE_VERSION,
        "teacher": identity,
        "dataset": dataset_identity(cfg.dataset),
        "split": "train",
        "max_samples": cfg.train.student.get("max_samples"),
        "amp": runtime.amp,
    }
    tmp = run_dir / ".teacher_logits.pt"

    def build() -> tuple[Path, dict]:
        logits, labels = compute()
        atomic_save({"logits": logits.cpu(), "labels": labels.cpu()}, tmp)
        return tmp, {"samples": len(split)}

    try:
        entry, _ = cache.fetch_or_build_here("teacher_logits", fields, build)
    finally:
        tmp.unlink(missing_ok=True)
    stored = read_state(entry.model_path, f"cache entry {entry.dir}")  # checksum-verified by the cache
    labels = getattr(split, "labels", None)  # in-memory splits: check the rows are this run's samples, in order
    if stored["logits"].shape[0] != len(split) or (
        labels is not None and not torch.equal(stored["labels"], labels.cpu())
    ):
        raise KdrunError(f"cache entry {entry.dir} holds logits of other samples than this run's; delete it")
    return stored["logits"].to(runtime.device), f"cached ({entry.key})"


def artefact_fields(stage: str, cfg: DictConfig, runtime: Runtime, model_cfg: Any = None) -> dict[str, Any]:
    """Everything that determines a trained teacher or baseline, and nothing else: the key of its cache entry.

    Not T, alpha or the loss (they only shape the distilled student), nor where the data lives, the device
    or the evaluation batch size.
    """
    default_cfg, recipe = (cfg.teacher, cfg.train.teacher) if stage == "teacher" else (cfg.student, cfg.train.student)
    model_cfg = default_cfg if model_cfg is None else model_cfg
    return {
        "code": TRAINING_CODE_VERSION,
        "objective": "ce",
        "dataset": dataset_identity(cfg.dataset),
        "model": architecture_cfg(model_cfg),
        "recipe": to_dict(recipe),
        "optim": to_dict(cfg.optim),
        "sched": to_dict(cfg.sched),
        "seed": int(cfg.seed),
        "amp": runtime.amp,
        **({"augment": to_dict(cfg.augment)} if stage == "baseline" and cfg.augment.name != "none" else {}),
    }


def train_stage(
    stage: str,
    model_cfg: DictConfig,
    objective: Objective,
    cfg: DictConfig,
    data: Data,
    runtime: Runtime,
    writer,
    run_dir: Path,
    teacher: nn.Module | None = None,
    teacher_logits: torch.Tensor | None = None,
    name: str | None = None,
) -> tuple[nn.Module, dict]:
    """Build, train and test one model; return its best-validation version and its metrics.json entry.

    The baseline and the distilled student are built and shuffled from the same seed, so they start from
    the same weights and see the same batches: the only difference is the objective.
    """
    name = name or stage
    recipe = cfg.train.teacher if stage == "teacher" else cfg.train.student
    data = with_train_subset(data, recipe.get("max_samples"), cfg.dataset.get("split_seed", 0))
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, data.spec, key=stage if stage != "baseline" else "student")
    log.info(
        "%s: %s, %.3fM parameters, %d epochs, batch %d, lr %g",
        name,
        model_name(model_cfg),
        count_params(model) / 1e6,
        recipe.epochs,
        recipe.batch_size,
        recipe.lr,
    )
    result = fit(
        name,
        model,
        objective,
        data,
        recipe,
        cfg.optim,
        cfg.sched,
        runtime,
        cfg.seed,
        writer,
        teacher,
        cfg.train.eval_batch_size,
        teacher_logits,
        state_path(run_dir, name),
        int(cfg.train.max_nonfinite_steps),
        build_mix(cfg.augment) if stage != "teacher" else None,
    )
    best = with_state(result.model, result.best_state)
    last_test = evaluate(result.model, data.test, data, runtime, cfg.train.eval_batch_size)
    best_test = evaluate(best, data.test, data, runtime, cfg.train.eval_batch_size)
    save_run_model(run_dir / f"{name}.pt", best, model_cfg, data.spec, epoch=result.best_epoch)
    return best, {
        "source": "trained",
        "cache_key": None,
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
    }


def run_config(cfg: DictConfig, runtime: Runtime) -> dict[str, Any]:
    """The ``config`` entry of metrics.json and the HParams of the run."""
    return {
        "dataset": cfg.dataset.name,
        "teacher": model_name(cfg.teacher),
        "student": model_name(cfg.student),
        "loss": model_name(cfg.loss),
        "augment": str(cfg.augment.get("name", "custom")),
        "T": float(cfg.T),
        "alpha": float(cfg.alpha),
        "seed": int(cfg.seed),
        "device": str(runtime.device),
        "amp": runtime.amp,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        "baseline": bool(cfg.baseline),
        "optim": model_name(cfg.optim),
        "sched": model_name(cfg.sched),
        "teacher_epochs": int(cfg.train.teacher.epochs),
        "student_epochs": int(cfg.train.student.epochs),
        "teacher_lr": float(cfg.train.teacher.lr),
        "student_lr": float(cfg.train.student.lr),
        "batch_size": int(cfg.train.student.batch_size),
    }


def save_run_model(path: Path, model: nn.Module, model_cfg: DictConfig, spec, **meta: Any) -> None:
    """``save_model`` into the run dir, by the process that writes the run's files (rank 0 of a distributed run)."""
    if distributed.is_main():
        save_model(path, model, model_cfg, spec, **meta)


def _link_or_skip(src: Path, dst: Path) -> None:
    """Give the run dir its ``<stage>.pt`` as a hard link to the cache entry (no copy); skip across filesystems.

    Rank 0 of a distributed run alone does it."""
    if not distributed.is_main():
        return
    try:
        dst.unlink(missing_ok=True)
        os.link(src, dst)
    except OSError:
        log.info("%s is not linked into the run dir (another filesystem); the model is %s", dst.name, src)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _hydra_output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
