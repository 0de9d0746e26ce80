"""Feature losses (fitnet, at, rkd) and their taps: values by hand, gradients, every family's default taps."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.data import DataSpec
from kdrun.losses import LossInput, build_objective
from kdrun.losses.at import attention_transfer
from kdrun.losses.fitnet import hint_loss
from kdrun.losses.rkd import rkd_angle, rkd_distance
from kdrun.models import build_model, catalogue
from kdrun.models.features import FeatureTap, default_taps
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher

CPU = Runtime(torch.device("cpu"))
# One model of each family in the catalogue (deeper or wider ones share their family's code and taps).
FAMILIES = [
    "small_cnn", "lenet5", "mlp",  # kdrun's small students
    "resnet20", "wrn_16_2",  # CIFAR-style ResNet and WRN
    "resnet18_cifar", "vgg8_cifar", "mobilenet_v2_half", "shufflenet_v1", "shufflenet_v2_cifar",  # the CIFAR zoo
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small",  # torchvision
    "efficientnet_b0", "shufflenet_v2_x1_0",
]  # fmt: skip
SHAPES = {"1ch_28px": DataSpec(10, 1, 28), "3ch_32px": DataSpec(10, 3, 32)}


def test_the_families_cover_every_builder_of_the_catalogue():
    builders = {catalogue.load(n).get("name") for n in catalogue.names()} - {"ensemble", "torchvision", None}
    family = {n: build_model(catalogue.load(n), SHAPES["3ch_32px"]).__class__ for n in builders}
    assert {family[n] for n in builders} == {family[n] for n in FAMILIES}


def model(name: str, spec: DataSpec) -> nn.Module:
    return build_model(catalogue.load(name), spec)


def example(spec: DataSpec, n: int = 4) -> torch.Tensor:
    return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size)


# --- values computed by hand -------------------------------------------------------------------------------------


def test_attention_transfer_by_hand():
    # Student: the same activation everywhere -> attention 1/2 at each of 4 positions.
    # Teacher: all activation at one position -> attention (1, 0, 0, 0). Mean of (diff)^2 = (1/4 + 3 * 1/4) / 4.
    student = torch.ones(1, 2, 2, 2)
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, :, 0, 0] = 1.0
    assert attention_transfer(student, teacher).item() == pytest.approx(0.25)
    # A 4x4 student map is average-pooled to the teacher's 2x2 first: the same value.
    assert attention_transfer(torch.ones(1, 3, 4, 4), teacher).item() == pytest.approx(0.25)
    assert attention_transfer(teacher, teacher).item() == 0.0


def test_rkd_distance_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # distances 1, 1, sqrt 2
    assert rkd_distance(2 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # distances 1, 2, 1
    t_mean, s_mean = (2 + math.sqrt(2)) / 3, 4 / 3  # mean of the non-zero distances
    pairs = [(1 / s_mean, 1 / t_mean), (2 / s_mean, 1 / t_mean), (1 / s_mean, math.sqrt(2) / t_mean)]
    smooth_l1 = [0.5 * (s - t) ** 2 for s, t in pairs]  # every |difference| < 1
    expected = 2 * sum(smooth_l1) / 9  # each pair twice in the 3x3 matrix, zero diagonal
    assert rkd_distance(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right angle at 0, 45 degrees at 1 and 2
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # collinear: cosines -1 at 0, +1 at 1 and 2
    # Of the 27 triplet cosines only the 6 with two distinct other points differ.
    diffs = [-1.0 - 0.0, 1.0 - 1 / math.sqrt(2), 1.0 - 1 / math.sqrt(2)]
    smooth_l1 = [abs(d) - 0.5 if abs(d) >= 1 else 0.5 * d * d for d in diffs]
    assert rkd_angle(student, teacher).item() == pytest.approx(2 * sum(smooth_l1) / 27, rel=1e-5)
    rotated = teacher @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert rkd_angle(3 * rotated, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_total_by_hand():
    # Bind to two one-layer nets whose taps we name, then fix the adapter to (x, -x).
    student = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(4, 2))
    teacher = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(8, 2))
    named = {"name": "fitnet", "hint_weight": 10.0, "student_layers": ["0"], "teacher_layers": ["0"]}
    objective = build_objective(named, T=2.0, alpha=0.25)
    objective.bind(student, teacher, torch.zeros(2, 1, 2, 2))
    adapter = objective.adapters[0]
    with torch.no_grad():
        adapter.proj[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    adapter.eval()  # BatchNorm with its initial statistics: x / sqrt(1 + eps)
    s_feature = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    t_feature = torch.zeros(1, 2, 2, 2)
    s_logits, t_logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
    inputs = LossInput(s_logits, y, t_logits, student_features=[s_feature], teacher_features=[t_feature])
    total, terms = objective(inputs)
    hint = (1 + 4 + 9 + 16) / 4 / (1 + 1e-5)  # mean of x^2 over both channels
    assert terms["hint"].item() == pytest.approx(hint, rel=1e-5)
    kd = build_objective({"name": "kd"}, 2.0, 0.25)(LossInput(s_logits, y, t_logits))[0]
    assert total.item() == pytest.approx(kd.item() + 10.0 * hint, rel=1e-5)  # KD's own total plus the hint


def test_hint_adapter_resizes_to_the_teacher_map():
    objective = build_objective({"name": "fitnet"}, 4.0, 0.2)
    objective.build(
        [(2, 8, 8, 8), (2, 8, 2, 2), (2, 16), (2, 8, 4, 4)], [(2, 32, 4, 4), (2, 32, 4, 4), (2, 32), (2, 64)]
    )
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 2, 2), torch.randn(2, 16), torch.randn(2, 8, 4, 4)]
    assert [tuple(a(f).shape) for a, f in zip(objective.adapters, feats, strict=True)] == [
        (2, 32, 4, 4),  # pooled down
        (2, 32, 4, 4),  # upsampled
        (2, 32),
        (2, 64),  # a map against a vector: pooled, then linear
    ]
    assert hint_loss(torch.zeros(2, 3), torch.ones(2, 3, 4, 4)).item() == pytest.approx(1.0)


# --- taps ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, stages, embedding",
    [
        ("resnet20", ["layer1", "layer2", "layer3"], "flatten"),
        ("wrn_16_2", ["block1", "block2", "relu"], "flatten"),
        ("small_cnn", ["features.1", "features.5", "features"], "classifier.3"),
        ("resnet18", ["relu", "layer1", "layer2", "layer3", "layer4"], "flatten"),
        ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features"], "classifier.0"),
        ("shufflenet_v2_x1_0", ["conv1", "maxpool", "stage2", "stage3", "stage4"], "mean"),
        ("mlp", [], "net.6"),
    ],
)
def test_default_taps_are_the_stage_outputs_and_the_classifier_input(name, stages, embedding):
    spec = SHAPES["3ch_32px"]
    taps = default_taps(model(name, spec), example(spec))
    assert (taps.stages, taps.embedding) == (stages, embedding)


def step(student, teacher, objective, x, y):
    """One training step's loss, computed the way the training loop computes it: the online teacher source attaches
    the student (tapped at the objective's layers, which it binds) and gives the frozen teacher's outputs."""
    source = OnlineTeacher(teacher)
    data = SimpleNamespace(spec=DataSpec(10, x.shape[1], x.shape[2]))  # attach reads only the data's shape
    net = source.attach(student, objective, data, CPU, mixes=False)
    index = torch.arange(len(x))
    logits, features = net(x)
    t_logits, t_features = source(x, index)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    return objective(LossInput(logits, y, t_logits, features, t_features, index))


def test_feature_tap_gives_the_model_logits_and_follows_its_mode():
    spec = SHAPES["1ch_28px"]
    net, x = model("resnet8", spec).eval(), example(spec)
    tap = FeatureTap(net, ["layer2", "flatten"])
    logits, (layer2, flat) = tap(x)
    assert torch.equal(logits, net(x)) and layer2.shape == (4, 32, 14, 14) and flat.shape == (4, 64)
    net.train()
    before = net.bn1.running_mean.clone()
    tap(x)
    assert not torch.equal(before, net.bn1.running_mean)  # train mode: BatchNorm statistics move


# --- gradients -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, term", [("fitnet", "hint"), ("at", "at"), ("rkd", "rkd_distance"), ("rkd", "rkd_angle")]
)
def test_feature_term_gradients_reach_the_student_and_adapter_never_the_teacher(loss, term):
    torch.manual_seed(0)
    spec = SHAPES["1ch_28px"]
    student, teacher = model("small_cnn", spec), model("resnet8", spec)
    x, y = example(spec, 8), torch.randint(0, 10, (8,))
    objective = build_objective({"name": loss}, 4.0, 0.2)
    _, terms = step(student, teacher, objective, x, y)  # binds the layers and builds FitNet's adapter
    terms[term].backward()  # the feature term alone
    first_conv = student.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    for p in objective.parameters():  # FitNet's adapter
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert (len(list(objective.parameters())) > 0) == (loss == "fitnet")


# --- layer names ---------------------------------------------------------------------------------------------------


def test_a_wrong_layer_name_lists_the_valid_ones():
    spec = SHAPES["1ch_28px"]
    objective = build_objective({"name": "at", "student_layers": ["features.1", "nope"]}, 4.0, 0.2)
    with pytest.raises(KdrunError) as error:
        objective.bind(model("small_cnn", spec), model("resnet8", spec), example(spec))
    message = str(error.value)
    assert "\n" not in message and "student has no layer 'nope'" in message
    assert "its layers are: features.0, features.1, features.2" in message


def test_named_layers_pair_one_to_one():
    spec = SHAPES["1ch_28px"]
    student, teacher, x = model("small_cnn", spec), model("resnet8", spec), example(spec)
    named = {"name": "at", "student_layers": ["features.1", "features"], "teacher_layers": ["layer1", "layer3"]}
    objective = build_objective(named, 4.0, 0.2)
    objective.bind(student, teacher, x)
    assert (objective.student_layers, objective.teacher_layers) == (["features.1", "features"], ["layer1", "layer3"])
    objective = build_objective({**named, "teacher_layers": ["layer3"]}, 4.0, 0.2)
    with pytest.raises(KdrunError, match="pair one to one"):
        objective.bind(student, teacher, x)
    # One side named: the other side's deepest default taps pair with it.
    objective = build_objective({"name": "at", "student_layers": ["features"]}, 4.0, 0.2)
    objective.bind(student, teacher, x)
    assert objective.teacher_layers == ["layer3"]


def test_an_ensemble_teacher_needs_named_layers():
    spec = SHAPES["1ch_28px"]
    members = [{"name": "resnet8"}, {"name": "small_cnn"}]
    teacher = build_model({"name": "ensemble", "members": members}, spec)
    student, x = model("small_cnn", spec), example(spec)
    with pytest.raises(KdrunError, match=r"no default feature taps.*loss.teacher_layers=\[members.0.layer3\]"):
        build_objective({"name": "at"}, 4.0, 0.2).bind(student, teacher, x)
    objective = build_objective({"name": "at", "teacher_layers": ["members.0.layer3"]}, 4.0, 0.2)
    objective.bind(student, teacher, x)
    assert (objective.student_layers, objective.teacher_layers) == (["features"], ["members.0.layer3"])
    total, _ = step(student, teacher, objective, x, torch.randint(0, 10, (4,)))
    assert torch.isfinite(total)
