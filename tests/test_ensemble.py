"""Multi-teacher KD: the ensemble averages softened outputs; each member is its own cached artefact."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdrun.data import DataSpec
from kdrun.models import build_model
from kdrun.pipeline import run
from tests.test_engine import config

MEMBERS = "teacher.members=[{name: lenet5}, {name: mlp, hidden: [32]}]"


def test_the_ensembles_softmax_at_T_is_the_members_average():
    torch.manual_seed(0)
    spec = DataSpec(5, 1, 8)
    ensemble = build_model({"name": "ensemble", "members": [{"name": "mlp"}, {"name": "lenet5"}], "temperature": 3.0},
                           spec, key="teacher").eval()  # fmt: skip
    x = torch.randn(4, 1, 8, 8)
    average = sum(F.softmax(m(x) / 3.0, 1) for m in ensemble.members) / 2
    torch.testing.assert_close(F.softmax(ensemble(x) / 3.0, 1), average)


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
    assert len(list((tmp_path / "cache" / "teacher").glob("*/model.pt"))) == 2
    # Another run with one member in common trains only the new one.
    other = "teacher.members=[{name: lenet5}, {name: small_cnn}]"
    run(config(*extra[:1], other, *extra[2:]), tmp_path / "second")
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())["teacher"]["members"]
    assert [m["source"] for m in second] == ["cache", "trained"]
