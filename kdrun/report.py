"""The run's final numbers: ``metrics.json``, the TensorBoard HParams entry and the printed summary."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

STAGES = ("teacher", "baseline", "student")
# metrics.json values shown as HParams metrics (tag = "final/<stage>_<key>" or "final/<key>").
HPARAM_STAGE_METRICS = ("test_acc", "test_acc_best", "val_acc_best")
HPARAM_RUN_METRICS = ("kd_gain", "objective")


def assemble(config: dict[str, Any], stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """metrics.json as the output contract describes it: config, one entry per stage that ran, gain, objective."""
    metrics: dict[str, Any] = {"config": config}
    metrics.update({name: stages[name] for name in STAGES if name in stages})
    if "baseline" in stages and "student" in stages:
        metrics["kd_gain"] = stages["student"]["test_acc"] - stages["baseline"]["test_acc"]
    metrics["objective"] = stages["student"]["val_acc_best"]
    return metrics


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
                _pct(m["test_acc"]),
                _pct(m["test_acc_best"]),
                _pct(m["val_acc_best"]),
                f"{m['train_time_s']:.1f}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "kd_gain" in metrics:
        lines.append(f"KD gain (student - baseline test acc, last epoch): {100 * metrics['kd_gain']:+.2f} points")
    return "\n".join(lines)
