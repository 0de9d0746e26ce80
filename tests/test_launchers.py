"""Cluster sweeps through Hydra's launcher plugins: the documented configs compose, submitit runs a real sweep."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module

from tests.conftest import run_kdrun

SLURM = "hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
RAY = "hydra_ray_launcher.ray_launcher.RayLauncher"
ONE_GPU_RAY = {"ray": {"init": {"address": None}, "remote": {"num_gpus": 1, "num_cpus": 4}}}


@pytest.mark.parametrize(
    "launcher, target, resources",
    [
        ("slurm_gpu", SLURM, {"gpus_per_node": 1, "tasks_per_node": 1}),  # kdrun's: one job per GPU
        ("ray_gpu", RAY, ONE_GPU_RAY),
        ("submitit_slurm", SLURM, {}),  # the plugins' own
        ("submitit_local", "hydra_submitit_launcher.submitit_launcher.LocalLauncher", {}),
        ("ray", RAY, {}),
    ],
)
def test_launcher_configs_compose(launcher, target, resources):
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "cache.dir=/shared/kdrun-cache"],
                      return_hydra_config=True)  # fmt: skip
    node = cfg.hydra.launcher
    assert node._target_ == f"hydra_plugins.{target}"
    for key, value in resources.items():
        assert node[key] == value, key
    assert cfg.cache.dir == "/shared/kdrun-cache"


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
