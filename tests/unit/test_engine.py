"""The engine and pipeline in-process: AMP on CPU, frozen teacher, fair baseline, schedules."""

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_module

from kdrun.core.errors import KdrunError
from kdrun.data import build_data
from kdrun.losses import CrossEntropy, build_objective
from kdrun.models import build_model
from kdrun.pipeline.run import run
from kdrun.training.loop import Stage, fit
from kdrun.training.optim import build_scheduler
from kdrun.training.runtime import resolve_runtime
from kdrun.training.teacher import OnlineTeacher, TeacherSource
from tests.conftest import BRIEF_TIMING

QUICK = ["train.teacher.epochs=1", "train.student.epochs=2", "train.progress=false", "teacher=lenet5"]
QUICK += [*BRIEF_TIMING, "report.throughput_batch=32"]


def config(*overrides):
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=[*QUICK, *overrides])


def student_stage(name: str, cfg) -> Stage:
    """A stage with the config's student recipe, optimizer and schedule (what the pipeline's stages do)."""
    recipe = cfg.train.student
    return Stage(name, int(recipe.epochs), int(recipe.batch_size), float(recipe.lr), cfg.optim, cfg.sched, seed=0)


def test_alpha_one_makes_the_student_exactly_the_baseline(tmp_path):
    # Same seed, init and batch order: with the KD weight at 0, distillation must reproduce the baseline.
    run(config("alpha=1.0"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["student"]["test_acc"] == metrics["baseline"]["test_acc"]
    assert metrics["student"]["val_acc_best"] == metrics["baseline"]["val_acc_best"]
    assert metrics["kd_gain"] == 0.0


def test_bf16_autocast_runs_on_cpu_and_fp16_degrades_to_it(tmp_path, caplog):
    assert resolve_runtime("cpu", "bf16").amp == "bf16"
    with caplog.at_level(logging.WARNING):
        assert resolve_runtime("cpu", "fp16").amp == "bf16"
    assert "fp16 needs a CUDA GPU" in caplog.text
    objective = run(config("amp=bf16", "dataset=fake", "dataset.train_size=128", "student=mlp"), tmp_path)
    assert 0 <= objective <= 1


def test_unavailable_device_is_a_clear_error():
    if not torch.cuda.is_available():
        with pytest.raises(KdrunError, match="no CUDA GPU is available"):
            resolve_runtime("cuda", "auto")


def test_teacher_stays_frozen_and_student_learns():
    data = build_data({"name": "digits", "val_fraction": 0.2})
    runtime = resolve_runtime("cpu", "off", False)
    cfg = config()
    torch.manual_seed(0)
    teacher = build_model({"name": "lenet5"}, data.spec)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model({"name": "mlp", "hidden": [32]}, data.spec)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    objective = build_objective({"name": "kd"}, 4.0, 0.2)
    result = fit(student_stage("student", cfg), student, objective, data, OnlineTeacher(teacher), runtime)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(start[k], v) for k, v in result.model.state_dict().items())
    assert {"train/ce", "train/kd", "val/acc"} <= set(result.history[-1])


def test_baseline_objective_needs_no_teacher():
    data = build_data({"name": "fake", "train_size": 64, "test_size": 16, "image_size": 8, "channels": 1})
    cfg = config()
    model = build_model({"name": "mlp"}, data.spec)
    runtime = resolve_runtime("cpu", "off", False)
    result = fit(student_stage("baseline", cfg), model, CrossEntropy(), data, TeacherSource(), runtime)
    assert result.best_epoch in (1, 2) and result.img_per_s > 0


@pytest.mark.parametrize("name,expect_end", [("cosine", 0.0), ("step", 0.01), ("none", 1.0)])
def test_schedules_follow_their_shape(name, expect_end):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler({"name": name, "warmup_epochs": 1}, opt, steps_per_epoch=10, epochs=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(expect_end, abs=1e-9)
