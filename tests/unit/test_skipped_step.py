"""A step whose loss is not finite changes nothing: weights, optimizer state (momentum, Adam's moments and step
count) stay as they were, also when the skip is decided on the device by torch's fused kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import build_data
from kdrun.losses import CrossEntropy
from kdrun.models import build_model
from kdrun.training.loop import Stage, Trainer
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import TeacherSource

CPU = Runtime(torch.device("cpu"), "off", False, False, False)


@pytest.mark.parametrize(
    "optim", [{"name": "sgd", "momentum": 0.9}, {"name": "adam"}, {"name": "adamw", "fused": False}]
)
def test_a_nonfinite_step_leaves_weights_and_optimizer_state_unchanged(optim):
    data = build_data(OmegaConf.create({"name": "digits"}))
    model = build_model({"name": "small_cnn"}, data.spec)
    stage = Stage("student", 1, 64, 0.05, OmegaConf.create(optim), OmegaConf.create({"name": "none"}), 0)
    trainer = Trainer(stage, model, CrossEntropy(), data, TeacherSource(), CPU)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8)

    def loss(scale: float) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x), y) * scale

    assert trainer.update(loss(1.0)).item() == 0  # the first step: momentum and moments now exist
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}  # BatchNorm buffers follow the forward
    state = copy.deepcopy(trainer.st.optimizer.state_dict())
    assert trainer.update(loss(float("nan"))).item() == 1
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())
    after = trainer.st.optimizer.state_dict()["state"]
    for i, slots in state["state"].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(after[i][name]), torch.as_tensor(value)), f"{name} changed"
    assert trainer.update(loss(1.0)).item() == 0
    assert not all(torch.equal(weights[k], v) for k, v in model.named_parameters())


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_clip_grad_norm_bounds_the_true_gradient_after_unscaling(amp):
    """With a GradScaler (fp16) the gradient is unscaled before clipping: the step is lr*clip, not lr*clip/scale."""
    data = build_data(OmegaConf.create({"name": "digits"}))
    model = build_model({"name": "mlp", "dropout": 0.0}, data.spec)
    plain = OmegaConf.create({"name": "sgd", "fused": False})
    stage = Stage("student", 1, 64, 0.5, plain, OmegaConf.create({"name": "none", "warmup_epochs": 0}), 0)
    stage.clip_grad_norm = 0.1
    trainer = Trainer(stage, model, CrossEntropy(), data, TeacherSource(), Runtime(torch.device("cpu"), amp, False))
    if amp == "fp16":
        assert trainer.st.scaler.is_enabled()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = torch.randn(8, 1, 8, 8) * 100, torch.arange(8)  # a gradient far larger than 0.1
    assert trainer.update(torch.nn.functional.cross_entropy(model(x), y) * 1000).item() == 0
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert moved.norm().item() == pytest.approx(0.5 * 0.1, rel=1e-3)
