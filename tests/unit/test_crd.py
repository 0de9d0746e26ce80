"""CRD: the NCE loss and the memory bank by hand, the draw of negatives, gradients, and an exact resume of a student
stage interrupted mid-way (the bank, its Z constants and the negatives' random stream are in the training state)."""

import json
import math
import signal
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import kdrun.training.loop
from kdrun.core.errors import KdrunError
from kdrun.core.signals import Interrupted
from kdrun.data import DataSpec, build_data
from kdrun.losses import LossInput, build_objective
from kdrun.losses.crd import ContrastMemory, nce_loss
from kdrun.models import build_model
from kdrun.models.checkpoint import read_checkpoint
from kdrun.pipeline.run import run
from kdrun.training.loop import Stage, fit
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher
from tests.conftest import without_timings

CPU = Runtime(torch.device("cpu"), "off")


def test_nce_loss_by_hand():
    # One anchor, P = 0.5 for its positive, 0.1 and 0.2 for its K=2 negatives, N=4 samples: K * Pn = 0.5.
    p = torch.tensor([[0.5, 0.1, 0.2]])
    expected = -(math.log(0.5 / (0.5 + 0.5 + 1e-7)) + math.log(0.5 / (0.1 + 0.5 + 1e-7)) + math.log(0.5 / 0.7))
    assert nce_loss(p, 4).item() == pytest.approx(expected, rel=1e-6)
    # Two anchors: the sum over both, divided by 2.
    p2 = torch.tensor([[0.5, 0.1, 0.2], [0.9, 0.3, 0.0]])
    second = -(math.log(0.9 / 1.4) + math.log(0.5 / 0.8) + math.log(0.5 / 0.5))
    assert nce_loss(p2, 4).item() == pytest.approx((expected + second) / 2, rel=1e-5)


def unit(*xs: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in xs))
    return [x / norm for x in xs]


def test_contrast_memory_scores_z_and_update_by_hand():
    # 4 samples of classes (0, 0, 1, 1); K=2: the anchor (sample 0) gets exactly the two samples of class 1.
    memory = ContrastMemory(torch.tensor([0, 0, 1, 1]), dim=2, negatives=2, temperature=0.5, momentum=0.5)
    bank_s = torch.tensor([unit(1, 0), unit(0, 1), unit(1, 1), unit(1, -1)])
    bank_t = torch.tensor([unit(0, 1), unit(1, 0), unit(-1, 1), unit(2, 1)])
    memory.memory_s.copy_(bank_s)
    memory.memory_t.copy_(bank_t)
    v_s, v_t = torch.tensor([unit(3, 4)]), torch.tensor([unit(1, 2)])
    loss_s, loss_t = memory(v_s, v_t, torch.tensor([0]))

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def expected(anchor, bank):
        p = [math.exp(dot(anchor, bank[j]) / 0.5) for j in (0, 2, 3)]  # the positive first; negatives in any order
        z = sum(p) / 3 * 4  # mean of the first batch's exp-scores times N
        q = [x / z for x in p]
        noise = 2 / 4
        return z, -(math.log(q[0] / (q[0] + noise + 1e-7)) + sum(math.log(noise / (x + noise + 1e-7)) for x in q[1:]))

    z_s, want_s = expected(v_s[0].tolist(), bank_t.tolist())  # student anchor against the teacher's bank
    z_t, want_t = expected(v_t[0].tolist(), bank_s.tolist())
    assert memory.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    assert loss_s.item() == pytest.approx(want_s, rel=1e-5) and loss_t.item() == pytest.approx(want_t, rel=1e-5)
    # The anchor's bank entries move halfway to its embedding and are renormalised; the others stay.
    moved_s = torch.nn.functional.normalize(0.5 * bank_s[0] + 0.5 * v_s[0], dim=0)
    assert torch.allclose(memory.memory_s[0], moved_s) and torch.equal(memory.memory_s[1:], bank_s[1:])
    assert torch.allclose(memory.memory_t[0], torch.nn.functional.normalize(0.5 * bank_t[0] + 0.5 * v_t[0], dim=0))
    # Z is estimated once: a second batch scores against the first batch's Z.
    memory(v_s, v_t, torch.tensor([1]))
    assert memory.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


@pytest.mark.parametrize("k, replace", [(5, False), (40, True)])
def test_negatives_are_of_other_classes_and_drawn_without_replacement_when_there_are_enough(k, replace):
    torch.manual_seed(0)
    labels = torch.arange(30) % 3  # 20 samples of other classes for each anchor
    memory = ContrastMemory(labels, dim=4, negatives=k, temperature=0.07, momentum=0.5)
    assert memory.replace == replace
    index = torch.tensor([0, 1, 2, 7, 29])
    drawn = memory.negatives(index)
    assert drawn.shape == (5, k)
    assert (labels[drawn] != labels[index].unsqueeze(1)).all()
    if not replace:
        assert all(len(set(row.tolist())) == k for row in drawn)
    else:  # 200 draws per row hit every one of the 20 candidates
        rows = memory.negatives(index.repeat_interleave(5))
        for row, anchor in zip(rows.view(5, -1), index, strict=True):
            assert set(row.tolist()) == {i for i in range(30) if labels[i] != labels[anchor]}


