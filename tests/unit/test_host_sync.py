"""The steady-state training step never waits for the host: its host reads per epoch do not grow with the steps.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()`` or ``.cpu()`` stalls the queue; on this CPU they are
counted instead, over one epoch at two batch sizes (4x the steps). Only the per-epoch reads (metrics, validation,
the non-finite count, the first optimizer step) may remain, so both counts must be equal.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import build_data
from kdrun.losses import CrossEntropy, build_objective
from kdrun.models import build_model
from kdrun.training.loop import CHECK_EVERY, Stage, fit
from kdrun.training.predict import predict
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import CachedLogits, OnlineTeacher, TeacherSource

CPU = Runtime(torch.device("cpu"), "off", False, False, False)
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture(scope="module")
def digits():
    return build_data(OmegaConf.create({"name": "digits", "val_fraction": 0.1}))


def count_syncs(monkeypatch, train) -> int:
    calls = {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train()
    monkeypatch.undo()
    return calls["n"]


def stage(batch_size: int, optim: str = "sgd") -> Stage:
    options = {"sgd": {"name": "sgd", "momentum": 0.9}, "adam": {"name": "adam"}}[optim]
    return Stage("student", 1, batch_size, 0.05, OmegaConf.create(options), OmegaConf.create({"name": "none"}), 0)


@pytest.mark.parametrize("source", ["none", "cached", "online"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_host_reads_per_epoch_do_not_grow_with_the_number_of_steps(monkeypatch, digits, source, optim):
    teacher = build_model({"name": "small_cnn"}, digits.spec)
    logits = predict(teacher, digits.train, digits, CPU, 512)[0]

    def run(batch_size: int) -> int:
        objective = CrossEntropy() if source == "none" else build_objective({"name": "kd"}, 4.0, 0.5)
        teacher_source = {
            "none": TeacherSource,
            "cached": lambda: CachedLogits(logits),
            "online": lambda: OnlineTeacher(teacher),
        }[source]()
        model = build_model({"name": "small_cnn"}, digits.spec)
        return count_syncs(
            monkeypatch, lambda: fit(stage(batch_size, optim), model, objective, digits, teacher_source, CPU)
        )

    few, many = digits.train.num_batches(128, shuffle=True), digits.train.num_batches(32, shuffle=True)
    assert many >= 4 * few - 4 and many < CHECK_EVERY
    assert run(32) == run(128), f"host reads grow with the steps ({many} vs {few} steps)"


def test_the_counter_sees_a_per_step_read(monkeypatch, digits):
    """The check can fail: a loss that reads itself every step is caught."""

    class Reading(CrossEntropy):
        def forward(self, inputs):
            total, terms = super().forward(inputs)
            total.item()
            return total, terms

    def run(batch_size: int) -> int:
        model = build_model({"name": "small_cnn"}, digits.spec)
        return count_syncs(monkeypatch, lambda: fit(stage(batch_size), model, Reading(), digits, TeacherSource(), CPU))

    assert run(32) > run(128)
