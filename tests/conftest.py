"""Shared fixtures: where the real datasets are, and how to run the real ``kdrun`` command."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
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
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    env: dict | None = None,
    command: str = "kdrun",
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """Run an installed console script (``kdrun`` unless ``command`` names another) as a user would: in a process
    forked from this worker's fork server (tests/kdrun_forkserver.py), which has done the imports; ``cold=True``, or
    an ``env`` (which may change what is imported), starts the script itself in a new interpreter."""
    script = KDRUN.with_name(command)
    assert script.exists(), f"the {command} command is not installed next to {sys.executable}: pip install -e ."
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR")
    if cold or env:
        return subprocess.run(
            [str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
        )
    return _fork_server().run(script, args, cwd, full_env, timeout)


class _ForkServer:
    """This worker's tests/kdrun_forkserver.py, started on first use and stopped when the worker exits."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="kdrun-forkserver-"))
        self.log = (self.folder / "server.err").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "kdrun_forkserver.py"), str(KDRUN.parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            bufsize=0,  # unbuffered: select() sees every answer
        )
        atexit.register(self.close)

    def run(self, script: Path, args: list[str], cwd: Path, env: dict, timeout: float):
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name=script.name)
        streams = {name: self.folder / f"{name}.txt" for name in ("stdout", "stderr")}
        call = {"argv": [str(script), *args], "entry": entry.value, "cwd": str(cwd), "env": env}
        call.update({name: str(path) for name, path in streams.items()})
        self.proc.stdin.write((json.dumps(call) + "\n").encode())
        pid = self._answer(600)["pid"]  # the first call waits for the imports too (half a minute from a cold disk)
        try:
            returncode = self._answer(timeout)["returncode"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)  # as subprocess.run does on a timeout
            self._answer(60)
            raise subprocess.TimeoutExpired([str(script), *args], timeout) from None
        out, err = (streams[name].read_text() for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess([str(script), *args], returncode, out, err)

    def _answer(self, timeout: float) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired("kdrun fork server", timeout)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the kdrun fork server ended: {(self.folder / 'server.err').read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a server that has ended already
            self.proc.stdin.close()
        self.proc.wait(60)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@functools.cache
def _fork_server() -> _ForkServer:
    return _ForkServer()


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


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# metrics.json keys that measure the process, not the models: no two runs share them.
_MEASURED = re.compile(r"train_time_s|img_per_s|peak_mem_mb|latency_|throughput_|speedup_")


def without_timings(metrics):
    """``metrics`` (metrics.json or a part of it) without its wall times, throughput, latency, speed-ups and peak
    memory, at every depth."""
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if not _MEASURED.match(k)}
    return metrics
