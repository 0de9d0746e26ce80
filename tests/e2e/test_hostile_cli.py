"""A sample of the hostile-value table (tests/unit/test_hostile_config.py) through kdrun's command-line entry point:
exit 2 with one line naming the key, no traceback, no training and nothing written to the cache (the refused rows
run in one process, tests/kdrun_batch.py, which tests/e2e/test_cli.py checks against separate ``kdrun`` processes);
or, as a real ``kdrun`` process, a finished run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BRIEF_TIMING, run_kdrun, run_kdrun_batch_once

REFUSED = [
    ("T=nan", "T=nan"),
    ("alpha=-inf", "alpha=-inf"),
    ("train.student.lr=nan", "train.student.lr=nan"),
    ("dataset.split_seed=1e30", "dataset.split_seed="),
    ("dataset.test_fraction=abc", "dataset.test_fraction='abc'"),
    ("loss=dkd loss.warmup_epochs=-3", "loss.warmup_epochs=-3"),
    ("sched.warmup_epochs=-1", "sched.warmup_epochs=-1"),
    ("train.teacher.max_samples=-1", "train.teacher.max_samples=-1"),
    ("dataset=fake dataset.num_classes=1", "dataset.num_classes=1"),
    ("+dataset.image_size=9", "dataset.image_size is not an option of dataset=digits"),
    ("train.student.max_samples=1", "train.student.max_samples=1"),
]


@pytest.fixture(scope="module")
def refused_results(tmp_path_factory) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Each row run from a folder of its own, into its ``run`` and ``cache`` subfolders."""

    def rows(folder: Path) -> list[list[str]]:
        return [
            [*overrides.split(), f"hydra.run.dir={folder / str(i) / 'run'}", f"cache.dir={folder / str(i) / 'cache'}"]
            for i, (overrides, _) in enumerate(REFUSED)
        ]

    return run_kdrun_batch_once(tmp_path_factory, "hostile-refused", rows)


@pytest.mark.parametrize("row", range(len(REFUSED)), ids=[o for o, _ in REFUSED])
def test_refused_before_any_work(refused_results, row):
    (folder, result), named = refused_results[row], REFUSED[row][1]
    run_dir, cache = folder / "run", folder / "cache"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and named in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not cache.exists()
    log = (run_dir / "kdrun.log").read_text() if (run_dir / "kdrun.log").is_file() else ""
    assert "epoch 1/" not in log and not (run_dir / "metrics.json").exists()


def test_a_hostile_but_valid_value_finishes(tmp_path):
    result = run_kdrun(
        [
            "alpha=0",
            "dataset.split_seed=0",
            "train.max_nonfinite_steps=0",
            "train.teacher.epochs=1",
            "train.student.epochs=1",
            *BRIEF_TIMING,
            f"hydra.run.dir={tmp_path / 'run'}",
            f"cache.dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
