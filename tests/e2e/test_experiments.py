"""Documented experiment recipes run for real: born-again self-distillation over generations."""

import json
import subprocess
import sys

from tests.conftest import BRIEF_TIMING, REPO


def test_born_again_generations_chain_each_student_into_the_next_teacher(tmp_path):
    out = tmp_path / "ban"
    quick = ["train.teacher.epochs=2", "train.progress=false", "cache=off", "report.latency_repeats=2"]
    quick += BRIEF_TIMING
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "born_again.py"),
            "--generations",
            "2",
            "--out",
            str(out),
            "--",
            *quick,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((out / "gen1" / "metrics.json").read_text())
    second = json.loads((out / "gen2" / "metrics.json").read_text())
    assert first["teacher"]["source"] == "trained" and second["teacher"]["source"] == "checkpoint"
    # Generation 2's teacher is generation 1's saved (best-validation) student.
    assert second["teacher"]["test_acc_best"] == first["student"]["test_acc_best"]
    assert first["config"]["teacher"] == first["config"]["student"] == "resnet20"
    table = (out / "generations.md").read_text()
    assert "| 2 | gen1 student |" in table
    gain = 100 * second["kd_gain"]
    assert f"| {gain:+.2f} points, 95% CI [{100 * second['kd_gain_ci95'][0]:+.2f}, " in table  # its error bar
