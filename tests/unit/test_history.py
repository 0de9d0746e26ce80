"""Training curves travel with a model: a teacher or baseline reused from the cache or loaded from a checkpoint
still has its curves in the run's TensorBoard, at the same tags and steps as in the run that trained it."""

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrun.core.io import file_sha256
from kdrun.models.checkpoint import read_checkpoint
from kdrun.pipeline.history import replay, stored_history
from kdrun.pipeline.run import run
from kdrun.pipeline.rundir import state_path

QUICK = ["train.teacher.epochs=2", "train.student.epochs=2", "report.enabled=false", "train.progress=false"]
CURVES = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "img_per_s", "peak_mem_mb")


def run_with(run_dir: Path, *overrides: str) -> dict:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*QUICK, *overrides])
    run(cfg, run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def scalars(run_dir: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``<stage>/...`` curve of the run's event files as (step, value) pairs, duplicates kept."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {
        tag[len(stage) + 1 :]: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith(f"{stage}/")
    }


def test_cached_and_checkpoint_teachers_replay_the_curves_of_the_run_that_trained_them(tmp_path):
    cache = f"cache.dir={tmp_path / 'cache'}"
    first = run_with(tmp_path / "first", cache)
    second = run_with(tmp_path / "second", cache)
    for stage in ("teacher", "baseline"):
        assert first[stage]["history_source"] == "trained"
        assert second[stage]["source"] == "cache"
        assert second[stage]["history_source"] == f"cache {first[stage]['cache_key']}"
        trained, replayed = scalars(tmp_path / "first", stage), scalars(tmp_path / "second", stage)
        assert set(CURVES) <= set(trained)
        assert replayed == trained and [step for step, _ in trained["val/acc"]] == [1, 2]
    assert second["student"]["history_source"] == "trained"

    # A teacher loaded from another run's model file (here a hard link to the cache entry) has its curves too.
    teacher_file = tmp_path / "second" / "teacher.safetensors"
    assert teacher_file.samefile(tmp_path / "cache" / "teacher" / first["teacher"]["cache_key"] / "model.safetensors")
    loaded = run_with(tmp_path / "loaded", f"teacher.checkpoint={teacher_file}", "baseline=false", cache)
    assert loaded["teacher"]["source"] == "checkpoint"
    assert loaded["teacher"]["history_source"] == f"checkpoint {teacher_file}"
    assert scalars(tmp_path / "loaded", "teacher") == scalars(tmp_path / "first", "teacher")
    # ... and so has the next run's model file, copied from that checkpoint
    assert stored_history(read_checkpoint(tmp_path / "loaded" / "teacher.safetensors"), "copy")

    # A run resumed after its stages finished writes no curve twice.
    run_with(tmp_path / "second", cache)
    for stage in ("teacher", "baseline"):
        assert scalars(tmp_path / "second", stage) == scalars(tmp_path / "first", stage)

    # Killed after the teacher's epoch 1 (its curves written live) while another job cached it: epoch 2 is replayed.
    partial = tmp_path / "partial"
    state_path(partial, "teacher").parent.mkdir(parents=True)
    torch.save({"stage": "teacher", "epoch": 1}, state_path(partial, "teacher"))
    assert run_with(partial, "baseline=false", cache)["teacher"]["source"] == "cache"
    trained = scalars(tmp_path / "first", "teacher")
    assert scalars(partial, "teacher") == {tag: points[1:] for tag, points in trained.items()}
    assert not state_path(partial, "teacher").exists()


def test_models_without_curves_still_work_and_record_none(tmp_path):
    cache = f"cache.dir={tmp_path / 'cache'}"
    first = run_with(tmp_path / "first", "baseline=false", cache)
    saved = read_checkpoint(tmp_path / "first" / "teacher.safetensors")
    plain = tmp_path / "plain.pt"
    torch.save(saved["state_dict"], plain)
    loaded = run_with(tmp_path / "plain", f"teacher.checkpoint={plain}", "baseline=false", cache)
    assert loaded["teacher"]["source"] == "checkpoint" and loaded["teacher"]["history_source"] is None
    assert scalars(tmp_path / "plain", "teacher") == {}

    # A cache entry of an earlier kdrun, written before curves were kept and before model files were safetensors:
    # a torch.save model.pt without history, and a meta.json that names no model file (its checksum still holds).
    entry = tmp_path / "cache" / "teacher" / first["teacher"]["cache_key"]
    del saved["history"]
    (entry / "model.safetensors").unlink()
    torch.save(saved, entry / "model.pt")
    meta = json.loads((entry / "meta.json").read_text())
    del meta["file"]
    meta.update(sha256=file_sha256(entry / "model.pt"), size=(entry / "model.pt").stat().st_size)
    (entry / "meta.json").write_text(json.dumps(meta))
    old = run_with(tmp_path / "old", "baseline=false", cache)
    assert old["teacher"]["source"] == "cache" and old["teacher"]["history_source"] is None
    assert scalars(tmp_path / "old", "teacher") == {}
    assert (entry / "model.pt").is_file() and not (entry / "model.safetensors").exists()  # the entry is left as is
    # the run dir's copy is a safetensors file all the same, converted with the entry's metadata
    copy = read_checkpoint(tmp_path / "old" / "teacher.safetensors")
    assert copy.keys() == saved.keys() and not (tmp_path / "old" / "teacher.pt").exists()
    assert all(torch.equal(copy["state_dict"][k], v) for k, v in saved["state_dict"].items())


def test_rows_that_are_not_epoch_rows_are_reported_not_replayed(caplog):
    assert stored_history({}, "plain") is None
    assert stored_history({"history": "not rows"}, "odd.pt") is None
    assert stored_history({"history": [{"epoch": 1, "val/acc": "high"}]}, "odd.pt") is None
    assert "odd.pt: its training history is not a list of epoch rows" in caplog.text
    rows = [{"epoch": 1, "lr": 0.1, "val/acc": 0.5, "val/top5": 0.9}]
    written: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            written.append((tag, value, step))

    assert replay(Writer(), "teacher_2", stored_history({"history": rows}, "ok"), "cache abc") == "cache abc"
    assert written == [("teacher_2/lr", 0.1, 1), ("teacher_2/val/acc", 0.5, 1)]  # the live loop's tags
    assert replay(Writer(), "teacher", None, "cache abc") is None
