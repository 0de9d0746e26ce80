"""One run, top to bottom: data -> teacher -> baseline -> distilled student -> report."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from kdrun.core import distributed
from kdrun.core.io import write_json
from kdrun.core.signals import stop_on_signals
from kdrun.data import Data, build_data
from kdrun.models import model_name
from kdrun.pipeline.cache import ArtefactCache
from kdrun.pipeline.parallel import job_device
from kdrun.pipeline.preflight import preflight
from kdrun.pipeline.rundir import prepare_run_dir
from kdrun.pipeline.stages import RunContext, baseline_stage, student_stage, teacher_is_baseline, teacher_stage
from kdrun.pipeline.trial import trial_hook
from kdrun.reporting.evaluation import evaluate_models
from kdrun.reporting.export import check_formats, export_student
from kdrun.reporting.report import assemble, summary_table, write_hparams, write_report
from kdrun.training.runtime import Runtime, determinism_errors, resolve_runtime

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float:
    """Run the whole experiment that ``cfg`` describes; return the distilled student's best validation accuracy."""
    run_dir = Path(run_dir or _hydra_output_dir() or ".")
    with job_device(cfg.device) as device, stop_on_signals():
        runtime = resolve_runtime(
            device, cfg.amp, cfg.train.progress, cfg.channels_last, cfg.compile, cfg.get("deterministic", False)
        )
        with determinism_errors(runtime.deterministic):
            return _run(cfg, run_dir, runtime)


def _run(cfg: DictConfig, run_dir: Path, runtime: Runtime) -> float:
    main = distributed.is_main()  # only rank 0 of a distributed run writes files
    if main and prepare_run_dir(run_dir, cfg):
        log.info("%s holds an earlier attempt of this run: finished stages are kept, the rest resumes", run_dir)
    distributed.barrier()
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset, runtime.device)
    _log_setup(data, runtime)
    preflight(cfg, data)  # what needs the data or the models, before any training
    cache = ArtefactCache(cfg.cache.dir) if cfg.cache.enabled else None
    hook = trial_hook(cfg.get("search"), run_dir)  # None unless this run is a trial of an Optuna search
    writer = SummaryWriter(str(run_dir / "tb")) if main else None
    ctx = RunContext(cfg, data, runtime, run_dir, writer, cache, hook)
    stages: dict[str, dict[str, Any]] = {}
    try:
        teacher, stages["teacher"] = teacher_stage(ctx)
        models = {"teacher": teacher}
        if cfg.baseline:
            models["baseline"], stages["baseline"] = baseline_stage(ctx)
        models["student"], stages["student"] = student_stage(ctx, teacher, stages["teacher"])
        metrics = assemble(run_config(cfg, runtime, len(data.test)), stages, teacher_is_baseline(cfg, runtime.amp))
        if not main:
            return float(metrics["objective"])
        if "teacher_lead_warning" in metrics:
            log.warning("%s", metrics["teacher_lead_warning"])
        write_results(ctx, models, metrics)
    finally:
        if writer is not None:
            writer.close()
    log.info("results (%s):\n%s", run_dir / "metrics.json", summary_table(metrics))
    return float(metrics["objective"])


def write_results(ctx: RunContext, models: dict[str, nn.Module], metrics: dict[str, Any]) -> None:
    """metrics.json (first: an export that fails loses nothing), the evaluation report, any exports, HParams."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    outputs = None
    if cfg.report.enabled:
        started = time.perf_counter()
        metrics["evaluation"], outputs = evaluate_models(models, ctx.data, "test", ctx.runtime, run_dir, cfg)
        log.info("evaluation report in %.1f s", time.perf_counter() - started)
        for stage in models:  # the output contract's per-stage keys (of the saved, best-validation model)
            metrics[stage].update({k: metrics["evaluation"][stage][k] for k in stage_report_keys(cfg)})
    write_json(run_dir / "metrics.json", metrics)
    formats = check_formats(cfg.export)
    if formats:
        example = ctx.data.transform(next(iter(ctx.data.test.batches(64)))[0])
        metrics["export"] = export_student(models["student"], example, run_dir, formats)
        write_json(run_dir / "metrics.json", metrics)
    if outputs is not None:
        write_report(run_dir, metrics, outputs, ctx.writer)
    write_hparams(ctx.writer, metrics)


def _log_setup(data: Data, runtime: Runtime) -> None:
    spec = data.spec
    log.info(
        "dataset %s: %d train / %d val / %d test images, %d classes, %d x %d px x %d channels; "
        "device %s, amp %s, channels_last %s, compile %s",
        *(data.name, len(data.train), len(data.val), len(data.test), spec.num_classes, spec.image_size),
        *(spec.image_size, spec.in_channels, runtime.device, runtime.amp, runtime.channels_last, runtime.compile),
    )
    if distributed.world_size() > 1:
        log.info(
            "%d processes: each trains on its share of every batch (global batch size as configured)",
            distributed.world_size(),
        )


def stage_report_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The evaluation numbers that metrics.json also keeps inside each stage's entry, as the contract names them."""
    keys = (
        "agreement",
        "kl_to_teacher",
        "ece",
        "per_class_acc",
        "flops",
        "size_mb",
        "latency_ms_b1",
        "latency_ms_b1_iqr",
    )
    throughput = f"throughput_b{int(cfg.report.throughput_batch)}"
    return (*keys, throughput, f"{throughput}_iqr", "timing_threads")


def run_config(cfg: DictConfig, runtime: Runtime, test_images: int) -> dict[str, Any]:
    """The ``config`` entry of metrics.json and the HParams of the run; ``test_images``: the test split's size."""
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
        "deterministic": runtime.deterministic,
        "baseline": bool(cfg.baseline),
        "optim": model_name(cfg.optim),
        "sched": model_name(cfg.sched),
        "teacher_epochs": int(cfg.train.teacher.epochs),
        "student_epochs": int(cfg.train.student.epochs),
        "teacher_lr": float(cfg.train.teacher.lr),
        "student_lr": float(cfg.train.student.lr),
        "batch_size": int(cfg.train.student.batch_size),
        "test_images": int(test_images),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _hydra_output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
