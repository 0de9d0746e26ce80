"""The artefact cache in-process: what its key depends on, locking, corrupt entries, GPU slot leases."""

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from kdrun.pipeline.cache import ArtefactCache, cache_key
from kdrun.pipeline.parallel import lease_slot
from kdrun.pipeline.stages import artefact_fields
from kdrun.training.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "off")


def keys(*overrides: str, runtime: Runtime = CPU) -> dict[str, str]:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return {stage: cache_key(artefact_fields(cfg, stage, runtime.amp)) for stage in ("teacher", "baseline")}


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
        "sched.warmup_epochs=0",
        "dataset.augment.crop_pad=2",  # the default of both recipes' augmentation
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
        ("train.teacher.augment.crop_pad=2", "teacher"),
        ("train.teacher.augment.mix=mixup", "teacher"),
        ("train.teacher.clip_grad_norm=1", "teacher"),
        ("train.student.augment.flip=true", "baseline"),
        ("train.student.augment.mix=cutmix", "baseline"),
        ("augment=mixup", "baseline"),
        ("train.student.clip_grad_norm=1", "baseline"),
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
    monkeypatch.setattr("kdrun.pipeline.stages.TRAINING_CODE_VERSION", "train-v999")  # where stages.py reads it
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
    with caplog.at_level(logging.WARNING, logger="kdrun.pipeline.cache"):
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
        mp.setattr("kdrun.pipeline.cache._locked", lambda path, what: _no_lock())
        entry, hit = cache.fetch_or_build("teacher", {"k": 9}, build_while_another_writes)
    assert not hit and entry.model_path.read_bytes() == b"first"
    assert not list(lock.parent.glob(".tmp-*"))


def test_an_entry_keeps_its_model_file_under_the_name_its_meta_records(tmp_path, caplog):
    cache = ArtefactCache(tmp_path / "cache")
    built = tmp_path / "teacher.safetensors"
    built.write_bytes(b"tensors")
    entry, _ = cache.fetch_or_build("teacher", {"k": 1}, lambda: (built, {"test_acc": 0.5}))
    assert entry.meta["file"] == "model.safetensors" and entry.model_path == entry.dir / "model.safetensors"
    # an entry of an earlier kdrun: model.pt, and a meta.json that names no file
    meta = json.loads((entry.dir / "meta.json").read_text())
    del meta["file"]
    (entry.dir / "model.safetensors").rename(entry.dir / "model.pt")
    (entry.dir / "meta.json").write_text(json.dumps(meta))
    old, hit = cache.fetch_or_build("teacher", {"k": 1}, builder(tmp_path)[0])
    assert hit and old.model_path == entry.dir / "model.pt" and old.model_path.read_bytes() == b"tensors"
    # a meta.json naming a file outside its entry is a damaged entry, never followed
    (entry.dir / "meta.json").write_text(json.dumps({**meta, "file": "../../elsewhere"}))
    with caplog.at_level(logging.WARNING, logger="kdrun.pipeline.cache"):
        rebuilt, hit = cache.fetch_or_build("teacher", {"k": 1}, builder(tmp_path)[0])
    assert not hit and "names the model file '../../elsewhere'" in caplog.text
    assert rebuilt.model_path.read_bytes() == b"weights"


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
