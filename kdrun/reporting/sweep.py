"""The summary of a Hydra multirun sweep: ``summary.csv``, ``summary.md`` and accuracy heatmaps in the sweep dir.

Also the ``kdrun-summary <sweep dir>`` command, which writes them for a sweep that is running or was cut short.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.io import write_text
from kdrun.core.keys import model_identity, role
from kdrun.reporting.heatmap import Marks, Point, plot_grid
from kdrun.reporting.stats import MeanInterval, contains_zero, t_interval

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
STATUSES = ("ok", "pruned", "failed", "incomplete", "pending")  # pruned: an Optuna pruner stopped its student early
METRIC_GROUPS = ("config", "teacher", "baseline", "student")  # column order of summary.csv; top-level keys last
GRID_AXES = ("T", "alpha", "seed")  # every other swept key gets its own heatmaps
FLAGS = ("collapsed", "diverged")  # a stage's metrics.json entry holds ``<flag>: true`` and ``flag_reason``
RUN_COLUMNS = ("teacher_lead", "teacher_lead_warning")  # summary.csv has them even when no job reported them
# summary.csv's last columns: the job's flagged stages, then its row's KD gain over seeds (seed pooled).
POOLED_COLUMNS = ("collapsed", "diverged", "gain_mean", "gain_std", "gain_n", "gain_ci95_low", "gain_ci95_high",
                  "within_noise")  # fmt: skip
# heatmap name -> (plotted metric, its colour centre, what it is)
HEATMAPS = {
    "test_acc": ("student.test_acc", "baseline.test_acc", "test acc"),
    "val_acc": ("student.val_acc_best", "baseline.val_acc_best", "best val acc"),
}


@dataclass
class Job:
    """One job of a sweep: its dir (None while pending), overrides, outcome and flattened ``metrics.json``."""

    dir: Path | None
    overrides: list[str]
    status: str  # one of STATUSES
    error: str = ""
    T: float | None = None
    alpha: float | None = None
    seed: int | None = None
    params: dict[str, str] = field(default_factory=dict)  # override key -> value string
    metrics: dict[str, Any] = field(default_factory=dict)  # dotted keys: "student.test_acc", "config.T", ...

    @property
    def name(self) -> str:
        return self.dir.name if self.dir else ""


def collect_jobs(sweep_dir: str | os.PathLike) -> list[Job]:
    """Every job of the sweep: its job dirs and, for a grid sweep, the grid points not started yet (``pending``)."""
    sweep_dir = Path(sweep_dir)
    return _collect(sweep_dir, _load_multirun(sweep_dir))


def write_summary(sweep_dir: str | os.PathLike, heatmaps: bool = True) -> list[Path]:
    """Write summary.csv, summary.md and (``heatmaps``) the heatmaps into the sweep dir (each atomically); return
    their paths."""
    sweep_dir = Path(sweep_dir)
    problem = sweep_dir_problem(sweep_dir)
    if problem:
        raise KdrunError(problem)
    multirun = _load_multirun(sweep_dir)
    jobs = _collect(sweep_dir, multirun)
    keys = swept_keys(jobs, multirun)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    write_text(csv_path, summary_csv(jobs, keys))
    pngs = write_heatmaps(sweep_dir, jobs, keys) if heatmaps else []
    write_text(md_path, summary_markdown(sweep_dir, jobs, keys, pngs))
    return [csv_path, md_path, *pngs]


def sweep_dir_problem(path: Path) -> str | None:
    """What makes ``path`` no sweep dir, or None."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    if not (path / "multirun.yaml").is_file() and not any(_is_job_dir(d) for d in path.iterdir()):
        return f"{path} is not a sweep dir: it has neither multirun.yaml nor job dirs (with .hydra/overrides.yaml)"
    return None


