"""The CIFAR-100 benchmark table of a sweep, beside the published numbers: ``kdrun-table <sweep dir>``.

Rows are teacher -> student pairs, in the two tables of the CRD paper (same and different architecture types);
columns are the teacher, the student trained alone (the baseline) and one per method (the layout's ``columns``,
then any other method the sweep ran). Each cell holds our accuracy, the published one and ours - published, once
for the last epoch (``test_acc``) and once for the best validation epoch (``test_acc_best``). The layout and the
published numbers (each source's README, commit and what it reports) are in ``published_cifar100.yaml``. A cell
without a finished run says ``pending`` (or ``failed``), never a number.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.io import write_text
from kdrun.core.keys import model_identity
from kdrun.reporting.sweep import Job, collect_jobs, sweep_dir_problem

LAYOUT = Path(str(files("kdrun.reporting") / "published_cifar100.yaml"))
METRICS = {"last": "test_acc", "best": "test_acc_best"}  # table -> the stage metric it shows
REFERENCE_COLUMNS = {"Teacher": "teacher", "Student": "baseline"}  # column label -> the metrics.json stage it shows
OUTPUTS = ("cifar100_table.md", "cifar100_table.csv")


@dataclass(frozen=True)
class Published:
    """One published number (percent) and where it is from."""

    value: float
    source: str  # a key of the layout's ``sources``


@dataclass(frozen=True)
class Layout:
    """The table's tables, columns and published numbers (see ``published_cifar100.yaml``)."""

    tables: dict[str, tuple[str, list[str]]]  # name -> (title, pairs)
    columns: list[tuple[str, str]]  # (label, loss option), the method columns in order
    sources: dict[str, dict[str, Any]]
    published: dict[tuple[str, str], Published]  # (pair, column label) -> the first source's number


@dataclass
class Cell:
    """What a sweep has for one pair and column: the values of its finished jobs (fractions) per metric."""

    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    failed: int = 0
    flagged: int = 0  # finished jobs whose stage was flagged collapsed or diverged

    @property
    def status(self) -> str:
        return "ok" if self.values["last"] else ("failed" if self.failed else "pending")


