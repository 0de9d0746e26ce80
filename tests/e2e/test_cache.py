"""The artefact cache across processes: racing builders, a killed builder, and real reuse by the kdrun command."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kdrun.pipeline.cache import ArtefactCache
from tests.conftest import QUICK, REPO, read_metrics, run_kdrun
from tests.unit.test_cache import builder

RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kdrun.pipeline.cache import ArtefactCache

    root, log, start_at = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build():
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(float(sys.argv[4]))
        path = root.parent / f"payload-{id(log)}-{time.time_ns()}.pt"
        path.write_bytes(b"the one teacher")
        return path, {"test_acc": 0.9}

    while time.time() < start_at:
        time.sleep(0.005)
    entry, hit = ArtefactCache(root).fetch_or_build("teacher", {"same": "key"}, build)
    print(entry.key, hit, entry.model_path.read_bytes().decode(), flush=True)
    """
)


def racers(tmp_path: Path, n: int, build_seconds: float) -> list[subprocess.Popen]:
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    start_at = time.time() + 2.0  # both imported and waiting, then they go at the same instant
    args = [str(tmp_path / "cache"), str(tmp_path / "builds.log"), str(start_at), str(build_seconds)]
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        for _ in range(n)
    ]


def test_processes_racing_for_one_key_build_it_once(tmp_path):
    procs = racers(tmp_path, 3, build_seconds=1.0)
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert len({o[0] for o in outputs}) == 1
    assert sorted(o[1] for o in outputs) == ["False", "True", "True"]
    assert all(" ".join(o[2:]) == "the one teacher" for o in outputs)


def test_a_killed_builder_does_not_block_the_next_one(tmp_path):
    (proc,) = racers(tmp_path, 1, build_seconds=600)
    deadline = time.time() + 60
    while not (tmp_path / "builds.log").exists():
        assert time.time() < deadline and proc.poll() is None, "the builder never started"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    build, calls = builder(tmp_path)
    started = time.time()
    entry, hit = ArtefactCache(tmp_path / "cache").fetch_or_build("teacher", {"same": "key"}, build)
    assert not hit and calls == [1] and time.time() - started < 10
    assert entry.model_path.read_bytes() == b"weights"


def entry_dir(tmp_path: Path, stage: str, metrics: dict) -> Path:
    return tmp_path / "outputs" / ".cache" / stage / metrics[stage]["cache_key"]


def test_rerun_reuses_teacher_and_baseline_and_gives_the_same_student(tmp_path):
    first, second, off = tmp_path / "first", tmp_path / "second", tmp_path / "off"
    for run_dir in (first, second):
        result = run_kdrun([f"hydra.run.dir={run_dir}", *QUICK], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    m1, m2 = read_metrics(first), read_metrics(second)
    for stage in ("teacher", "baseline"):
        assert m1[stage]["source"] == "trained" and m2[stage]["source"] == "cache"
        assert m1[stage]["cache_key"] == m2[stage]["cache_key"]
        assert m1[stage]["test_acc"] == m2[stage]["test_acc"]
        model = f"{stage}.safetensors"
        assert (second / model).read_bytes() == (first / model).read_bytes()
        assert (second / model).samefile(entry_dir(tmp_path, stage, m1) / "model.safetensors")  # linked, not copied
        entry = entry_dir(tmp_path, stage, m1)
        assert json.loads((entry / "meta.json").read_text())["metrics"]["test_acc"] == m1[stage]["test_acc"]
    # the cached teacher is the very model the first run distilled from: the student comes out the same
    assert m1["student"]["test_acc"] == m2["student"]["test_acc"]
    assert "cache hit: teacher " + m1["teacher"]["cache_key"] in (second / "kdrun.log").read_text()

    result = run_kdrun([f"hydra.run.dir={off}", "cache=off", f"cache.dir={tmp_path / 'unused'}", *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(off)["teacher"]["source"] == "trained" and not (tmp_path / "unused").exists()
