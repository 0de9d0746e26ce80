"""Born-again networks over several generations: generation k's distilled student teaches generation k+1.

    python scripts/born_again.py --generations 3                        # digits, resnet20 -> resnet20 -> ...
    python scripts/born_again.py --generations 3 -- dataset=mnist dataset.root=../shared/data

Every generation is a real `kdrun experiment=born_again` run in <out>/gen<k>; from the second one on, the
teacher is the previous generation's student.safetensors (its best-validation weights). Prints one row per generation
and writes the same table to <out>/generations.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kdrun.reporting.report import gain_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/born_again"))
    parser.add_argument("overrides", nargs="*", help="kdrun overrides for every generation (after --)")
    args = parser.parse_args()
    if args.generations < 1:
        parser.error(f"--generations={args.generations} must be >= 1")
    kdrun = shutil.which("kdrun") or str(Path(sys.executable).with_name("kdrun"))
    rows = ["| generation | teacher | teacher test acc | student test acc (best val) | KD gain over baseline (last "
            "epoch) |", "|---|---|---|---|---|"]  # fmt: skip
    teacher = None
    for generation in range(1, args.generations + 1):
        run_dir = (args.out / f"gen{generation}").resolve()
        command = [kdrun, "experiment=born_again", f"hydra.run.dir={run_dir}", *args.overrides]
        if teacher is not None:
            command.append(f"teacher.checkpoint={teacher}")
        print(f"generation {generation}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            sys.exit(f"generation {generation} failed; its log is {run_dir / 'kdrun.log'}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        source = "trained" if teacher is None else f"gen{generation - 1} student"
        rows.append(
            f"| {generation} | {source} | {100 * metrics['teacher']['test_acc_best']:.2f}% | "
            f"{100 * metrics['student']['test_acc_best']:.2f}% | "
            f"{gain_line(metrics) if 'kd_gain' in metrics else '-'} |"
        )
        teacher = run_dir / "student.safetensors"
    table = "\n".join(rows) + "\n"
    (args.out / "generations.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
