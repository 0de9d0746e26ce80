"""What pruning buys an Optuna search: the same search over T and alpha without and with pruners, one after another.

    python scripts/bench_pruning.py                                  # digits, 20 trials, the shipped median pruner
    python scripts/bench_pruning.py --pruner median successive_halving   # any conf/hydra/sweeper/pruner/ options

Every search is the real ``kdrun -m hparams_search=optuna_T_alpha`` command (TPE, sampler seed 0, the same trial
budget), each with a study of its own, in a scratch folder (``--workdir``: an earlier bench's studies there are
replaced, its artefact cache reused). A warm-up run first fills the cache with the teacher, the baseline and the
teacher's logits, which do not depend on T or alpha, so no search pays for them. It prints each search's wall time,
its ratio to the unpruned search's, each best objective (the distilled student's best validation accuracy over the
completed trials) and, as the yardstick of "the same result", the seed noise of the objective: the unpruned
search's best point trained again with ``--noise-seeds`` other seeds (teacher and baseline included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

KDRUN = Path(sys.executable).with_name("kdrun")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of each search")
    parser.add_argument(
        "--pruner", nargs="+", default=["median"], help="hydra/sweeper/pruner option(s): one pruned search each"
    )
    parser.add_argument("--student-samples", default=None, help="dataset.student_max_samples (default: digits' 100)")
    parser.add_argument("--epochs", type=int, default=None, help="train.student.epochs (default: the dataset's)")
    parser.add_argument("--noise-seeds", type=int, default=2, help="seeds of the noise estimate, besides seed 0")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--keep-report", action="store_true", help="keep each job's evaluation report (slower)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides, every run")
    parser.add_argument(
        "--pruner-set", action="append", default=[], metavar="KEY=VALUE", help="a pruner setting (pruned searches)"
    )
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials {args.trials}: a search needs at least 1 trial")
    return args


def kdrun(args: list[str], cwd: Path, log: Path) -> float:
    """Run the kdrun command; return its wall time in seconds. Its output goes to ``log``; a failure stops here."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([str(KDRUN), *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"kdrun {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return elapsed


def search(name: str, pruner: str, common: list[str], args: argparse.Namespace, work: Path) -> tuple[float, Any]:
    """One search of ``args.trials`` trials in a study of its own; its wall time and its study."""
    storage = f"sqlite:///{work / 'studies' / f'{name}.db'}"
    settings = [f"hydra.sweeper.pruner.{s}" for s in args.pruner_set] if pruner != "none" else []
    overrides = [
        "-m",
        "hparams_search=optuna_T_alpha",
        f"hydra/sweeper/pruner={pruner}",
        *settings,
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweep.dir={work / name}",
        *common,
    ]
    seconds = kdrun(overrides, work, work / f"{name}.log")
    return seconds, optuna.load_study(study_name=name, storage=storage)


def seed_noise(best: dict[str, float], common: list[str], args: argparse.Namespace, work: Path) -> list[float]:
    """The objective at ``best`` (T, alpha) for seeds 1..noise_seeds (each with its own teacher and baseline)."""
    if args.noise_seeds < 1:
        return []
    seeds = ",".join(str(s) for s in range(1, args.noise_seeds + 1))
    sweep = work / "noise"
    point = [f"T={best['T']}", f"alpha={best['alpha']}", f"seed={seeds}"]
    kdrun(["-m", *point, *common, f"hydra.sweep.dir={sweep}"], work, work / "noise.log")
    return [json.loads(p.read_text())["objective"] for p in sorted(sweep.glob("*/metrics.json"))]


def counts(study: Any) -> str:
    """complete/pruned/failed trials of the study."""
    states = [t.state.name.lower() for t in study.trials]
    return "/".join(str(states.count(s)) for s in ("complete", "pruned", "fail"))


def main() -> None:
    args = parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="kdrun-bench-pruning-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("pruned_*"), *(work / name for name in ("studies", "unpruned", "noise"))]:
        shutil.rmtree(old, ignore_errors=True)  # an earlier bench's; its artefact cache is kept
    common = ["train.progress=false"]
    common += [] if args.student_samples is None else [f"dataset.student_max_samples={args.student_samples}"]
    common += [] if args.epochs is None else [f"train.student.epochs={args.epochs}"]
    common += [] if args.keep_report else ["report.enabled=false"]
    common += args.set
    print(f"workdir {work}\nkdrun settings of every run: {' '.join(common)}")
    print(f"pruned searches: {', '.join(args.pruner)} {' '.join(args.pruner_set)}".rstrip())
    warm = kdrun([*common, f"hydra.run.dir={work / 'warmup'}"], work, work / "warmup.log")
    print(f"warm-up run (teacher, baseline and teacher logits into the cache): {warm:.1f} s")
    rows = []
    for name, pruner in [("unpruned", "none"), *((f"pruned_{p}", p) for p in args.pruner)]:
        seconds, study = search(name, pruner, common, args, work)
        rows.append((name, pruner, seconds, study))
        print(f"{name} search done in {seconds:.1f} s ({counts(study)} complete/pruned/failed)", flush=True)
    compare(rows, args, common, work)


def best_of(study: Any) -> Any:
    """The best completed trial (a pruned trial's value is that of a shorter training), or None."""
    return study.best_trial if any(t.state.name == "COMPLETE" for t in study.trials) else None


def compare(rows: list[tuple[str, str, float, Any]], args: argparse.Namespace, common: list[str], work: Path) -> None:
    """The table of the searches, each pruned one's time ratio and best objective against the unpruned one's, and
    the seed noise of the objective."""
    print(f"\n{args.trials} trials each, TPE seed 0, T in [1, 10], alpha in [0, 1], dataset digits")
    print(f"{'search':26} {'pruner':20} {'wall s':>8} {'c/p/f':>8} {'best val acc':>13}  best T, alpha")
    for name, pruner, seconds, study in rows:
        best = best_of(study)
        shown = "no trial completed"
        if best is not None:
            shown = f"{best.value:13.4f}  {best.params['T']:.3f}, {best.params['alpha']:.3f} (trial {best.number})"
        print(f"{name:26} {pruner:20} {seconds:8.1f} {counts(study):>8} {shown}")
    (_, _, plain, plain_study), *pruned_rows = rows
    plain_best = best_of(plain_study)
    for name, _, seconds, study in pruned_rows:
        best = best_of(study)
        difference = "" if best is None or plain_best is None else f"{100 * (best.value - plain_best.value):+.2f}"
        print(f"{name}: time ratio to unpruned {seconds / plain:.3f}; best objective - unpruned's: {difference} points")
    if plain_best is None:
        return
    others = seed_noise(plain_best.params, common, args, work)
    if others:
        values = [plain_best.value, *others]
        listed, std = ", ".join(f"{v:.4f}" for v in values), statistics.stdev(values)
        print(f"seed noise at the unpruned best point (seeds 0-{len(others)}): {listed}; std {100 * std:.2f} points")


if __name__ == "__main__":
    main()