def swept_keys(jobs: list[Job], multirun: DictConfig | None) -> list[str]:
    """The sweep's override keys in command-line order, then any other override key whose value differs between jobs."""
    declared = list(dict.fromkeys(o.key_or_group for o in _sweep_overrides(multirun) if o.is_sweep_override()))
    seen = {key for job in jobs for key in job.params if role(key).names_run}  # not a search trial's number
    differing = sorted(k for k in seen - set(declared) if len({job.params.get(k) for job in jobs}) > 1)
    return declared + differing


def expand_grid(multirun: DictConfig | None) -> list[list[str]]:
    """Every job of a BasicSweeper sweep as its override strings, in the sweeper's order; [] for other sweeps."""
    if multirun is None or OmegaConf.select(multirun, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return []
    axes: dict[str, list[str]] = {}
    for override in _sweep_overrides(multirun):
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
            continue
        try:
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        except HydraException:  # glob(), which needs Hydra's config loader
            return []
    return [list(point) for point in itertools.product(*axes.values())]


def summary_csv(jobs: list[Job], keys: list[str]) -> str:
    """One row per job: job, status, error, the swept keys, every metric any job reported, then POOLED_COLUMNS.

    The gain columns are those of the job's row over seeds (see ``pooled_gains``), repeated on each of its jobs.
    """
    metric_keys = sorted({k for job in jobs for k in job.metrics} | set(RUN_COLUMNS), key=_metric_order)
    gains = pooled_gains(jobs, keys)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", "status", "error", *keys, *metric_keys, *POOLED_COLUMNS])
    for job in jobs:
        metrics = [job.metrics.get(k, "") for k in metric_keys]
        flagged = [";".join(stage for stage, f, _ in job_flags(job) if f == flag) for flag in FLAGS]
        gain = gains[pool_key(job, keys)]
        writer.writerow(
            [job.name, job.status, job.error, *(job.params.get(k, "") for k in keys), *metrics, *flagged]
            + _blank_none([gain.mean, gain.std, gain.n, gain.low, gain.high, gain.within_noise])
        )
    return out.getvalue()


def pool_key(job: Job, keys: list[str]) -> tuple[str, ...]:
    """The job's row in the pooled results: its swept values except ``seed``."""
    return tuple(job.params.get(k, "") for k in keys if k != "seed")


def pooled_gains(jobs: list[Job], keys: list[str]) -> dict[tuple[str, ...], MeanInterval]:
    """Per row (``pool_key``): the paired gain ``kd_gain`` of its ok jobs, its mean, std and t-interval.

    Each job's gain is student - baseline of the same seed, so the seeds' shared luck cancels. Flagged runs
    are kept in (a collapse is an outcome of the setting); the summary marks their rows.
    """
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(pool_key(job, keys), []).append(job)
    return {key: t_interval(_ok_values(group, "kd_gain")) for key, group in groups.items()}


def job_flags(job: Job) -> list[tuple[str, str, str]]:
    """(stage, flag, reason) for each flag set in the job's metrics.json, e.g. ("student", "collapsed", "...")."""
    return [
        (stage, flag, str(job.metrics.get(f"{stage}.flag_reason", "")))
        for stage in METRIC_GROUPS[1:]
        for flag in FLAGS
        if job.metrics.get(f"{stage}.{flag}")
    ]


def summary_markdown(sweep_dir: Path, jobs: list[Job], keys: list[str], heatmaps: list[Path]) -> str:
    """Counts, the teachers and baselines, one row per swept point (seeds pooled), then the jobs without results."""
    counted = {s: sum(job.status == s for job in jobs) for s in STATUSES}
    counts = ", ".join(f"{n} {s}" for s, n in counted.items() if n or s != "pruned")
    lines = [f"# Sweep summary: {sweep_dir}", "", f"{len(jobs)} jobs: {counts}", ""]
    lines += _reference_lines(jobs) + [""] + _results_table(jobs, [k for k in keys if k != "seed"])
    for status, heading in (
        ("pruned", "Pruned jobs (the search's pruner stopped the student early; not in the table's numbers)"),
        ("failed", "Failed jobs"),
        ("incomplete", "Incomplete jobs (still running or killed)"),
        ("pending", "Pending jobs (not started)"),
    ):
        listed = [job for job in jobs if job.status == status]
        if listed:
            lines += ["", f"## {heading}", ""] + [_job_line(job) for job in listed]
    lines += _flag_lines(jobs)
    if heatmaps:
        lines += ["", "## Heatmaps", ""] + [f"![{path.stem}]({path.name})" for path in heatmaps]
    return "\n".join(lines) + "\n"


def _by_point(jobs: list[Job], ok_only: bool = False) -> dict[Point, list[Job]]:
    """The jobs with a (T, alpha), grouped by it (only the ok ones with ``ok_only``)."""
    points: dict[Point, list[Job]] = {}
    for job in jobs:
        if job.T is not None and job.alpha is not None and (job.status == "ok" or not ok_only):
            points.setdefault((job.T, job.alpha), []).append(job)
    return points


def grid_values(jobs: list[Job], metric: str) -> tuple[dict[Point, float | None], set[Point]]:
    """Per (T, alpha) point: the mean of ``metric`` over its ok jobs (None: none); and the points whose jobs failed."""
    points = _by_point(jobs)
    values = {point: _mean_metric(group, metric) for point, group in points.items()}
    failed = {p for p, group in points.items() if values[p] is None and any(job.status == "failed" for job in group)}
    return values, failed


def grid_pruned(jobs: list[Job], values: dict[Point, float | None]) -> set[Point]:
    """The (T, alpha) points without a result whose jobs include a pruned one."""
    return {
        (job.T, job.alpha)
        for job in jobs
        if job.status == "pruned"
        and job.T is not None
        and job.alpha is not None
        and values.get((job.T, job.alpha)) is None
    }


def grid_flags(jobs: list[Job]) -> dict[Point, str]:
    """Per (T, alpha) point whose ok jobs include a flagged student: the note, e.g. ``1/3 collapsed``."""
    notes = {}
    for point, group in _by_point(jobs, ok_only=True).items():
        counts = {flag: sum(bool(job.metrics.get(f"student.{flag}")) for job in group) for flag in FLAGS}
        if any(counts.values()):
            notes[point] = ", ".join(f"{k}/{len(group)} {flag}" for flag, k in counts.items() if k)
    return notes


def grid_noise(jobs: list[Job]) -> set[Point]:
    """The (T, alpha) points whose KD gain is within noise (``within_noise`` of their ok jobs, seeds pooled)."""
    points = _by_point(jobs, ok_only=True)
    return {p for p, ok in points.items() if within_noise(ok, t_interval(_ok_values(ok, "kd_gain")))}


def colour_centre(jobs: list[Job], reference: str, values: dict[Point, float | None]) -> tuple[float, str]:
    """The heatmap's colour centre and how it was chosen: the mean baseline, else the median of the plotted values."""
    baseline = _mean_metric(jobs, reference)
    if baseline is not None:
        return baseline, f"centre: mean baseline {100 * baseline:.2f}%"
    plotted = [v for v in values.values() if v is not None]
    median = statistics.median(plotted) if plotted else 0.5
    return median, "centre: median of the plotted values (no baseline)"


def write_heatmaps(sweep_dir: Path, jobs: list[Job], keys: list[str]) -> list[Path]:
    """A test-accuracy and a validation-accuracy heatmap per combination of the swept keys other than T, alpha, seed."""
    extra = [k for k in keys if k not in GRID_AXES]
    combinations: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        combinations.setdefault(tuple(job.params.get(k, "") for k in extra), []).append(job)
    written = []
    for combination, group in combinations.items():
        label = ",".join(f"{k}={v}" for k, v in zip(extra, combination, strict=True))
        suffix = "__" + re.sub(r"[^\w.,=+-]", "_", label) if label else ""
        for name, (metric, reference, what) in HEATMAPS.items():
            values, failed = grid_values(group, metric)
            if not values:
                continue
            center, how = colour_centre(group, reference, values)
            title = f"distilled student {what}" + (f" ({label})" if label else "") + f"\n{how}"
            path = sweep_dir / f"heatmap_{name}{suffix}.png"
            noise = grid_noise(group) if name == "test_acc" else ()  # the gain is a test-accuracy difference
            marks = Marks(failed, grid_flags(group), grid_pruned(group, values), noise)
            written.append(plot_grid(values, marks, center, title, path, label=f"student {what}"))
    return written


def main(argv: list[str] | None = None) -> None:
    """``kdrun-summary <sweep dir>``: write the sweep's summary, print summary.md and the written files."""
    parser = argparse.ArgumentParser(
        prog="kdrun-summary", description="Write summary.csv, summary.md and heatmaps into a kdrun sweep dir."
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun dir (with multirun.yaml and one dir per job)")
    args = parser.parse_args(argv)
    try:
        written = write_summary(args.sweep_dir)
    except KdrunError as e:
        print(f"kdrun-summary: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(written[1].read_text())
    print("written:", *written, sep="\n  ")


def _collect(sweep_dir: Path, multirun: DictConfig | None) -> list[Job]:
    jobs = [_read_job(d) for d in sorted(sweep_dir.iterdir()) if _is_job_dir(d)]
    grid = expand_grid(multirun)
    if not grid:
        return jobs
    started = {frozenset(job.overrides): job for job in jobs}
    assert multirun is not None  # a grid comes from it
    keyed = [(point, frozenset(point)) for point in grid]
    in_grid = [started.pop(key) if key in started else _pending_job(point, multirun) for point, key in keyed]
    return in_grid + list(started.values())


def _load_multirun(sweep_dir: Path) -> DictConfig | None:
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    loaded = OmegaConf.load(path)
    return loaded if isinstance(loaded, DictConfig) else None


def _sweep_overrides(multirun: DictConfig | None) -> list[Override]:
    """The sweeper's ``params`` and the command-line overrides, parsed as the sweeper parses them."""
    if multirun is None:
        return []
    params = OmegaConf.select(multirun, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(multirun, "hydra.overrides.task") or [])
    return OverridesParser.create().parse_overrides(lines)


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() and (path / ".hydra" / "config.yaml").is_file()


def _read_job(job_dir: Path) -> Job:
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    status, error, metrics = _outcome(job_dir)
    coords = _coords(lambda key: OmegaConf.select(config, key, throw_on_resolution_failure=False))
    return Job(job_dir, overrides, status, error, **coords, params=_override_values(overrides), metrics=metrics)


def _pending_job(overrides: list[str], multirun: DictConfig) -> Job:
    """A grid point without a job dir; keys it does not override take the sweep's config values."""
    params = _override_values(overrides)

    def lookup(key: str) -> Any:
        return params.get(key, OmegaConf.select(multirun, key, throw_on_resolution_failure=False))

    return Job(None, overrides, "pending", **_coords(lookup), params=params)


def _outcome(job_dir: Path) -> tuple[str, str, dict[str, Any]]:
    """(status, error line, flattened metrics) from the job's metrics.json or failure.json."""
    for name in ("metrics.json", "failure.json"):
        path = job_dir / name
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return "failed", f"unreadable {name}: {e}", {}
        if name == "metrics.json":
            return "pruned" if content.get("pruned") else "ok", "", _flatten(content)
        return "failed", str(content.get("error", "")), {}
    return "incomplete", "", {}


def _override_values(overrides: list[str]) -> dict[str, str]:
    return {o.key_or_group: o.get_value_element_as_str() for o in OverridesParser.create().parse_overrides(overrides)}


def _coords(lookup: Callable[[str], Any]) -> dict[str, Any]:
    T, alpha, seed = (_number(lookup(key)) for key in GRID_AXES)
    return {"T": T, "alpha": alpha, "seed": None if seed is None else int(seed)}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _metric_order(key: str) -> tuple[int, str]:
    group = key.split(".", 1)[0] if "." in key else ""
    return (METRIC_GROUPS.index(group) if group in METRIC_GROUPS else len(METRIC_GROUPS), key)


def _blank_none(values: list[Any]) -> list[Any]:
    return ["" if v is None else v for v in values]


def _ok_values(jobs: list[Job], metric: str) -> list[float]:
    return [job.metrics[metric] for job in jobs if job.status == "ok" and job.metrics.get(metric) is not None]


def _mean_metric(jobs: list[Job], metric: str) -> float | None:
    values = _ok_values(jobs, metric)
    return statistics.fmean(values) if values else None


def _mean_std(values: list[float], signed: bool = False) -> str:
    """In percent or points: the value alone, or mean ± std (sample std) over several; '–' for none."""
    if not values:
        return "–"
    mean = f"{100 * statistics.fmean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):.2f}"


def _reference_lines(jobs: list[Job]) -> list[str]:
    """The teachers and baselines, each distinct model once (several seeds: mean ± std of its test acc, and n)."""
    lines = []
    for stage in ("teacher", "baseline"):
        distinct: dict[Any, dict[str, Any]] = {}
        for job in jobs:
            m = job.metrics
            if job.status in ("ok", "pruned") and f"{stage}.test_acc" in m:  # pruning stops the student only
                # Without an identity each seed's model is its own.
                identity = model_identity(m, f"{stage}.") or (
                    m.get(f"{stage}.model"),
                    m.get("config.seed"),
                    m[f"{stage}.test_acc"],
                )
                distinct.setdefault(identity, m)
        by_model: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
        for m in distinct.values():
            by_model.setdefault((m.get(f"{stage}.model"), m.get("config.dataset")), []).append(m)
        for (model, dataset), entries in by_model.items():
            accs = [m[f"{stage}.test_acc"] for m in entries]
            n = f" (n={len(accs)})" if len(accs) > 1 else ""
            keys = [str(m[f"{stage}.cache_key"]) for m in entries if m.get(f"{stage}.cache_key")]
            cached = f", cache key {', '.join(keys)}" if keys and len(keys) <= 5 else ""
            lines.append(f"- {stage} {model} on {dataset}: test acc {_mean_std(accs)}%{n}{cached}")
    return lines or ["- no teacher or baseline results yet"]


def _results_table(jobs: list[Job], axes: list[str]) -> list[str]:
    """One row per combination of ``axes`` (seeds pooled), best objective first, rows without results last."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.params.get(k, "") for k in axes), []).append(job)
    header = [*axes, "n ok", "objective: val acc %", "student test acc %", "KD gain (points)"]
    header += ["KD gain 95% CI (points)", "notes", "status"]
    rows = [header, ["---"] * len(header)]
    for values, group in sorted(groups.items(), key=lambda item: _rank(item[1])):
        ok = [job for job in group if job.status == "ok"]
        gain = t_interval(_ok_values(ok, "kd_gain"))
        rows.append(
            [
                *(_short(value) for value in values),
                str(len(ok)),
                _mean_std(_ok_values(ok, "objective")),
                _mean_std(_ok_values(ok, "student.test_acc")),
                _mean_std(_ok_values(ok, "kd_gain"), signed=True),
                _interval_cell(gain, ok),
                "; ".join(_row_notes(ok, gain) + _pruned_notes(group)),
                _group_status(group),
            ]
        )
    return ["| " + " | ".join(row) + " |" for row in rows]


def _interval_cell(gain: MeanInterval, ok: list[Job]) -> str:
    if gain.low is None or gain.high is None:
        run = _run_interval(ok, gain)
        if run is not None:  # one seed: the run's own interval over its test images
            return f"n=1: [{100 * run[0]:+.2f}, {100 * run[1]:+.2f}] over test images (Newcombe)"
        return "n=1: no interval" if gain.n == 1 else "–"
    return f"[{100 * gain.low:+.2f}, {100 * gain.high:+.2f}]"


def _run_interval(ok: list[Job], gain: MeanInterval) -> list[float] | None:
    """The ``kd_gain_ci95`` of a row whose gain comes from one run (runs older than that key have none)."""
    if gain.n != 1:
        return None
    (job,) = (job for job in ok if job.metrics.get("kd_gain") is not None)
    return job.metrics.get("kd_gain_ci95")


def within_noise(ok: list[Job], gain: MeanInterval) -> bool:
    """Whether a row's gain interval contains 0: over seeds, or one run's own ``kd_gain_ci95``."""
    run = _run_interval(ok, gain)
    return bool(gain.within_noise) if run is None else contains_zero(*run)


def _row_notes(ok: list[Job], gain: MeanInterval) -> list[str]:
    """What a pooled row must not hide: a gain within noise, flagged runs, a teacher no better than the baseline."""
    notes = ["**within noise**"] if within_noise(ok, gain) else []
    for flag in FLAGS:
        flagged = [job for job in ok if any(f == flag for _, f, _ in job_flags(job))]
        if flagged:
            stages = sorted({stage for job in flagged for stage, f, _ in job_flags(job) if f == flag})
            notes.append(f"**{len(flagged)} of {len(ok)} runs {flag}** ({', '.join(stages)})")
    warned = sum("teacher_lead_warning" in job.metrics for job in ok)
    if warned:
        notes.append(f"teacher no better than baseline ({warned} of {len(ok)} runs)")
    return notes


def _pruned_notes(group: list[Job]) -> list[str]:
    """A row's pruned runs: where one stopped and what it had reached, or how many of the row's runs were pruned."""
    pruned = [job for job in group if job.status == "pruned"]
    if len(pruned) == 1:
        m = pruned[0].metrics
        reached = f" (val acc {100 * m['objective']:.2f}% by then)" if m.get("objective") is not None else ""
        return [f"**pruned** after epoch {m.get('pruned_epoch')}{reached}"]
    return [f"**{len(pruned)} of {len(group)} runs pruned**"] if pruned else []


def _short(value: str) -> str:
    """A swept value for the table: a long float (from a continuous search) to 4 significant digits."""
    number = _number(value)
    return f"{number:.4g}" if number is not None and "." in value and len(value) > 6 else value


def _rank(group: list[Job]) -> tuple[int, int, float]:
    """Rows with results by objective, then by status (pruned ones by the objective they reached)."""
    objective = _mean_metric(group, "objective")
    if objective is not None:
        return 0, 0, -objective
    reached = [job.metrics.get("objective") or 0.0 for job in group if job.status == "pruned"]
    return 1, min(STATUSES.index(job.status) for job in group), -max(reached, default=0.0)


def _group_status(group: list[Job]) -> str:
    statuses = {job.status for job in group}
    if len(statuses) == 1:
        return statuses.pop()
    return f"{sum(job.status == 'ok' for job in group)}/{len(group)} ok"


def _flag_lines(jobs: list[Job]) -> list[str]:
    """The jobs with a collapsed or diverged stage, each flag with its reason; the teacher-lead warnings, once each."""
    lines = []
    for job in jobs:
        for stage, flag, reason in job_flags(job):
            lines.append(f"{_job_line(job)}: {stage} {flag}" + (f": {reason}" if reason else ""))
    if lines:
        lines = ["", "## Flagged jobs (collapsed or diverged)", "", *lines]
    warnings = Counter(str(job.metrics.get("teacher_lead_warning") or "") for job in jobs)
    del warnings[""]
    if warnings:
        lines += ["", "## Teacher no better than the baseline", ""]
        lines += [f"- {text} ({n} job{'s' if n > 1 else ''})" for text, n in warnings.items()]
    return lines


def _job_line(job: Job) -> str:
    where = f" in `{job.name}`" if job.dir else ""
    error = f": {job.error}" if job.error else ""
    if job.status == "pruned":
        m = job.metrics
        error = f": pruned after epoch {m.get('pruned_epoch')} of {m.get('student.epochs')}, best val acc by then "
        error += f"{_mean_std([m['objective']])}%" if m.get("objective") is not None else "–"
    shown = [o for o in job.overrides if not o.startswith("search.")]  # a trial's identity: its folder names it
    return f"- `{' '.join(shown)}`{where}{error}"


if __name__ == "__main__":
    main()
