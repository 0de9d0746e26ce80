"""The table of Hinton et al. (2015, section 3, MNIST) from a sweep of `experiment=hinton_mnist` over seeds.

    kdrun -m experiment=hinton_mnist dataset.root=../shared/data seed=0,1,2 hydra.sweep.dir=outputs/hinton
    python scripts/hinton_table.py outputs/hinton

Prints (and writes to <sweep dir>/hinton_table.md) the test errors out of the test split's images of the teacher,
the student trained alone and the distilled student, per seed and as mean ± std, next to the paper's 67 / 146 / 74,
with each job's wall time (first to last line of its log) and its training time. Every stage is counted at its last
epoch; the teacher is also counted with its best-validation weights, which are the weights the student learns from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path

PAPER = {"teacher": 67, "baseline": 146, "student": 74}
STAGES = ("teacher", "baseline", "student")


def errors(entry: dict, n: int, key: str = "test_acc") -> int:
    return round((1 - entry[key]) * n)


def wall_time_s(log: Path) -> float:
    """Seconds from the first to the last line of a kdrun log (``[2026-11-25 14:29:42,538][...``)."""
    stamps = [line[1:24] for line in log.read_text().splitlines() if line.startswith("[20")]
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    runs = [(json.loads(p.read_text()), p.parent) for p in sorted(args.sweep_dir.glob("*/metrics.json"))]
    if not runs:
        sys.exit(f"no finished run (metrics.json) under {args.sweep_dir}")
    runs.sort(key=lambda r: r[0]["config"]["seed"])
    n = runs[0][0]["config"]["test_images"]
    lines = [
        "| seed | teacher errors | teacher distilled from (best val) | student alone errors | distilled errors | "
        "distilled < alone | wall time | training time (teacher + baseline + student) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    counts: dict[str, list[int]] = {s: [] for s in (*STAGES, "teacher_best")}
    for metrics, run_dir in runs:
        row = {s: errors(metrics[s], n) for s in STAGES}
        row["teacher_best"] = errors(metrics["teacher"], n, "test_acc_best")
        for s, v in row.items():
            counts[s].append(v)
        train = sum(metrics[s]["train_time_s"] for s in STAGES)
        lines.append(
            f"| {metrics['config']['seed']} | {row['teacher']} | {row['teacher_best']} | {row['baseline']} | "
            f"{row['student']} | "
            f"{'yes' if row['student'] < row['baseline'] else 'no'} | {wall_time_s(run_dir / 'kdrun.log') / 60:.1f} min"
            f" | {train / 60:.1f} min |"
        )
    cells = [
        f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]}"
        for v in (counts[s] for s in ("teacher", "teacher_best", "baseline", "student"))
    ]
    lines.append(f"| **mean** | {cells[0]} | {cells[1]} | {cells[2]} | **{cells[3]}** | | | |")
    lines.append(f"| paper | {PAPER['teacher']} | | {PAPER['baseline']} | {PAPER['student']} | | | |")
    table = "\n".join(lines) + (
        f"\n\nErrors out of {n} test images, each stage at its last epoch; the student learns from the teacher's "
        "best-validation weights, counted in the second column.\n"
    )
    print(table)
    (args.sweep_dir / "hinton_table.md").write_text(table)


if __name__ == "__main__":
    main()
