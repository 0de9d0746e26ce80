"""A stage's training state in-process: an interrupted fit resumes exactly, non-finite steps are skipped and
counted, a state of another stage is refused."""

import logging
import signal
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

import kdrun.training.loop
from kdrun.core.errors import KdrunError
from kdrun.core.signals import Interrupted
from kdrun.data import build_data
from kdrun.losses import CrossEntropy, build_objective
from kdrun.models import build_model
from kdrun.training.loop import CHECK_EVERY, Stage, fit
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher, TeacherSource

CPU = Runtime(torch.device("cpu"), "off")
SGD, NO_SCHED = OmegaConf.create({"name": "sgd"}), OmegaConf.create({"name": "none"})


@pytest.mark.parametrize("loss", ["ce", "fitnet"])  # fitnet: its adapter is part of the training state
def test_fit_resumed_from_its_epoch_state_equals_the_uninterrupted_fit(tmp_path, loss):
    data = build_data({"name": "digits", "val_fraction": 0.2})
    optim, sched = OmegaConf.create({"name": "sgd", "momentum": 0.9}), OmegaConf.create({"name": "cosine"})
    plan = Stage("s", epochs=4, batch_size=64, lr=0.05, optim=optim, sched=sched, seed=0)
    cnn = {"name": "small_cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.3}  # dropout: the torch RNG counts

    torch.manual_seed(1)
    teacher = build_model({"name": "small_cnn", "channels": [8, 8], "hidden": 16}, data.spec) if loss != "ce" else None

    def train(epochs, state=None):
        torch.manual_seed(0)
        model = build_model(cnn, data.spec)
        objective = build_objective({"name": loss}, 4.0, 0.5)
        source = TeacherSource() if teacher is None else OnlineTeacher(teacher)
        result = fit(replace(plan, epochs=epochs, state_path=state), model, objective, data, source, CPU)
        return result, objective

    whole, whole_objective = train(4)
    state = tmp_path / "s.state.pt"

    def stop_in_epoch_3(where, saved):
        if "epoch 3, step 5" in where:
            raise Interrupted(f"stopped {where}; {saved}", signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kdrun.training.loop, "check_stop", stop_in_epoch_3)
        with pytest.raises(Interrupted, match="its epochs 1-2 are saved in"):
            train(4, state)
    torch.manual_seed(123)  # whatever the process did meanwhile
    resumed, resumed_objective = train(4, state)
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in whole.history]
    assert [r["val/acc"] for r in resumed.history] == [r["val/acc"] for r in whole.history]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in whole_objective.state_dict().items():
        assert torch.equal(v, resumed_objective.state_dict()[k]), k
    assert (len(whole_objective.state_dict()) > 0) == (loss == "fitnet")
    assert resumed.best_epoch == whole.best_epoch


class NanFirst(CrossEntropy):
    """CE whose first ``bad`` steps give a NaN loss."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def forward(self, inputs):
        loss, terms = super().forward(inputs)
        if self.bad > 0:
            self.bad -= 1
            return loss * float("nan"), terms
        return loss, terms


def test_a_few_non_finite_steps_are_skipped_and_too_many_stop_the_stage(caplog):
    # The loop reads the count of skipped steps every CHECK_EVERY steps and at each epoch's end (no host sync per
    # step): the warning gives the count so far, and too many stop the stage at the first read past the limit.
    data = build_data({"name": "digits", "val_fraction": 0.2})
    cosine = OmegaConf.create({"name": "cosine"})
    plan = Stage("baseline", epochs=2, batch_size=64, lr=0.05, optim=SGD, sched=cosine, seed=0, max_nonfinite_steps=3)
    steps = data.train.num_batches(64, shuffle=True)
    assert steps < CHECK_EVERY  # the count is read at the end of each epoch
    torch.manual_seed(0)
    model = build_model({"name": "mlp"}, data.spec)
    with caplog.at_level(logging.WARNING, logger="kdrun.training.loop"):
        result = fit(plan, model, NanFirst(3), data, TeacherSource(), CPU)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # skipped steps left the weights alone
    assert result.val_acc_best > 0.5
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    # all 3 skipped steps counted, reported once: epoch 2 skipped none
    assert warnings == [f"baseline epoch 1: non-finite loss, 3 step(s) skipped so far (by step {steps})"]
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule advanced on skipped steps too

    with pytest.raises(KdrunError) as err:
        fit(replace(plan, name="student"), build_model({"name": "mlp"}, data.spec), NanFirst(5), data, TeacherSource(),
            CPU)  # fmt: skip
    message = str(err.value)
    assert f"stage student, epoch 1, step {steps}: the loss was not finite in 5 steps" in message
    assert "train.max_nonfinite_steps=3" in message and "train.student.lr" in message
    assert "overflow" not in message  # amp=off: no low-precision hint

    # A long epoch stops at the first periodic read, not at its end; under bf16 the hint is amp=off.
    long_epoch = replace(plan, name="student", batch_size=16)
    assert data.train.num_batches(16, shuffle=True) > CHECK_EVERY
    bf16 = Runtime(torch.device("cpu"), "bf16")
    with pytest.raises(KdrunError) as err:
        fit(long_epoch, build_model({"name": "mlp"}, data.spec), NanFirst(5), data, TeacherSource(), bf16)
    message = str(err.value)
    assert f"stage student, epoch 1, step {CHECK_EVERY}: the loss was not finite in 5 steps" in message
    assert "low-precision overflow (amp=bf16: try amp=off)" in message


def test_state_of_another_stage_is_refused(tmp_path):
    data = build_data({"name": "digits", "val_fraction": 0.2})
    state = tmp_path / "x.state.pt"
    plan = Stage("teacher", epochs=1, batch_size=64, lr=0.05, optim=SGD, sched=NO_SCHED, seed=0, state_path=state)
    fit(plan, build_model({"name": "mlp"}, data.spec), CrossEntropy(), data, TeacherSource(), CPU)
    with pytest.raises(KdrunError, match="holds teacher epoch 1, not a state of student"):
        fit(replace(plan, name="student"), build_model({"name": "mlp"}, data.spec), CrossEntropy(), data,
            TeacherSource(), CPU)  # fmt: skip
