"""What distillation bought: accuracy, fidelity to the teacher, calibration, and what each model costs.

Fidelity follows Stanton et al. (NeurIPS 2021): top-1 agreement with the teacher and the mean
KL(teacher || student) at T=1, next to accuracy, which alone hides how closely a student matches.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kdrun.core.modes import eval_mode
from kdrun.data import Data, DataSpec, Split
from kdrun.models import count_params
from kdrun.models.checkpoint import find_model_file, weights_size
from kdrun.training.predict import predict
from kdrun.training.runtime import Runtime

QUARTILES = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)


def prediction_metrics(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None, bins: int = 15
) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy, expected calibration error (``bins`` equal-width bins, L1) and, given
    the teacher's logits for the same samples, top-1 agreement and mean KL(teacher || student) at T=1."""
    # imported where used, as in kdrun.training.predict: importing torchmetrics imports torchvision
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    out: dict[str, Any] = {
        "acc": multiclass_accuracy(logits, labels, num_classes, average="micro").item(),
        "top5": (
            multiclass_accuracy(logits, labels, num_classes, top_k=5, average="micro").item()
            if num_classes > 5
            else None
        ),
        "per_class_acc": multiclass_accuracy(logits, labels, num_classes, average=None).tolist(),
        "ece": multiclass_calibration_error(logits, labels, num_classes, n_bins=bins, norm="l1").item(),
    }
    if teacher_logits is not None:
        teacher_logits = teacher_logits.float().cpu()
        out["agreement"] = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
        out["kl_to_teacher"] = F.kl_div(
            F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), log_target=True, reduction="batchmean"
        ).item()
    return out


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per confidence bin (equal width on [0, 1]): mean confidence, accuracy and sample count, for a diagram."""
    # on the CPU, as the other metrics: a weighted bincount has no deterministic CUDA kernel (deterministic=true)
    confidence, predicted = F.softmax(logits.float().cpu(), 1).max(1)
    correct = (predicted == labels.cpu()).float()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    count = torch.bincount(index, minlength=bins).float()
    mean_conf = torch.bincount(index, confidence, minlength=bins) / count.clamp(min=1)
    accuracy = torch.bincount(index, correct, minlength=bins) / count.clamp(min=1)
    return {"confidence": mean_conf.tolist(), "accuracy": accuracy.tolist(), "count": count.long().tolist()}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts [true class, predicted class]."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(logits.float().cpu(), labels.cpu(), logits.shape[1])


def flops_per_image(model: nn.Module, spec: DataSpec) -> int:
    """Floating-point operations of one forward pass on one image (a multiply-add counts 2), by torch's counter."""
    device = next(model.parameters()).device
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement

MIN_FOR_IQR = 4  # the fewest measurements an interquartile range is read from (torch's Measurement shows none below)


@dataclass(frozen=True)
class Timing:
    """How forward passes are timed: ``warmup`` untimed passes, then ``torch.utils.benchmark``'s
    ``blocked_autorange`` for at least ``min_run_time`` seconds and ``min_measurements`` measurements (each the mean
    time of a block of passes whose size the library picks), on ``threads`` CPU threads (None: torch's count)."""

    warmup: int = 10
    min_run_time: float = 0.2
    min_measurements: int = MIN_FOR_IQR
    threads: int | None = None

    @classmethod
    def of(cls, cfg: Any) -> Timing:
        """Batch-1 timing from the run's ``report`` settings (an older run's config may lack the newer keys)."""
        threads = cfg.get("timing_threads")
        return cls(
            warmup=int(cfg.warmup),
            min_run_time=float(cfg.get("min_run_time", cls.min_run_time)),
            min_measurements=max(MIN_FOR_IQR, int(cfg.latency_repeats)),
            threads=None if threads is None else int(threads),
        )