def load_layout(path: str | Path | None = None) -> Layout:
    """The layout and published numbers from ``path`` (default: the packaged ``published_cifar100.yaml``)."""
    path = Path(path) if path is not None else LAYOUT
    try:
        raw = yaml.safe_load(path.read_text())
        tables = {name: (str(t["title"]), [str(p) for p in t["pairs"]]) for name, t in raw["tables"].items()}
        columns = [(str(c["label"]), str(c["loss"])) for c in raw["columns"]]
        sources = {str(k): dict(v) for k, v in raw["sources"].items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise KdrunError(f"{path} is not a table layout: {type(e).__name__}: {e}") from e
    published: dict[tuple[str, str], Published] = {}
    for name, source in sources.items():
        for table in source.get("tables", {}).values():
            for label, values in table["rows"].items():
                for pair, value in zip(table["pairs"], values, strict=True):
                    if value is not None:
                        published.setdefault((pair, label), Published(float(value), name))
    return Layout(tables, columns, sources, published)


def job_pair_and_loss(job: Job) -> tuple[str | None, str | None]:
    """The job's ``<teacher>-<student>`` pair and its ``loss`` option (the choice, e.g. ``crd_kd``, not the method)."""
    config = OmegaConf.load(job.dir / ".hydra" / "config.yaml") if job.dir else None
    choices = _choices(job.dir / ".hydra" / "hydra.yaml") if job.dir else {}

    def name(group: str) -> str | None:
        value = choices.get(group) or job.params.get(group)
        if value is None and config is not None:
            value = OmegaConf.select(config, f"{group}.name", throw_on_resolution_failure=False)
        return None if value is None else str(value)

    teacher, student = name("teacher"), name("student")
    pair = f"{teacher}-{student}" if teacher and student else job.params.get("pair")
    return pair, name("loss")


def _choices(hydra_yaml: Path) -> dict[str, Any]:
    if not hydra_yaml.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices", throw_on_resolution_failure=False)
    return dict(choices) if choices is not None else {}


def collect_cells(jobs: Iterable[Job]) -> dict[tuple[str, str], Cell]:
    """(pair, column key) -> its cell: method columns keyed by loss option, ``Teacher`` and ``Student`` by label.

    A teacher or baseline shared by several jobs (one cache entry) counts once.
    """
    cells: dict[tuple[str, str], Cell] = {}
    seen: set[tuple[str, str, str]] = set()
    for job in jobs:
        pair, loss = job_pair_and_loss(job)
        if pair is None or loss is None:
            continue
        cell = cells.setdefault((pair, loss), Cell())
        if job.status == "failed":
            cell.failed += 1
        if job.status != "ok":
            continue
        _add(cell, job, "student")
        for label, stage in REFERENCE_COLUMNS.items():
            identity = model_identity(job.metrics, f"{stage}.") or job.name
            if (pair, label, identity) not in seen and f"{stage}.test_acc" in job.metrics:
                seen.add((pair, label, identity))
                _add(cells.setdefault((pair, label), Cell()), job, stage)
    return cells


def _add(cell: Cell, job: Job, stage: str) -> None:
    for metric, key in METRICS.items():
        value = job.metrics.get(f"{stage}.{key}")
        if value is not None:
            cell.values[metric].append(float(value))
    if job.metrics.get(f"{stage}.collapsed") or job.metrics.get(f"{stage}.diverged"):
        cell.flagged += 1


def table_columns(layout: Layout, cells: dict[tuple[str, str], Cell]) -> list[tuple[str, str]]:
    """(label, key) of every column: Teacher, Student, the layout's methods, then the sweep's other methods."""
    known = {loss for _, loss in layout.columns} | set(REFERENCE_COLUMNS)
    extra = sorted({key for _, key in cells} - known)
    return [(label, label) for label in REFERENCE_COLUMNS] + layout.columns + [(key, key) for key in extra]


def table_rows(layout: Layout, cells: dict[tuple[str, str], Cell]) -> list[tuple[str, list[str]]]:
    """(table name, pairs) in order; pairs the sweep ran outside the layout's tables form a table ``other``."""
    listed = {pair for _, pairs in layout.tables.values() for pair in pairs}
    other = sorted({pair for pair, _ in cells} - listed)
    rows = [(name, pairs) for name, (_, pairs) in layout.tables.items()]
    return rows + ([("other", other)] if other else [])


def cell_text(cell: Cell | None, metric: str, published: Published | None, tags: dict[str, str]) -> str:
    """``ours / published [source] (ours - published)``; ``pending`` or ``failed`` where ours is missing."""
    cell = cell or Cell()
    values = [100 * v for v in cell.values[metric]]
    ours = _mean_std(values) if values else cell.status
    if values and cell.flagged:
        ours += " !"
    if published is None:
        return f"{ours} / –"
    text = f"{ours} / {published.value:.2f} [{tags[published.source]}]"
    return f"{text} ({statistics.fmean(values) - published.value:+.2f})" if values else text


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f}±{statistics.stdev(values):.2f} (n={len(values)})"


