"""scripts/hinton_table.py on a hand-made sweep: errors per stage, the teacher the student learned from, means."""

import json
import subprocess
import sys

from tests.conftest import REPO


def stage(acc, best):
    """A stage's metrics.json entry: test accuracy at the last epoch and of the best-validation weights."""
    return {"test_acc": acc, "test_acc_best": best, "train_time_s": 60.0}


def job(sweep, seed, teacher, baseline, student):
    run = sweep / f"seed={seed}"
    run.mkdir(parents=True)
    metrics = {
        "config": {"seed": seed, "test_images": 10000},
        "teacher": stage(*teacher),
        "baseline": stage(*baseline),
        "student": stage(*student),
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "kdrun.log").write_text(
        "[2026-12-01 10:00:00,000][kdrun][INFO] - start\n[2026-12-01 10:06:00,000][kdrun][INFO] - end\n"
    )


def test_the_table_counts_errors_and_the_best_validation_teacher(tmp_path):
    job(tmp_path, 1, (0.9920, 0.9917), (0.9851, 0.9850), (0.9889, 0.9885))
    job(tmp_path, 0, (0.9922, 0.9918), (0.9853, 0.9853), (0.9887, 0.9880))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "hinton_table.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "hinton_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| 0 | 78 | 82 | 147 | 113 | yes | 6.0 min | 3.0 min |")  # seeds in order
    assert rows[2].startswith("| 1 | 80 | 83 | 149 | 111 | yes |")
    assert "| **mean** | 79.0 ± 1.4 | 82.5 ± 0.7 | 148.0 ± 1.4 | **112.0 ± 1.4** |" in table
    assert "| paper | 67 | | 146 | 74 |" in table


def test_an_empty_sweep_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "hinton_table.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "no finished run" in result.stderr
