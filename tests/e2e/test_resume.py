"""Runs survive faults: resume after SIGKILL/SIGTERM, a diverging teacher, a full disk, a changed config."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import BRIEF_TIMING, KDRUN, built_once, read_metrics, run_kdrun, without_timings

# The default digits run with fewer epochs: a few seconds, three stages, epochs to land a kill in. Its report's
# timings are brief: they are left out of every comparison here.
RUN = ["train.teacher.epochs=6", "train.student.epochs=20", "train.progress=false", *BRIEF_TIMING]


def _reference_run(tmp: Path) -> None:
    result = run_kdrun([f"hydra.run.dir={tmp / 'run'}", "cache=off", *RUN], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return without_timings(read_metrics(built_once(tmp_path_factory, "resume-reference", _reference_run) / "run"))


def start_and_stop(run_dir: Path, cwd: Path, sig: int, extra: list[str]) -> subprocess.CompletedProcess:
    """Start a run and send ``sig`` at a random point: after a random number of finished epochs, plus a random
    fraction of the next one."""
    rng = random.Random()
    epochs_before_kill = rng.randint(1, 6 + 20 + 20 - 2)
    delay = rng.uniform(0, 0.05)
    print(f"sending {signal.Signals(sig).name} after {epochs_before_kill} epoch lines + {delay:.3f} s")
    proc = subprocess.Popen(
        [str(KDRUN), f"hydra.run.dir={run_dir}", *RUN, *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "kdrun.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text() if log.is_file() else ""
        if text.count(" epoch ") >= epochs_before_kill:
            break
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_no_partial_files(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".state.pt")]
    assert not leftovers, leftovers


def test_sigkill_at_a_random_point_then_resume_gives_the_same_metrics(tmp_path, reference):
    run_dir = tmp_path / "run"
    cache = ["cache=on", f"cache.dir={tmp_path / 'cache'}"]  # a killed teacher build must not poison the cache
    killed = start_and_stop(run_dir, tmp_path, signal.SIGKILL, cache)
    assert killed.returncode in (-signal.SIGKILL, 0)  # 0: the run was already done when the signal came
    resumed = run_kdrun([f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = without_timings(read_metrics(run_dir)), json.loads(json.dumps(reference))
    for stage in ("teacher", "baseline"):  # where the model came from differs from the reference (cache=off)
        key = got[stage].pop("cache_key")
        assert key and want[stage].pop("cache_key") is None
        assert got[stage].pop("source") in ("trained", "cache") and want[stage].pop("source") == "trained"
        # cached before the kill but not yet recorded: taken from the cache on resume, its curves replayed
        assert got[stage].pop("history_source") in ("trained", f"cache {key}")
        assert want[stage].pop("history_source") == "trained"
    assert got["student"].pop("teacher_logits").startswith("cached (")  # the reference: "cached in memory"
    want["student"].pop("teacher_logits")
    assert got == want
    assert_no_partial_files(run_dir)
    assert not list((tmp_path / "cache").rglob(".tmp-*")), "a killed build left a temp folder in the cache"


def test_sigterm_stops_at_a_step_boundary_says_how_to_resume_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    stopped = start_and_stop(run_dir, tmp_path, signal.SIGTERM, ["cache=off"])
    if stopped.returncode == 0:
        pytest.skip("the run finished before the signal arrived")  # only if the random point was its very end
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: interrupted by SIGTERM in stage "), stopped.stderr
    assert f"resume with: kdrun resume={run_dir}" in lines[0]
    assert not (run_dir / "metrics.json").exists()
    resumed = run_kdrun([f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timings(read_metrics(run_dir)) == reference
    assert_no_partial_files(run_dir)


def test_a_finished_run_rerun_skips_every_stage_and_with_other_settings_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "cache=off", "train.teacher.epochs=1", "train.student.epochs=1", *BRIEF_TIMING]
    assert run_kdrun(args, cwd=tmp_path).returncode == 0
    first = without_timings(read_metrics(run_dir))
    again = run_kdrun(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "kdrun.log").read_text()
    assert log.count("finished by an earlier attempt of this run") == 3
    assert without_timings(read_metrics(run_dir)) == first
    other = run_kdrun([*args, "T=2"], cwd=tmp_path)
    assert other.returncode == 2
    assert f"kdrun: error: {run_dir} holds a run with other settings (T: 4.0 there, 2 now)" in other.stderr
    assert without_timings(read_metrics(run_dir)) == first  # the refused run changed nothing


def test_diverging_teacher_fails_clearly_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    result = run_kdrun(
        [f"hydra.run.dir={tmp_path / 'run'}", f"cache.dir={cache}", "train.teacher.lr=10", "train.progress=false"],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "kdrun: error: stage teacher, epoch " in result.stderr and "train.teacher.lr" in result.stderr
    assert not list(cache.rglob("model.*")) and not list(cache.rglob(".tmp-*"))
    assert not (tmp_path / "run" / "metrics.json").exists()


DISK_FULL = """
import os, resource, signal, sys, torch
from kdrun.core.io import atomic_save
path = sys.argv[1]
atomic_save({"w": torch.ones(10)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    atomic_save({"w": torch.ones(1_000_000)}, path)
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_disk_that_fills_up_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "teacher.state.pt"
    out = subprocess.run([sys.executable, "-c", DISK_FULL, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"KdrunError could not write {path}: File too large (errno 27); the previous file is intact" in out.stdout
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(10))
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize(
    "args,message",
    [
        (["resume=/no/such/run"], "resume=/no/such/run is not a kdrun run dir: it has no .hydra/overrides.yaml"),
        (["resume=.", "T=2"], "resume=<run dir> takes no other arguments"),
    ],
)
def test_bad_resume_is_one_line(tmp_path, args, message):
    result = run_kdrun(args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: ") and message in lines[0], result.stderr
