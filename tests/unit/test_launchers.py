"""Cluster sweeps through Hydra's launcher plugins: the documented launcher configs compose."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

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
