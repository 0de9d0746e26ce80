"""The methods with an init phase (AB, FT, FSP): their formulas by hand, what each phase trains, and the phase itself
in a real run: before distillation, logged under student/init, recorded in metrics.json, resumed exactly."""

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kdrun.training.loop
from kdrun.core.errors import KdrunError
from kdrun.core.signals import Interrupted
from kdrun.data import DataSpec, build_data
from kdrun.losses import build_objective
from kdrun.losses.ab import ab_loss, boundary_loss
from kdrun.losses.fsp import fsp_loss, fsp_matrix
from kdrun.losses.ft import factor_transfer
from kdrun.models import build_model
from kdrun.models.checkpoint import read_checkpoint
from kdrun.pipeline.run import run
from kdrun.pipeline.stages import RunContext, init_phase
from kdrun.training.loop import Stage, fit
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher
from tests.conftest import without_timings

CPU = Runtime(torch.device("cpu"), "off")
SMALL = {"name": "small_cnn", "channels": [8, 16], "hidden": 32}

# --- formulas by hand -----------------------------------------------------------------------------------------------


def test_boundary_and_ab_loss_by_hand():
    # Teacher off/off/on/on. Student -2 (off, beyond the margin: 0), 0.5 (off: (0.5+1)^2), 0.2 (on: (0.2-1)^2),
    # 3 (on, beyond the margin: 0).
    source, target = (
        torch.tensor([-2.0, 0.5, 0.2, 3.0]).view(1, 1, 2, 2),
        torch.tensor([-1.0, -1, 1, 1]).view(1, 1, 2, 2),
    )
    assert boundary_loss(source, target).item() == pytest.approx(2.25 + 0.64)
    # A second, deeper level: 1.5 (on, beyond: 0), -0.5 (off: 0.5^2). Weights 1/2 (shallower) and 1; / B * 3/1000.
    deeper_s, deeper_t = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    want = (0.5 * 2.89 + 0.25) * 3 / 1000
    assert ab_loss([source, deeper_s], [target, deeper_t]).item() == pytest.approx(want)
    # The batch size divides: the same sample twice gives the same loss.
    twice = ab_loss([source.repeat(2, 1, 1, 1), deeper_s.repeat(2, 1, 1, 1)], [target.repeat(2, 1, 1, 1),
                    deeper_t.repeat(2, 1, 1, 1)])  # fmt: skip
    assert twice.item() == pytest.approx(want)


def test_fsp_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # channels (1, 2) and (3, 4) over 2 positions
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(1, 2, 1, 2)
    c = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    # G[j, i] = mean over positions of b_j * a_i
    assert fsp_matrix(a, b).tolist() == [[[1.5, 3.5], [1.0, 3.0]]]
    assert fsp_matrix(b, c).tolist() == [[[0.0, 1.0]]]
    # The larger map is average-pooled to the smaller's size: (1 + 2 + 3 + 5) / 4 = 2.75, times 2.
    assert fsp_matrix(torch.tensor([1.0, 2, 3, 5]).view(1, 1, 2, 2), torch.full((1, 1, 1, 1), 2.0)).item() == 5.5
    # Against a teacher of zeros: mean(G^2) of each consecutive pair, summed: 24.5 / 4 + 1 / 2.
    zeros = [torch.zeros_like(f) for f in (a, b, c)]
    assert fsp_loss([a, b, c], zeros).item() == pytest.approx(6.125 + 0.5)


def test_factor_transfer_by_hand():
    student = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).view(1, 2, 1, 2)
    # RepDistiller's form: mean_c f^2 -> (1, 2) and (4, 0), L2-normalised, then the mean absolute difference.
    teacher = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    r5 = math.sqrt(5)
    assert factor_transfer(student, teacher).item() == pytest.approx(((1 - 1 / r5) + 2 / r5) / 2)
    # The paper's form: the whole factor flattened, (1, 0, 1, 2) / sqrt(6) against (1, 0, 0, 0).
    teacher2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    r6 = math.sqrt(6)
    assert factor_transfer(student, teacher2, channel_mean=False).item() == pytest.approx((1 - 1 / r6 + 3 / r6) / 4)


def test_fsp_refuses_layers_of_other_widths_with_the_channels():
    spec = DataSpec(10, 1, 8)
    objective = build_objective({"name": "fsp"}, 4.0, 1.0)
    with pytest.raises(KdrunError, match=r"have \[8, 8, 16, 16\] channels, the teacher's .* have \[16, 16, 32, 64\]"):
        objective.bind(build_model(SMALL, spec), build_model({"name": "resnet8"}, spec), torch.zeros(2, 1, 8, 8))


# --- what each phase trains ------------------------------------------------------------------------------------------


