"""The run's final numbers: ``metrics.json``, the TensorBoard HParams entry and the printed summary."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from kdrun.core.io import write_json
from kdrun.reporting.stats import contains_zero, difference_interval, wilson_interval

STAGES = ("teacher", "baseline", "student")
# metrics.json values shown as HParams metrics (tag = "final/<stage>_<key>" or "final/<key>").
HPARAM_STAGE_METRICS = ("test_acc", "test_acc_best", "val_acc_best")
HPARAM_RUN_METRICS = ("kd_gain", "objective")
# From the evaluation section (the saved models on the test split): "final/<stage>_<key>".
HPARAM_EVAL_METRICS = ("agreement", "kl_to_teacher", "ece", "latency_ms_b1")


def assemble(
    config: dict[str, Any], stages: dict[str, dict[str, Any]], teacher_is_baseline: bool = False
) -> dict[str, Any]:
    """metrics.json as the output contract describes it: config, one entry per stage that ran, gain, objective.

    With ``config["test_images"]`` (n) each stage also gets ``test_acc_ci95``, and with a baseline the run gets
    ``kd_gain_ci95`` and ``teacher_lead`` with its interval (and ``teacher_lead_warning`` when the teacher is not
    ahead beyond noise; ``teacher_is_baseline``: the baseline is the teacher retrained, as in self-distillation,
    which it says).
    A student that a search's pruner stopped early makes the run ``pruned`` (and gives its ``pruned_epoch``): its
    numbers are those of the epochs it trained.
    """
    metrics: dict[str, Any] = {"config": config}
    metrics.update({name: dict(stages[name]) for name in STAGES if name in stages})
    n = config.get("test_images")
    if n:
        for name in STAGES:
            if name in stages:
                metrics[name]["test_acc_ci95"] = list(wilson_interval(stages[name]["test_acc"], n))
    if "baseline" in stages and "student" in stages:
        student, baseline = stages["student"]["test_acc"], stages["baseline"]["test_acc"]
        metrics["kd_gain"] = student - baseline
        if n:
            metrics["kd_gain_ci95"] = list(difference_interval(student, n, baseline, n))
    metrics["objective"] = stages["student"]["val_acc_best"]
    if stages["student"].get("stopped_epoch") is not None:  # only a search trial's pruner stops the student early
        metrics.update(pruned=True, pruned_epoch=stages["student"]["stopped_epoch"])
    if "baseline" in stages and "teacher" in stages:
        lead = teacher_lead(stages["teacher"]["test_acc"], stages["baseline"]["test_acc"], n, teacher_is_baseline)
        metrics.update(lead)
    return metrics


def teacher_lead(
    teacher_acc: float, baseline_acc: float, n: int | None, teacher_is_baseline: bool = False
) -> dict[str, Any]:
    """``teacher_lead`` (teacher - baseline test acc), its 95% interval over ``n`` test images, and the warning.

    The warning is there when the interval's low end is <= 0: the teacher may be no better than the student
    trained alone, so there is nothing to distil. Without ``n`` the lead itself (<= 0) decides. When the
    baseline is the teacher itself (self-distillation) the warning says so instead: a gain is then the
    method's own effect, not a stronger teacher's.
    """
    lead = teacher_acc - baseline_acc
    out: dict[str, Any] = {"teacher_lead": lead}
    interval = ""
    if n:
        low, high = difference_interval(teacher_acc, n, baseline_acc, n)
        out["teacher_lead_ci95"] = [low, high]
        interval = f", 95% CI [{100 * low:+.2f}, {100 * high:+.2f}]"
    if out.get("teacher_lead_ci95", [lead])[0] <= 0:
        why = (
            "the teacher is the student trained alone (the same model, recipe and seed: self-distillation), so it "
            "is no better than the baseline by construction: a gain is self-distillation's, not a stronger teacher's"
            if teacher_is_baseline
            else "the teacher is no better than the student alone: KD has nothing to transfer"
        )
        out["teacher_lead_warning"] = (
            f"{why} (teacher {100 * teacher_acc:.2f}% vs baseline {100 * baseline_acc:.2f}%, "
            f"lead {100 * lead:+.2f} points{interval})"
        )
    return out


def write_failure(run_dir: str | os.PathLike, error: str, exc: BaseException) -> None:
    """``failure.json`` in a failed job's dir: its one-line error, for the sweep summary."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_json(Path(run_dir) / "failure.json", {"error": error, "type": type(exc).__name__, "traceback": trace})


def hparam_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        for key in HPARAM_STAGE_METRICS:
            if stage in metrics and metrics[stage].get(key) is not None:
                out[f"final/{stage}_{key}"] = float(metrics[stage][key])
    out.update({f"final/{k}": float(metrics[k]) for k in HPARAM_RUN_METRICS if k in metrics})
    if "kd_gain_ci95" in metrics:  # the gain's error bar beside it, to sort runs by its low end
        out["final/kd_gain_ci95_low"], out["final/kd_gain_ci95_high"] = map(float, metrics["kd_gain_ci95"])
    evaluation = metrics.get("evaluation") or {}
    for stage in ("baseline", "student"):
        for key in HPARAM_EVAL_METRICS:
            if evaluation.get(stage, {}).get(key) is not None:
                out[f"final/{stage}_{key}"] = float(evaluation[stage][key])
    for key, value in (evaluation.get("student_vs_teacher") or {}).items():
        if value is not None:
            out[f"final/{key}"] = float(value)
    return out