def table_markdown(title: str, layout: Layout, jobs: list[Job]) -> str:
    """Both tables, for the last and the best validation epoch, with the sources and the sweep's recipe."""
    cells = collect_cells(jobs)
    columns, tags = table_columns(layout, cells), {name: str(s["tag"]) for name, s in layout.sources.items()}
    lines = [f"# CIFAR-100 benchmark: {title}", "", *_preamble(layout, jobs)]
    for metric, what in (("last", "last epoch (`test_acc`)"), ("best", "best validation epoch (`test_acc_best`)")):
        for name, pairs in table_rows(layout, cells):
            title = layout.tables[name][0] if name in layout.tables else "Other pairs"
            lines += ["", f"## {title}: {what}", ""]
            lines.append("| Teacher -> Student | " + " | ".join(label for label, _ in columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for pair in pairs:
                texts = [
                    cell_text(cells.get((pair, key)), metric, layout.published.get((pair, label)), tags)
                    for label, key in columns
                ]
                lines.append(f"| {pair.replace('-', ' -> ', 1)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def _preamble(layout: Layout, jobs: list[Job]) -> list[str]:
    lines = [
        "Each cell: ours / published [source] (ours - published), top-1 test accuracy in percent; ours is the mean "
        "(± std, n) over the cell's finished runs; `pending`: no finished run, `failed`: only failed runs; "
        "`!`: a run of the cell was flagged collapsed or diverged (its numbers are not a result).",
        "",
        "Published:",
    ]
    for name, source in layout.sources.items():
        commits = ", ".join(str(c)[:12] for c in source.get("commits", []))
        lines.append(
            f"- [{source['tag']}] {name}: {source['repo']} {source['file']} ({source['section']}; commit {commits}); "
            f"reports the {source['reports']}. {source.get('note', '')}".rstrip()
        )
    lines += ["", *_recipe_lines(jobs)]
    return lines


def _recipe_lines(jobs: list[Job]) -> list[str]:
    """What the finished jobs ran (dataset, epochs), with a warning where it is not the published recipe."""
    done = [job for job in jobs if job.status == "ok"]
    counts = {s: sum(job.status == s for job in jobs) for s in ("ok", "failed", "incomplete", "pending")}
    lines = [f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    datasets = sorted({str(job.metrics.get("config.dataset")) for job in done})
    epochs = sorted(
        {int(job.metrics["config.student_epochs"]) for job in done if "config.student_epochs" in job.metrics}
    )
    if done:
        lines.append(f"Datasets: {', '.join(datasets)}; student epochs: {', '.join(map(str, epochs))}.")
    if datasets and datasets != ["cifar100"] or epochs and epochs != [240]:
        lines.append(
            "**Not the published recipe** (CIFAR-100, 240 epochs: `experiment=cifar100`): these numbers are not "
            "comparable with the published ones."
        )
    return lines


def table_csv(layout: Layout, jobs: list[Job]) -> str:
    """The same tables as CSV: a row per table, metric and pair; per column ours, published, source, difference, n.

    Ours is a fraction-free percentage (mean over runs), or ``pending`` / ``failed``; never a number for a missing run.
    """
    cells = collect_cells(jobs)
    columns = table_columns(layout, cells)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    per_column = ("", " published", " source", " diff", " n")
    writer.writerow(
        ["table", "metric", "pair", "teacher", "student", *(f"{c}{s}" for c, _ in columns for s in per_column)]
    )
    for metric in METRICS:
        for name, pairs in table_rows(layout, cells):
            for pair in pairs:
                teacher, _, student = pair.partition("-")
                row: list[Any] = [name, metric, pair, teacher, student]
                for label, key in columns:
                    row += _csv_cell(cells.get((pair, key)) or Cell(), metric, layout.published.get((pair, label)))
                writer.writerow(row)
    return out.getvalue()


def _csv_cell(cell: Cell, metric: str, published: Published | None) -> list[Any]:
    values = [100 * v for v in cell.values[metric]]
    ours: Any = round(statistics.fmean(values), 4) if values else cell.status
    pub: Any = published.value if published else ""
    diff: Any = round(statistics.fmean(values) - published.value, 4) if values and published else ""
    return [ours, pub, published.source if published else "", diff, len(values)]


def write_table(
    sweep_dirs: str | Path | Sequence[str | Path],
    layout_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Write ``cifar100_table.md`` and ``cifar100_table.csv`` from the jobs of one or more sweep dirs (e.g. a later
    sweep of one method), into the first sweep dir or ``out_dir``; return their paths."""
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, str | Path) else [Path(d) for d in sweep_dirs]
    for sweep_dir in dirs:
        problem = sweep_dir_problem(sweep_dir)
        if problem:
            raise KdrunError(problem)
    layout, jobs = load_layout(layout_path), [job for d in dirs for job in collect_jobs(d)]
    out = Path(out_dir) if out_dir is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = (out / name for name in OUTPUTS)
    title = ", ".join(str(d) for d in dirs)
    for path, text in ((md, table_markdown(title, layout, jobs)), (csv_path, table_csv(layout, jobs))):
        write_text(path, text)
    return [md, csv_path]


def main(argv: list[str] | None = None) -> None:
    """``kdrun-table <sweep dir>... [--layout FILE] [--out DIR]``: write the table files and print the markdown."""
    parser = argparse.ArgumentParser(
        prog="kdrun-table",
        description="The CIFAR-100 KD benchmark table of a kdrun sweep, beside the published numbers.",
    )
    parser.add_argument(
        "sweep_dirs", type=Path, nargs="+", help="the multirun dir(s) of kdrun -m experiment=cifar100 ..."
    )
    parser.add_argument("--layout", type=Path, default=None, help=f"the table layout and numbers (default: {LAYOUT})")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the files (default: the first sweep dir)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_table(args.sweep_dirs, args.layout, args.out)
    except KdrunError as e:
        print(f"kdrun-table: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(written[0].read_text())
    print("written:", *written, sep="\n  ")
