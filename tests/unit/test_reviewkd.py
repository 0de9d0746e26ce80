"""ReviewKD: HCL by hand, the ABF wiring (deepest first, the teacher's shapes), the default taps (the teacher's stage
pre-activations), the warm-up, gradients, and pre-activation taps on the catalogue's families."""

from types import SimpleNamespace

import pytest
import torch

from kdrun.data import DataSpec
from kdrun.losses import LossInput, build_objective
from kdrun.losses.reviewkd import hcl_loss
from kdrun.losses.taps import preactivations, stage_preactivations, stem_output
from kdrun.models import build_model
from kdrun.models.features import FeatureTap, default_taps
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher

CPU = Runtime(torch.device("cpu"))
SPEC = DataSpec(10, 3, 16)


def test_hcl_by_hand():
    # Level 1: a 4x4 map 0..15 against zeros. MSE 1240/16 = 77.5; pooled to 2x2 (2.5, 4.5, 10.5, 12.5): 73.25;
    # to 1x1 (7.5): 56.25; the 4x4 pool is not smaller than the map, so skipped. (77.5 + 73.25/2 + 56.25/4) / 1.75.
    fs, ft = torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    level1 = (77.5 + 73.25 / 2 + 56.25 / 4) / 1.75
    assert hcl_loss([fs], [ft]).item() == pytest.approx(level1)
    # Level 2: 1x1 maps 3 against 1: MSE 4, no pooling. The levels add up.
    assert hcl_loss([fs, torch.full((1, 1, 1, 1), 3.0)], [ft, torch.ones(1, 1, 1, 1)]).item() == pytest.approx(
        level1 + 4.0
    )
    # An 8x8 map is pooled to 4, 2 and 1 (weights 1/2, 1/4, 1/8): a constant difference c gives c^2 at every size.
    assert hcl_loss([torch.full((2, 3, 8, 8), 2.0)], [torch.zeros(2, 3, 8, 8)]).item() == pytest.approx(4.0)


def bound(student_name="resnet8", teacher_name="resnet20", **options):
    torch.manual_seed(0)
    student, teacher = build_model({"name": student_name}, SPEC), build_model({"name": teacher_name}, SPEC)
    objective = build_objective({"name": "reviewkd", **options}, 4.0, 1.0)
    source = OnlineTeacher(teacher)
    net = source.attach(student, objective, SimpleNamespace(spec=SPEC), CPU, mixes=False)
    return student, teacher, objective, source, net


def test_default_taps_are_the_stages_and_embedding_with_the_teachers_pre_activations():
    student, teacher, objective, source, net = bound()
    assert objective.student_layers == ["layer1", "layer2", "layer3", "flatten"]
    assert objective.teacher_layers == ["layer1.2.add", "layer2.2.add", "layer3.2.add", "flatten"]
    x = torch.randn(4, 3, 16, 16)
    _, t_features = source(x, torch.arange(4))
    _, post = FeatureTap(teacher, ["layer1", "layer2", "layer3"]).eval()(x)
    for pre, out in zip(t_features[:3], post, strict=True):  # the tap is the ReLU's input: the stage output is its ReLU
        assert (pre < 0).any() and torch.equal(pre.clamp_min(0), out)
    plain = bound(teacher_preact=False)[2]
    assert plain.teacher_layers == ["layer1", "layer2", "layer3", "flatten"]


def test_abf_outputs_take_the_teachers_shapes_and_fuse_deepest_first():
    student, teacher, objective, source, net = bound("small_cnn", "resnet8")
    assert [a.att_conv is None for a in objective.abfs] == [False, False, False, True]  # the deepest is not fused
    x = torch.randn(4, 3, 16, 16)
    _, s_features = net(x)
    _, t_features = source(x, torch.arange(4))
    s_features = [f.detach().requires_grad_() for f in s_features]  # leaves: only the fusion links them
    fused = objective.fused(s_features)
    assert [tuple(f.shape) for f in fused] == [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4), (4, 64, 1, 1)]
    assert [f.shape[1:] for f in fused[:3]] == [t.shape[1:] for t in t_features[:3]]
    # Each level depends on the deeper ones (the review), never on the shallower ones.
    first = torch.autograd.grad(fused[0].sum(), s_features, allow_unused=True, retain_graph=True)
    last = torch.autograd.grad(fused[-1].sum(), s_features, allow_unused=True)
    assert all(g is not None for g in first) and [g is None for g in last] == [True, True, True, False]


def test_warm_up_gradients_and_a_second_bind_keeping_the_fusion_modules():
    student, teacher, objective, source, net = bound()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    objective.set_epoch(5)  # 5/20 of the weight
    logits, features = net(x)
    t_logits, t_features = source(x, torch.arange(4))
    total, terms = objective(LossInput(logits, y, t_logits, features, t_features))
    assert total.item() == pytest.approx((terms["ce"] + 5.0 * 5 / 20 * terms["hcl"]).item(), rel=1e-6)
    terms["hcl"].backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in objective.abfs.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    modules = list(objective.abfs)
    objective.bind(student, teacher, x)
    assert list(objective.abfs) == modules


@pytest.mark.parametrize(
    "name, stages, preact, stem",
    [
        ("resnet20", ["layer1", "layer2", "layer3"], ["layer1.2.add", "layer2.2.add", "layer3.2.add"], "relu"),
        ("wrn_16_2", ["block1", "block2", "relu"], ["block1", "block2", "bn"], "conv1"),
        ("resnet18", ["relu", "layer1", "layer2", "layer3", "layer4"],
         ["bn1", "layer1.1.add", "layer2.1.add", "layer3.1.add", "layer4.1.add"], "bn1"),
    ],
)  # fmt: skip
def test_pre_activation_and_stem_taps(name, stages, preact, stem):
    model = build_model({"name": name}, DataSpec(10, 3, 32))
    x = torch.zeros(2, 3, 32, 32)
    assert default_taps(model, x).stages == stages
    assert preactivations(model, stages, x, "teacher") == preact
    assert stem_output(model, stages[0]) == stem
    _, features = FeatureTap(model.eval(), preact)(torch.randn(2, 3, 32, 32))
    assert all((f < 0).any() for f in features)  # in-place ReLUs were made out of place: the taps see their inputs


@pytest.mark.parametrize(
    "name, preact",
    [
        ("resnet20", ["layer1.2.add", "layer2.2.add", "layer3.2.add"]),  # the zoo's, equal to the graph's
        ("shufflenet_v2_cifar", ["layer1.3.cat", "layer2.7.cat", "layer3.3.cat"]),  # the graph finds none: the zoo's
        ("resnet18", ["bn1", "layer1.1.add", "layer2.1.add", "layer3.1.add", "layer4.1.add"]),  # torchvision: graph
    ],
)
def test_the_methods_take_a_models_own_pre_activations_and_find_the_others(name, preact, caplog):
    model = build_model({"name": name}, DataSpec(10, 3, 32))
    x = torch.zeros(2, 3, 32, 32)
    assert stage_preactivations(model, x, "teacher") == preact
    assert "no pre-activation found" not in caplog.text
    for objective in (build_objective({"name": "ab"}, 4.0, 0.2), build_objective({"name": "reviewkd"}, 4.0, 0.2)):
        assert objective.default_layers(model, x, "teacher")[: len(preact)] == preact
