"""Shared fixtures: where the real datasets are, and how to run the real ``kdrun`` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def pytest_configure(config):
    """Under pytest-xdist each worker gets one intra-op thread, and so does every ``kdrun`` it starts (the variables
    are inherited): the tests' tensors are tiny, and two threads per worker spin against the other workers' cores
    (the suite ran slower with two workers than with one until this). Runs before any test module is imported."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)  # also where a plugin imported torch before the variables were set


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KDRUN_SHARED_DATA", REPO.parent / "shared" / "data"))
KDRUN = Path(sys.executable).parent / "kdrun"
# The report's timings for runs whose timings no test reads: 0.01 s per model and batch size instead of 0.2 (about
# 3 s of CPU a run); tests/e2e/test_report.py times as users do.
BRIEF_TIMING = ["report.min_run_time=0.01", "report.warmup=1"]
# Small, fast settings for end-to-end runs: the pipeline is real, only shorter; throughput at batch 32 instead of 256
# (0.14 instead of 0.38 s a model; tests comparing metrics.json files leave out the throughput_b256 keys by name).
QUICK = [
    "train.teacher.epochs=1",
    "train.student.epochs=1",
    "train.progress=false",
    *BRIEF_TIMING,
    "report.throughput_batch=32",
]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST files are not under {SHARED_DATA}/MNIST/raw (set KDRUN_SHARED_DATA to their root)")
    return SHARED_DATA


def run_kdrun(
    args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None, command: str = "kdrun"
) -> subprocess.CompletedProcess:
    """Run an installed console script (``kdrun`` unless ``command`` names another) as a user would."""
    script = KDRUN.with_name(command)
    assert script.exists(), f"the {command} command is not installed next to {sys.executable}: pip install -e ."
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test session, shared by every xdist worker; for module fixtures that
    are costly and that no test changes. Under ``--dist worksteal`` a module's tests run on both workers, and a
    plain module fixture would be built on each: the first worker to ask builds it under a lock, the others wait
    for it and reuse it. A build that fails leaves nothing behind, so the next to ask tries again (and fails alike).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base temp folder that the workers' own ones are in
    folder = root / f"built-once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def run_kdrun_batch_once(
    tmp_path_factory, name: str, rows: Callable[[Path], list[list[str]]]
) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """The command lines ``rows(folder)`` gives, row ``i`` run from the folder ``folder/<i>`` made for it, through
    kdrun's console entry point all in one Python process (tests/kdrun_batch.py), once per session whichever xdist
    workers ask (built_once): each row's folder and result. For tables of refused inputs, which a process each
    would spend in imports; tests/e2e/test_cli.py checks a sample of rows against separate ``kdrun`` processes."""

    def build(folder: Path) -> None:
        calls = [{"args": args, "cwd": str(folder / str(i))} for i, args in enumerate(rows(folder))]
        for call in calls:
            Path(call["cwd"]).mkdir()
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        command = [sys.executable, str(REPO / "tests" / "kdrun_batch.py"), str(folder / "results.json")]
        payload = json.dumps(calls)
        done = subprocess.run(command, input=payload, capture_output=True, text=True, env=env, cwd=folder, timeout=600)
        assert done.returncode == 0 and (folder / "results.json").is_file(), done.stderr[-3000:]

    folder = built_once(tmp_path_factory, name, build)
    saved = json.loads((folder / "results.json").read_text())
    return [
        (folder / str(i), subprocess.CompletedProcess(["kdrun"], r["returncode"], "", r["stderr"]))
        for i, r in enumerate(saved)
    ]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
