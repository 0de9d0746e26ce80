"""Documented experiment recipes: born-again self-distillation over generations."""

import json
import subprocess
import sys

from hydra import compose, initialize_config_module

from tests.conftest import REPO


def test_born_again_recipe_composes_a_self_distillation():
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=born_again", "train.teacher.epochs=7"])
    assert cfg.teacher.name == cfg.student.name == "resnet20"
    assert cfg.alpha == 0.0 and cfg.train.student.epochs == 7 and cfg.train.student.max_samples is None


def test_born_again_generations_chain_each_student_into_the_next_teacher(tmp_path):
    out = tmp_path / "ban"
    quick = ["train.teacher.epochs=2", "train.progress=false", "cache=off", "report.latency_repeats=2"]
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