def context(tmp_path: Path, *overrides: str) -> RunContext:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["train.progress=false", *overrides])
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return RunContext(cfg, build_data(cfg.dataset), CPU, run_dir=tmp_path)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("loss", ["ab", "fsp", "ft"])
def test_each_init_phase_trains_its_parts_and_distillation_follows(tmp_path, loss):
    ctx = context(tmp_path, f"loss={loss}", "loss.init_epochs=2", "alpha=1.0")
    torch.manual_seed(0)
    student_cfg = SMALL if loss != "fsp" else {"name": "resnet8"}  # FSP pairs layers of equal widths
    student, teacher = build_model(student_cfg, ctx.data.spec), build_model({"name": "resnet8"}, ctx.data.spec)
    objective = build_objective(ctx.cfg.loss, 4.0, 1.0)
    plan = Stage("student", epochs=1, batch_size=32, lr=0.05, optim=ctx.cfg.optim, sched=ctx.cfg.sched, seed=0)
    source = OnlineTeacher(teacher)
    objective.bind(student, teacher, torch.zeros(2, 1, 8, 8))  # as preflight does: the parts exist before the phase
    student_before, objective_before = params(student), params(objective)
    entry = init_phase(ctx, plan, student, objective, source, ctx.data)["init_phase"]
    assert entry["epochs"] == 2 and entry["trains_student"] == (loss != "ft") and math.isfinite(entry["train_loss"])
    assert entry["lr"] == (0.01 if loss == "ft" else 0.05)  # FT's own init lr; else the student's
    moved_student, moved_objective = changed(student_before, student), changed(objective_before, objective)
    if loss == "ft":  # the paraphraser alone; the student as it was, BatchNorm statistics too
        assert not moved_student and moved_objective and all(k.startswith("paraphraser.") for k in moved_objective)
    else:  # the student's feature layers (never its classifier) and AB's connectors
        assert any(k.startswith(("features.", "conv1", "layer")) for k in moved_student)
        assert not any(k.startswith(("fc.", "classifier.")) for k in moved_student)
        assert (loss == "ab") == bool(moved_objective)
    after_init = params(objective)
    fit(plan, student, objective, ctx.data, source, CPU)
    moved = changed(after_init, objective)
    if loss == "ft":  # the translator trains with the student; the paraphraser is frozen
        assert moved and all(k.startswith("translator.") for k in moved)
    else:  # ab_weight = fsp_weight = 0: nothing of the method trains in distillation
        assert not moved


# --- the phase in a run ----------------------------------------------------------------------------------------------

QUICK = ["train.teacher.epochs=2", "train.student.epochs=3", "train.student.batch_size=16", "loss.init_epochs=3",
         "baseline=false", "report.enabled=false", "cache=off", "train.progress=false", "alpha=1.0"]  # fmt: skip


def run_with(run_dir: Path, *overrides: str) -> dict:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*QUICK, *overrides])
    run(cfg, run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {t[len(prefix) :]: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
            if t.startswith(prefix)}  # fmt: skip


def test_an_init_phase_in_a_run_is_logged_recorded_and_resumed_exactly(tmp_path):
    method = ["loss=ft", "student=small_cnn"]
    whole = run_with(tmp_path / "whole", *method)
    init = whole["student"]["init_phase"]
    assert init["epochs"] == 3 and init["lr"] == 0.01 and init["trains_student"] is False
    curves = scalars(tmp_path / "whole", "student/init/")
    assert [s for s, _ in curves["train/reconstruction"]] == [1, 2, 3]
    assert curves["train/loss"] == curves["train/reconstruction"]  # the init loss is the reconstruction alone
    assert curves["train/loss"][-1][1] == pytest.approx(init["train_loss"])
    assert [v for _, v in curves["lr"]] == pytest.approx([0.01] * 3)  # constant
    assert [s for s, _ in scalars(tmp_path / "whole", "student/")["train/ft"]] == [1, 2, 3]
    assert not list((tmp_path / "whole" / "checkpoints").glob("*.state.pt"))  # both phases' states removed

    run_dir = tmp_path / "resumed"
    for where in ("in stage student/init, epoch 2, step 3", "in stage student, epoch 2, step 3"):

        def stop(at, saved, where=where):
            if where in at:
                raise Interrupted(f"stopped {at}; {saved}", signal.SIGTERM)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kdrun.training.loop, "check_stop", stop)
            with pytest.raises(Interrupted, match="its epochs 1-1 are saved in"):
                run_with(run_dir, *method)
    resumed = run_with(run_dir, *method)
    assert without_timings(resumed["teacher"]) == without_timings(whole["teacher"])
    assert without_timings(resumed["student"]) == without_timings(whole["student"])  # init_phase too
    saved = read_checkpoint(run_dir / "student.safetensors")["state_dict"]
    for k, v in read_checkpoint(tmp_path / "whole" / "student.safetensors")["state_dict"].items():
        assert torch.equal(v, saved[k]), k
