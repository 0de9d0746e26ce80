"""Cluster sweeps through Hydra's launcher plugins: submitit runs a real sweep."""

from __future__ import annotations

import json

from tests.conftest import run_kdrun


def test_a_submitit_sweep_runs_every_job_and_trains_the_teacher_once(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_kdrun(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "T=2,4",
            "train.teacher.epochs=2",
            "train.student.epochs=2",
            "train.progress=false",
            "report.enabled=false",
            f"hydra.sweep.dir={sweep}",
            f"cache.dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.startswith("T="))
    assert len(runs) == 2 and (sweep / ".submitit").is_dir()  # the jobs went through submitit
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert sorted(m["teacher"]["source"] for m in metrics) == ["cache", "trained"]  # one training, one reuse
    assert "2 jobs: 2 ok, 0 failed" in (sweep / "summary.md").read_text()
