"""One run on two processes (real torchrun, gloo on CPU): one output dir, the 1-process metrics, resume after a kill."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdrun.reporting.stats import difference_interval
from tests.conftest import read_metrics, run_kdrun

TORCHRUN = Path(sys.executable).parent / "torchrun"
# Digits with every training image, long enough for both runs to converge: the comparison is of trained models.
RUN = [
    "train.teacher.epochs=3",
    "train.student.epochs=3",
    "train.student.max_samples=null",
    "cache=off",
    "train.progress=false",
    "report.enabled=false",
]
# Test accuracy of each stage: a 2-process run normalises BatchNorm over each rank's half of the batch, so its
# models differ slightly from the 1-process run's (360 test images: one image is 0.28 points).
STAGES = ("teacher", "baseline", "student")


def torchrun(args: list[str], cwd: Path, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--nproc_per_node=2", "--standalone", "-m", "kdrun", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kw.pop("background", False):
        return subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **kw)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_share_the_artefact_cache(tmp_path):
    cached = [*RUN, "cache=on", f"cache.dir={tmp_path / 'cache'}", "train.teacher.epochs=2", "train.student.epochs=2"]
    first = torchrun([*cached, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun([*cached, f"hydra.run.dir={tmp_path / 'second'}"], tmp_path)  # every rank takes the entries
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "second")
    assert (a["teacher"]["source"], b["teacher"]["source"]) == ("trained", "cache")
    assert (a["baseline"]["source"], b["baseline"]["source"]) == ("trained", "cache")
    for stage in STAGES:
        assert a[stage]["test_acc"] == b[stage]["test_acc"], stage


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (torchrun starts each rank in a session of its
    own, so killing torchrun's process group would leave the ranks running)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_two_processes_write_one_run_dir_with_the_one_process_metrics(tmp_path):
    two = torchrun(RUN, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # not one per rank
    run_dir = run_dirs[0]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
    assert len(list((run_dir / "tb").iterdir())) == 1  # one TensorBoard writer: rank 0's
    log = (run_dir / "kdrun.log").read_text()
    assert log.count("teacher epoch 1/3") == 1 and "2 processes: each trains on its share" in log

    one = run_kdrun([*RUN, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two_metrics, one_metrics = read_metrics(run_dir), read_metrics(tmp_path / "one")
    for stage in STAGES:
        # not bit-equal (each rank normalises over its half of the batch): equal within the noise of the test set
        n = one_metrics["config"]["test_images"]
        low, high = difference_interval(two_metrics[stage]["test_acc"], n, one_metrics[stage]["test_acc"], n)
        assert low <= 0 <= high, (stage, two_metrics[stage]["test_acc"], one_metrics[stage]["test_acc"])
        assert two_metrics[stage]["epochs"] == one_metrics[stage]["epochs"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks to kill in /proc")
def test_a_killed_two_process_run_resumes_on_two_processes(tmp_path):
    long_run = [*RUN, "train.student.epochs=10"]  # long enough to be killed mid-stage, at epoch 4
    reference = torchrun([*long_run, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    job = torchrun([*long_run, f"hydra.run.dir={run_dir}"], tmp_path, background=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    log = run_dir / "kdrun.log"
    deadline = time.monotonic() + 300
    while "student epoch 4/10" not in (log.read_text() if log.exists() else ""):
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_all(str(run_dir))  # torchrun and both ranks at once, mid-stage, as when the machine goes down
    job.wait()
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "checkpoints" / "student.state.pt").is_file()

    wrong = run_kdrun([f"resume={run_dir}"], cwd=tmp_path)  # one process for a two-process state
    assert wrong.returncode == 2 and "saved by a run on 2 process(es); resume it on the same number" in wrong.stderr

    resumed = torchrun([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "student: resuming after epoch" in (run_dir / "kdrun.log").read_text()
    got, want = read_metrics(run_dir), read_metrics(tmp_path / "reference")
    for stage in STAGES:
        for key in ("test_acc", "test_acc_best", "val_acc_best", "best_epoch", "test_loss"):
            assert got[stage][key] == want[stage][key], (stage, key)
