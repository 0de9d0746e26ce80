"""The artefact cache: what its key depends on, locking between processes, corrupt entries, and real reuse."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from kdrun.cache import ArtefactCache, cache_key
from kdrun.parallel import lease_slot
from kdrun.pipeline import artefact_fields
from kdrun.runtime import Runtime
from tests.conftest import QUICK, REPO, read_metrics, run_kdrun

CPU = Runtime(torch.device("cpu"), "off")


def keys(*overrides: str, runtime: Runtime = CPU) -> dict[str, str]:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return {stage: cache_key(artefact_fields(stage, cfg, runtime)) for stage in ("teacher", "baseline")}


REFERENCE = keys()


@pytest.mark.parametrize(
    "override",
    [
        "T=9",
        "alpha=0.9",
        "loss=soft_ce",
        "train.eval_batch_size=77",
        "train.progress=true",
        "device=cpu",
        "dataset.root=/elsewhere",
        "baseline=false",
        "hydra.run.dir=/tmp/x",
        "cache.dir=/tmp/other-cache",
    ],
)
def test_key_ignores_what_does_not_determine_the_artefact(override):
    assert keys(override) == REFERENCE


@pytest.mark.parametrize(
    "override",
    [
        "seed=1",
        "dataset=mnist",
        "dataset.split_seed=3",
        "dataset.val_fraction=0.3",
        "dataset.test_fraction=0.3",
        "optim=adam",
        "optim.weight_decay=0.0",
        "sched=step",
    ],
)
def test_key_of_both_changes_with_shared_inputs(override):
    changed = keys(override)
    assert changed["teacher"] != REFERENCE["teacher"] and changed["baseline"] != REFERENCE["baseline"]


@pytest.mark.parametrize(
    "override, stage",
    [
        ("teacher=resnet8", "teacher"),
        ("+teacher.width=8", "teacher"),
        ("train.teacher.epochs=3", "teacher"),
        ("train.teacher.lr=0.01", "teacher"),
        ("train.teacher.max_samples=500", "teacher"),
        ("student=lenet5", "baseline"),
        ("student.hidden=64", "baseline"),
        ("train.student.epochs=5", "baseline"),
        ("train.student.batch_size=32", "baseline"),
        ("train.student.max_samples=200", "baseline"),
    ],
)
def test_key_changes_only_for_the_stage_it_determines(override, stage):
    other = "baseline" if stage == "teacher" else "teacher"
    changed = keys(override)
    assert changed[stage] != REFERENCE[stage]
    assert changed[other] == REFERENCE[other]


def test_key_changes_with_precision_and_code_version(monkeypatch):
    assert keys(runtime=Runtime(torch.device("cpu"), "bf16")) != REFERENCE
    monkeypatch.setattr("kdrun.pipeline.TRAINING_CODE_VERSION", "train-v999")
    assert keys()["teacher"] != REFERENCE["teacher"]


def test_imagefolder_root_is_part_of_the_key(tmp_path):
    a = keys("dataset=imagefolder", f"dataset.root={tmp_path / 'a'}")
    b = keys("dataset=imagefolder", f"dataset.root={tmp_path / 'b'}")
    assert a["teacher"] != b["teacher"]


def builder(tmp_path: Path, payload: bytes = b"weights", metrics: dict | None = None):
    calls = []

    def build():
        calls.append(1)
        path = tmp_path / f"built-{len(calls)}.pt"
        path.write_bytes(payload)
        return path, metrics or {"test_acc": 0.5}

    return build, calls


def test_hit_returns_the_stored_entry_with_metadata(tmp_path):
    cache = ArtefactCache(tmp_path / "cache")
    build, calls = builder(tmp_path, metrics={"test_acc": 0.75})
    entry, hit = cache.fetch_or_build("teacher", {"a": 1}, build)
    assert not hit and calls == [1]
    again, hit = cache.fetch_or_build("teacher", {"a": 1}, build)
    assert hit and calls == [1] and again.key == entry.key == cache_key({"a": 1})
    assert again.model_path.read_bytes() == b"weights"
    assert again.metrics == {"test_acc": 0.75} and again.meta["fields"] == {"a": 1} and again.meta["created"]
    assert [e.key for e in cache.entries("teacher")] == [entry.key]
    assert not list((tmp_path / "cache" / "teacher").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_model", "garbage_meta", "delete_meta"])
def test_corrupt_entry_is_reported_and_rebuilt_never_used(tmp_path, caplog, damage):
    cache = ArtefactCache(tmp_path / "cache")
    build, calls = builder(tmp_path, payload=b"0123456789" * 100)
    entry, _ = cache.fetch_or_build("baseline", {"k": 2}, build)
    if damage == "truncate":
        entry.model_path.write_bytes(entry.model_path.read_bytes()[:500])
    elif damage == "flip":
        entry.model_path.write_bytes(b"X" + entry.model_path.read_bytes()[1:])
    elif damage == "delete_model":
        entry.model_path.unlink()
    elif damage == "garbage_meta":
        (entry.dir / "meta.json").write_text("{not json")
    else:
        (entry.dir / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="kdrun.cache"):
        rebuilt, hit = cache.fetch_or_build("baseline", {"k": 2}, build)
    assert not hit and calls == [1, 1]
    assert "corrupt" in caplog.text and entry.key in caplog.text
    assert rebuilt.model_path.read_bytes() == b"0123456789" * 100
    _, hit = cache.fetch_or_build("baseline", {"k": 2}, build)
    assert hit and calls == [1, 1]


def test_entry_written_meanwhile_without_the_lock_is_kept_not_clobbered(tmp_path):
    cache = ArtefactCache(tmp_path / "cache")
    other = ArtefactCache(tmp_path / "cache")
    first_build, _ = builder(tmp_path, payload=b"first")

    def build_while_another_writes():
        # e.g. a job still running after its cache folder was deleted and recreated: it had its own lock file
        other.fetch_or_build("teacher", {"k": 9}, first_build)
        path = tmp_path / "second.pt"
        path.write_bytes(b"second")
        return path, {"test_acc": 0.1}

    lock = tmp_path / "cache" / "teacher" / f"{cache_key({'k': 9})}.lock"
    with pytest.MonkeyPatch.context() as mp:
        # give the outer build its own lock file, as a recreated cache folder would
        mp.setattr("kdrun.cache._locked", lambda path, what: _no_lock())
        entry, hit = cache.fetch_or_build("teacher", {"k": 9}, build_while_another_writes)
    assert not hit and entry.model_path.read_bytes() == b"first"
    assert not list(lock.parent.glob(".tmp-*"))


def _no_lock():
    from contextlib import nullcontext

    return nullcontext()


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtefactCache(tmp_path / "cache")

    def build():
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        cache.fetch_or_build("teacher", {"k": 3}, build)
    assert [p.name for p in (tmp_path / "cache" / "teacher").iterdir() if not p.name.endswith(".lock")] == []
    build_ok, calls = builder(tmp_path)
    assert cache.fetch_or_build("teacher", {"k": 3}, build_ok)[1] is False and calls == [1]


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kdrun.cache import ArtefactCache

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


def test_slot_leases_are_exclusive_and_released(tmp_path):
    with lease_slot(2, tmp_path) as first, lease_slot(2, tmp_path) as second:
        assert {first, second} == {0, 1}
        got = []
        waiter = threading.Thread(target=lambda: got.append(_lease_once(tmp_path)))
        waiter.start()
        time.sleep(0.5)
        assert got == []  # both slots taken: it waits
    waiter.join(timeout=10)
    assert got and got[0] in (0, 1)


def _lease_once(lock_dir: Path) -> int:
    with lease_slot(2, lock_dir, poll_s=0.05) as index:
        return index


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
        assert (second / f"{stage}.pt").read_bytes() == (first / f"{stage}.pt").read_bytes()
        entry = tmp_path / "outputs" / ".cache" / stage / m1[stage]["cache_key"]
        assert json.loads((entry / "meta.json").read_text())["metrics"]["test_acc"] == m1[stage]["test_acc"]
    # the cached teacher is the very model the first run distilled from: the student comes out the same
    assert m1["student"]["test_acc"] == m2["student"]["test_acc"]
    assert "cache hit: teacher " + m1["teacher"]["cache_key"] in (second / "kdrun.log").read_text()

    result = run_kdrun([f"hydra.run.dir={off}", "cache=off", f"cache.dir={tmp_path / 'unused'}", *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(off)["teacher"]["source"] == "trained" and not (tmp_path / "unused").exists()
