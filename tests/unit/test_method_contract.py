"""One contract for every KD method: one file in kdrun/losses/ and one YAML in conf/loss/, called with a
``LossInput`` and returning ``(total, terms)``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import DataSpec
from kdrun.losses import LOSSES, LossInput, Objective, build_objective
from kdrun.models import build_model
from kdrun.models.features import FeatureTap

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "conf" / "loss").glob("*.yaml"))


def option(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def test_every_loss_yaml_names_a_registered_method_and_every_method_has_a_yaml():
    named = {option(p).get("name") for p in YAMLS}
    assert named <= set(LOSSES.names()), f"YAMLs naming no registered method: {named - set(LOSSES.names())}"
    assert set(LOSSES.names()) <= named, f"registered methods without a YAML: {set(LOSSES.names()) - named}"


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_method_is_one_file_named_after_it_behind_the_objective_contract(name):
    cls = LOSSES.get(name)
    assert issubclass(cls, Objective)
    assert cls.__module__ == f"kdrun.losses.{name}", f"{name} lives in {cls.__module__}, not kdrun/losses/{name}.py"
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    assert params == ["inputs"], f"{name}.forward takes {params}; the contract is forward(self, inputs: LossInput)"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_each_option_runs_on_one_loss_input_and_its_terms_reach_the_student(path):
    torch.manual_seed(0)
    spec = DataSpec(num_classes=10, in_channels=3, image_size=16)
    objective = build_objective(OmegaConf.load(path), T=4.0, alpha=0.2)
    x = torch.randn(6, 3, 16, 16)
    student = build_model({"name": "resnet8"}, spec)
    teacher = build_model({"name": "resnet8"}, spec).eval()
    if objective.uses_index:  # the loop gives a per-sample memory the training split's labels first
        objective.bind_data(torch.arange(6) % 3)
    if objective.uses_features:
        objective.bind(student, teacher, x)
        s_logits, s_features = FeatureTap(student, objective.student_layers)(x)
        with torch.no_grad():
            t_logits, t_features = FeatureTap(teacher, objective.teacher_layers)(x)
    else:
        s_logits, s_features = student(x), []
        with torch.no_grad():
            t_logits, t_features = teacher(x), []
    inputs = LossInput(s_logits, torch.arange(6) % 10, t_logits if objective.needs_teacher else None)
    inputs.student_features, inputs.teacher_features, inputs.index = s_features, t_features, torch.arange(6)
    total, terms = objective(inputs)
    assert total.ndim == 0 and torch.isfinite(total)
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    total.backward()
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0