def time_forward(model: nn.Module, spec: DataSpec, runtime: Runtime, batch_size: int, timing: Timing) -> Measurement:
    """Forward passes on a batch of ``batch_size`` timed by ``torch.utils.benchmark.Timer`` (which synchronises the
    accelerator), in eval mode with the run's device, AMP, memory format and compile settings: the library's
    ``Measurement`` (``times`` per pass, one per measurement; ``median`` and ``iqr`` in seconds)."""
    # Imported here: torch.utils.benchmark pulls in cpp_extension, which warns on stderr at import on a machine
    # with a CUDA toolkit but no GPU, and every kdrun command (also one refused in a line) would print it.
    from torch.utils.benchmark import Measurement, Timer

    forward = runtime.forward(runtime.prepare(model))
    x = runtime.inputs(
        torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size, device=runtime.device)
    )
    timer = Timer(
        "forward(x)", globals={"forward": forward, "x": x}, num_threads=timing.threads or torch.get_num_threads()
    )
    on_device = torch.cuda.device(runtime.device) if runtime.device.type == "cuda" else nullcontext()
    with eval_mode(model), torch.inference_mode(), runtime.autocast(), on_device:  # the timer syncs the current GPU
        for _ in range(timing.warmup):  # lazy initialisation, compilation, autotuning: not in the numbers
            forward(x)
        measurement = timer.blocked_autorange(min_run_time=timing.min_run_time)
        while len(measurement.times) < timing.min_measurements:  # a slow model: a few passes fill the time
            missing = (timing.min_measurements - len(measurement.times)) * measurement.median
            more = timer.blocked_autorange(min_run_time=missing)
            measurement = Measurement.merge([measurement, more])[0]
    return measurement


def cost_metrics(
    model: nn.Module, spec: DataSpec, runtime: Runtime, checkpoint: Path | None, cfg: Any
) -> dict[str, Any]:
    """Parameters, FLOPs per image, checkpoint size, and batch-1 latency and throughput at a large batch: medians
    and interquartile ranges over the measurements, their counts, and the CPU threads they ran on."""
    timing, batch = Timing.of(cfg), int(cfg.throughput_batch)
    latency = time_forward(model, spec, runtime, 1, timing)
    # One untimed pass warms the large batch (and the block-size search of the library warms it further).
    big = time_forward(
        model, spec, runtime, batch, replace(timing, warmup=min(timing.warmup, 1), min_measurements=MIN_FOR_IQR)
    )
    q1, median, q3 = torch.tensor([batch / t for t in big.times], dtype=torch.float64).quantile(QUARTILES).tolist()
    return {
        "params": count_params(model),
        "flops": flops_per_image(model, spec),
        "size_mb": weights_size(checkpoint) / 2**20 if checkpoint is not None and checkpoint.is_file() else None,
        "latency_ms_b1": 1000 * latency.median,
        "latency_ms_b1_iqr": 1000 * latency.iqr,
        "latency_ms_b1_n": len(latency.times),
        f"throughput_b{batch}": median,
        f"throughput_b{batch}_iqr": q3 - q1,
        f"throughput_b{batch}_n": len(big.times),
        "timing_threads": latency.task_spec.num_threads,
    }


def evaluate_models(
    models: dict[str, nn.Module],
    data: Data,
    split_name: str,
    runtime: Runtime,
    run_dir: Path,
    run_cfg: Any,
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """metrics.json's ``evaluation``: ``models`` (teacher, baseline, student) on the ``split_name`` split (test or
    val), with where it ran, as the run's ``report`` settings ask; also each model's (logits, labels)."""
    cfg, batch = run_cfg.report, int(run_cfg.train.eval_batch_size)
    split: Split = {"test": data.test, "val": data.val}[split_name]
    outputs = {stage: predict(model, split, data, runtime, batch) for stage, model in models.items()}
    teacher_logits = outputs["teacher"][0] if "teacher" in outputs else None
    report: dict[str, Any] = {
        "split": split_name,
        "samples": len(split),
        "device": str(runtime.device),
        "amp": runtime.amp,
        "ece_bins": int(cfg.ece_bins),
    }
    for stage, model in models.items():
        logits, labels = outputs[stage]
        report[stage] = {
            **prediction_metrics(logits, labels, teacher_logits, int(cfg.ece_bins)),
            **cost_metrics(model, data.spec, runtime, find_model_file(run_dir, stage), cfg),
        }
    if "teacher" in report and "student" in report:
        report["student_vs_teacher"] = ratios(report["teacher"], report["student"], int(cfg.throughput_batch))
    return report, outputs


def ratios(teacher: dict[str, Any], student: dict[str, Any], batch: int) -> dict[str, float | None]:
    """How much cheaper the student is: each a teacher / student ratio (> 1 means the student is cheaper)."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    throughput = f"throughput_b{batch}"
    return {
        "compression_params": ratio(teacher["params"], student["params"]),
        "compression_flops": ratio(teacher["flops"], student["flops"]),
        "compression_checkpoint": ratio(teacher["size_mb"], student["size_mb"]),
        "speedup_latency_b1": ratio(teacher["latency_ms_b1"], student["latency_ms_b1"]),
        f"speedup_throughput_b{batch}": ratio(student[throughput], teacher[throughput]),
    }