def write_hparams(writer, metrics: dict[str, Any]) -> None:
    """One HParams entry for this run, written into the run's own event file (not a sub-run)."""
    from torch.utils.tensorboard.summary import hparams

    hparam_dict = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in metrics["config"].items()}
    metric_dict = hparam_metrics(metrics)
    experiment, session_start, session_end = hparams(hparam_dict, metric_dict)
    file_writer = writer._get_file_writer()
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    for tag, value in metric_dict.items():
        writer.add_scalar(tag, value)
    writer.flush()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _pct_ci(entry: dict[str, Any] | None) -> str:
    """A stage's last-epoch test accuracy with its 95% interval: ``97.50% [96.81, 98.07]``."""
    if not entry or entry.get("test_acc") is None:
        return "-"
    ci = entry.get("test_acc_ci95")
    return _pct(entry["test_acc"]) + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")


def lead_line(metrics: dict[str, Any]) -> str:
    """The teacher's lead over the baseline in points, with its interval when known."""
    return _difference(metrics["teacher_lead"], metrics.get("teacher_lead_ci95"))


def gain_line(metrics: dict[str, Any]) -> str:
    """The KD gain in points, with its interval when known, and "within noise" when that contains 0."""
    ci = metrics.get("kd_gain_ci95")
    return _difference(metrics["kd_gain"], ci) + (": within noise" if ci and contains_zero(*ci) else "")


def _difference(value: float, ci: list[float] | None) -> str:
    interval = f", 95% CI [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] (Newcombe)" if ci else ""
    return f"{100 * value:+.2f} points{interval}"