def test_a_training_split_of_one_class_is_refused():
    with pytest.raises(KdrunError, match="other classes, but the training split has 1"):
        ContrastMemory(torch.zeros(8, dtype=torch.long), dim=4, negatives=2, temperature=0.07, momentum=0.5)


def test_crd_gradients_reach_the_student_and_both_heads_never_the_teacher():
    torch.manual_seed(0)
    spec = DataSpec(10, 1, 16)
    student = build_model({"name": "small_cnn", "channels": [8, 16], "hidden": 32}, spec)
    teacher = build_model({"name": "resnet8"}, spec)
    objective = build_objective({"name": "crd", "nce_k": 8}, 4.0, 1.0)
    objective.bind_data(torch.arange(20) % 4)
    source = OnlineTeacher(teacher)
    net = source.attach(student, objective, SimpleNamespace(spec=spec), CPU, mixes=False)
    x, y, index = torch.randn(6, 1, 16, 16), torch.arange(6) % 4, torch.tensor([3, 1, 4, 15, 9, 2])
    logits, features = net(x)
    t_logits, t_features = source(x, index)
    _, terms = objective(LossInput(logits, y, t_logits, features, t_features, index))
    assert features[0].shape == (6, 32) and t_features[0].shape == (6, 64)  # the embeddings
    terms["crd"].backward()
    assert student.features[0].weight.grad.abs().sum() > 0
    assert objective.embed_s.linear.weight.grad.abs().sum() > 0 and objective.embed_t.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_crd_student_stage_resumed_mid_way_equals_the_uninterrupted_one(tmp_path):
    data = build_data({"name": "digits", "val_fraction": 0.2})
    optim, sched = OmegaConf.create({"name": "sgd", "momentum": 0.9}), OmegaConf.create({"name": "cosine"})
    plan = Stage("student", epochs=4, batch_size=64, lr=0.05, optim=optim, sched=sched, seed=0)
    torch.manual_seed(1)
    teacher = build_model({"name": "small_cnn", "channels": [8, 8], "hidden": 16}, data.spec)

    def train(state=None):
        torch.manual_seed(0)
        model = build_model({"name": "small_cnn", "channels": [8, 16], "hidden": 32}, data.spec)
        objective = build_objective({"name": "crd", "nce_k": 256, "feat_dim": 16}, 4.0, 0.5)
        result = fit(replace(plan, state_path=state), model, objective, data, OnlineTeacher(teacher), CPU)
        return result, objective

    whole, whole_objective = train()
    state = tmp_path / "student.state.pt"

    def stop_in_epoch_3(where, saved):
        if "epoch 3, step 5" in where:
            raise Interrupted(f"stopped {where}; {saved}", signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kdrun.training.loop, "check_stop", stop_in_epoch_3)
        with pytest.raises(Interrupted, match="its epochs 1-2 are saved in"):
            train(state)
    torch.manual_seed(123)  # whatever the process did meanwhile
    resumed, resumed_objective = train(state)
    assert [r["train/crd"] for r in resumed.history] == [r["train/crd"] for r in whole.history]
    assert [r["val/acc"] for r in resumed.history] == [r["val/acc"] for r in whole.history]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    bank, resumed_bank = whole_objective.memory, resumed_objective.memory
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(getattr(bank, name), getattr(resumed_bank, name)), name
    assert torch.equal(bank.sampler.get_state(), resumed_bank.sampler.get_state())
    for k, v in whole_objective.embed_s.state_dict().items():
        assert torch.equal(v, resumed_objective.embed_s.state_dict()[k]), k
    # The bank was trained: Z is set and the entries are unit vectors (the random initial ones are not).
    assert (bank.z > 0).all() and torch.allclose(bank.memory_s.norm(dim=1), torch.ones(len(data.train)))


def test_a_run_killed_in_its_crd_student_stage_resumes_to_the_same_metrics_and_weights(tmp_path):
    # The whole pipeline: the loop gives the bank the student split's labels before the state is resumed.
    overrides = ["loss=crd", "loss.nce_k=64", "alpha=1.0", "train.teacher.epochs=2", "train.student.epochs=3",
                 "train.student.batch_size=16", "baseline=false", "report.enabled=false", "cache=off",
                 "train.progress=false"]  # fmt: skip

    def run_to(run_dir):
        with initialize_config_module("kdrun.conf", version_base="1.3"):
            run(compose("config", overrides=overrides), run_dir)
        return json.loads((run_dir / "metrics.json").read_text())

    whole = run_to(tmp_path / "whole")

    def stop(at, saved):
        if "in stage student, epoch 2, step 3" in at:
            raise Interrupted(f"stopped {at}; {saved}", signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kdrun.training.loop, "check_stop", stop)
        with pytest.raises(Interrupted, match="its epochs 1-1 are saved in"):
            run_to(tmp_path / "resumed")
    resumed = run_to(tmp_path / "resumed")
    assert without_timings(resumed["student"]) == without_timings(whole["student"])
    want = read_checkpoint(tmp_path / "whole" / "student.safetensors")["state_dict"]
    got = read_checkpoint(tmp_path / "resumed" / "student.safetensors")["state_dict"]
    assert all(torch.equal(v, got[k]) for k, v in want.items())
