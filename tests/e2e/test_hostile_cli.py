"""A sample of the hostile-value table (tests/unit/test_hostile_config.py) through kdrun's command-line entry point:
exit 2 with one line naming the key, no traceback, no training and nothing written to the cache; or a finished run."""

from __future__ import annotations

import pytest

from tests.conftest import BRIEF_TIMING, run_kdrun

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


@pytest.mark.parametrize("overrides,named", REFUSED, ids=[o for o, _ in REFUSED])
def test_refused_before_any_work(tmp_path, overrides, named):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*overrides.split(), f"hydra.run.dir={run_dir}", f"cache.dir={cache}"]
    result = run_kdrun(args, cwd=tmp_path, timeout=120)
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