def summary_table(metrics: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    config = metrics["config"]
    rows = [("stage", "model", "params", "test acc", "test acc @best val", "best val acc", "time")]
    for stage in STAGES:
        if stage not in metrics:
            continue
        m = metrics[stage]
        model = config["teacher"] if stage == "teacher" else config["student"]
        rows.append(
            (
                f"{stage} ({m['source']})" if m["source"] != "trained" else stage,
                model,
                f"{m['params'] / 1e6:.3f}M",
                _pct_ci(m),
                _pct(m["test_acc_best"]),
                _pct(m["val_acc_best"]),
                f"{m['train_time_s']:.1f}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "kd_gain" in metrics:
        lines.append(f"KD gain (student - baseline test acc, last epoch): {gain_line(metrics)}")
    if "teacher_lead" in metrics:
        lines.append(f"teacher lead (teacher - baseline test acc, last epoch): {lead_line(metrics)}")
    if "teacher_lead_warning" in metrics:
        lines.append(f"WARNING: {metrics['teacher_lead_warning']}")
    if metrics.get("pruned"):
        lines.append(pruned_line(metrics))
    return "\n".join(lines)


def pruned_line(metrics: dict[str, Any]) -> str:
    """What a pruned run's numbers are."""
    epochs = metrics["student"].get("epochs")
    return (
        f"pruned: the search's pruner stopped the distilled student after epoch {metrics['pruned_epoch']} of {epochs}; "
        "its numbers are those of the epochs it trained"
    )


def _num(x: float | int | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _count(x: float | int | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return str(x)


def report_markdown(metrics: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """``report.md``: teacher | baseline | student side by side, student-vs-teacher ratios, per-class accuracy."""
    config, evaluation = metrics["config"], metrics["evaluation"]
    stages = [s for s in STAGES if s in evaluation]
    batch = next(int(k.rsplit("_b", 1)[1]) for k in evaluation[stages[0]] if k.startswith("throughput_b"))
    rows = [
        ("top-1 accuracy", "acc", _pct),
        ("top-5 accuracy", "top5", _pct),
        ("top-1 agreement with the teacher", "agreement", _pct),
        ("KL(teacher ‖ model), T=1", "kl_to_teacher", lambda x: _num(x, ".4f")),
        (f"expected calibration error ({evaluation['ece_bins']} bins)", "ece", lambda x: _num(x, ".4f")),
        ("parameters", "params", _count),
        ("FLOPs per image", "flops", _count),
        ("checkpoint size (MiB)", "size_mb", lambda x: _num(x, ".2f")),
        ("latency, batch 1 (ms, median [IQR])", "latency_ms_b1", lambda x: _num(x, ".2f")),
        (f"throughput, batch {batch} (img/s, median [IQR])", f"throughput_b{batch}", lambda x: _num(x, ",.0f")),
    ]
    models = {"teacher": config["teacher"], "baseline": config["student"], "student": config["student"]}
    lines = [
        f"# kdrun report: {config['dataset']}, {config['teacher']} -> {config['student']}",
        "",
        f"Loss `{config['loss']}`, T={config['T']}, alpha={config['alpha']}, seed {config['seed']}. "
        f"Evaluated on the {evaluation['split']} split ({evaluation['samples']} images) on {evaluation['device']} "
        f"(amp {evaluation['amp']}), with each stage's saved model (its best validation epoch).",
        "",
        "| | " + " | ".join(f"{s} ({models[s]})" for s in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for label, key, show in rows:
        shown = [show(evaluation[s].get(key)) + _spread(evaluation[s].get(f"{key}_iqr"), show) for s in stages]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    if any(metrics.get(s) for s in stages):  # absent in a kdrun-eval report
        cells = " | ".join(_pct_ci(metrics.get(s)) for s in stages)
        lines.append(f"| test accuracy, last epoch [95% CI] | {cells} |")
    lines += _timing_lines(evaluation, stages, batch)
    ratios = evaluation.get("student_vs_teacher")
    if ratios:
        lines += [
            "",
            "**Student vs teacher** (teacher / student; above 1 the student is cheaper): "
            + ", ".join(f"{k.replace('_', ' ')} {_num(v, '.2f')}x" for k, v in ratios.items())
            + ".",
        ]
    lines += _gain_lines(metrics)
    lines += ["", "## Per-class accuracy", "", "| class | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for c in range(len(evaluation[stages[0]]["per_class_acc"])):
        lines.append(f"| {c} | " + " | ".join(_pct(evaluation[s]["per_class_acc"][c]) for s in stages) + " |")
    if figures:
        lines += ["", "## Student figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    if metrics.get("export"):
        lines += [
            "",
            "## Export",
            "",
            "| format | file | max abs logit difference | checked with |",
            "|---|---|---|---|",
        ]
        for fmt, e in metrics["export"].items():
            lines.append(f"| {fmt} | {e['path']} | {e['max_abs_diff']:.2e} | {e['checked_with']} |")
    return "\n".join(lines) + "\n"


def _spread(iqr: float | None, show) -> str:
    """`` [IQR x]`` after a timed median; nothing for numbers that are not timed (or an older report)."""
    return "" if iqr is None else f" [{show(iqr)}]"


def _timing_lines(evaluation: dict[str, Any], stages: list[str], batch: int) -> list[str]:
    """How the timings were taken: the library, the threads and the number of measurements behind each median."""
    first = evaluation[stages[0]]
    if "timing_threads" not in first:
        return []
    counts = ", ".join(
        f"{s} {evaluation[s]['latency_ms_b1_n']} / {evaluation[s][f'throughput_b{batch}_n']}" for s in stages
    )
    return [
        "",
        f"Timings by `torch.utils.benchmark` (`blocked_autorange`) on {first['timing_threads']} CPU thread(s): the "
        "median and, in brackets, the interquartile range over measurements, each the mean time of a block of "
        f"forward passes (measurements at batch 1 / batch {batch}: {counts}). A wide IQR means a noisy machine.",
    ]


def _gain_lines(metrics: dict[str, Any]) -> list[str]:
    """report.md's KD gain, teacher lead and, when the teacher is not ahead beyond noise, the warning."""
    lines = []
    if "kd_gain" in metrics:
        lines += [
            "",
            f"**KD gain** (student - baseline test accuracy, last epoch): {gain_line(metrics)}.",
        ]
    if "teacher_lead" in metrics:
        lines += ["", f"**Teacher lead** (teacher - baseline test accuracy, last epoch): {lead_line(metrics)}."]
    if "teacher_lead_warning" in metrics:
        lines += ["", f"> **Warning:** {metrics['teacher_lead_warning']}."]
    if metrics.get("pruned"):
        lines += ["", f"> **{pruned_line(metrics).capitalize()}.**"]
    return lines


def write_report(run_dir: Path, metrics: dict[str, Any], outputs: dict, writer=None) -> None:
    """report.md and the student's reliability diagram and confusion matrix (PNG), also into TensorBoard."""
    from kdrun.reporting.evaluation import confusion_matrix, reliability_bins
    from kdrun.reporting.figures import close, confusion_figure, reliability_diagram, save

    evaluation = metrics["evaluation"]
    logits, labels = outputs["student"]
    figures = {
        "reliability": reliability_diagram(
            reliability_bins(logits, labels, evaluation["ece_bins"]), evaluation["student"]["ece"], "student"
        ),
        "confusion": confusion_figure(confusion_matrix(logits, labels), f"student, {evaluation['split']} split"),
    }
    files = {}
    for name, fig in figures.items():
        files[name] = f"student_{name}.png"
        save(fig, run_dir / files[name])
        if writer is not None:
            writer.add_figure(f"report/student_{name}", fig)  # closes the figure
        else:
            close(fig)
    text = report_markdown(metrics, files)
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir / "report.md")
    if writer is not None:
        writer.add_text("report", text)
