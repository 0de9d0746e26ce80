"""Multi-teacher KD through the whole pipeline: each member is its own cached artefact (digits and real MNIST)."""

import json

import pytest

from kdrun.pipeline.run import run
from tests.unit.test_engine import config
from tests.unit.test_history import scalars

MEMBERS = "teacher.members=[{name: lenet5}, {name: mlp, hidden: [32]}]"


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_ensemble_teacher_end_to_end_with_members_cached_one_by_one(tmp_path, dataset, request):
    extra = ["teacher=ensemble", MEMBERS, f"cache.dir={tmp_path / 'cache'}"]
    if dataset == "mnist":
        root = request.getfixturevalue("mnist_root")
        extra += ["dataset=mnist", f"dataset.root={root}", "train.teacher.max_samples=600"]
        extra += ["train.student.max_samples=300", "report.enabled=false"]
    run(config(*extra), tmp_path / "first")
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    teacher = metrics["teacher"]
    assert teacher["source"] == "ensemble" and [m["name"] for m in teacher["members"]] == ["teacher_1", "teacher_2"]
    assert all(m["source"] == "trained" and m["cache_key"] for m in teacher["members"])
    assert teacher["params"] == sum(m["params"] for m in teacher["members"])
    assert metrics["student"]["teacher_logits"].startswith("cached (")
    assert len(list((tmp_path / "cache" / "teacher").glob("*/model.safetensors"))) == 2
    # Another run with one member in common trains only the new one.
    other = "teacher.members=[{name: lenet5}, {name: small_cnn}]"
    run(config(*extra[:1], other, *extra[2:]), tmp_path / "second")
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())["teacher"]["members"]
    assert [m["source"] for m in second] == ["cache", "trained"]
    # the cached member's curves are replayed under this run's member name, as the first run wrote them
    assert [m["history_source"] for m in second] == [f"cache {second[0]['cache_key']}", "trained"]
    assert scalars(tmp_path / "second", "teacher_1") == scalars(tmp_path / "first", "teacher_1") != {}
