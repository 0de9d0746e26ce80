"""Feature taps of models that torch.fx cannot trace: forward hooks on named modules, chosen automatically."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.data import DataSpec
from kdrun.losses import LossInput, build_objective
from kdrun.models import build_model, catalogue
from kdrun.models.features import FeatureTap, default_taps, feature_shapes, layer_names, tap_mode
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher

CPU = Runtime(torch.device("cpu"))
SPEC = DataSpec(10, 1, 8)


class Branchy(nn.Module):
    """A small CNN whose forward branches on a tensor value and loops a tensor-valued number of times (a user's
    data-dependent model): ``torch.fx`` cannot trace it. The kdrun model signature, for ``_target_`` configs."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())  # looped: shared weights
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(1 + int(x.detach().mean() > 0.5)):  # how often depends on the data
            x = x + self.refine(x)
        x = self.down(x)
        x = torch.relu(x) if x.sum() > 0 else torch.relu(-x)  # a branch on a tensor value
        return self.head(torch.flatten(self.pool(x), 1))


class Gate(nn.Module):
    """Any model behind a data-dependent branch: untraceable, the same function as the model (for finite inputs)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isfinite(x).all():
            return self.net(x)
        return self.net(torch.nan_to_num(x))


def example(spec: DataSpec = SPEC, n: int = 4) -> torch.Tensor:
    return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size)


def branchy() -> Branchy:
    return Branchy(SPEC.num_classes, SPEC.in_channels, SPEC.image_size)


# --- names, shapes and default taps in hook mode -----------------------------------------------------------------


def test_an_untraceable_model_is_tapped_with_hooks_and_its_layers_are_its_modules():
    net = branchy()
    assert tap_mode(net) == "hooks" and tap_mode(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))) == "graph"
    assert layer_names(net) == [n for n, _ in net.named_modules() if n]
    assert layer_names(net)[:4] == ["stem", "stem.0", "stem.1", "stem.2"]
    shapes = feature_shapes(net, example(), ["stem", "refine", "down", "pool", "head"])
    assert shapes == {"stem": (4, 8, 8, 8), "refine": (4, 8, 8, 8), "down": (4, 16, 4, 4), "pool": (4, 16, 1, 1),
                      "head": (4, 10)}  # fmt: skip
    assert net.training and not net.stem[0]._forward_hooks  # the probe leaves the mode and no hook behind


def test_hook_mode_default_taps_come_from_the_probed_output_shapes():
    taps = default_taps(branchy(), example())
    # 8x8: the stem and the looped refine block end at that resolution, the shallowest modules; refine (the last
    # of them) ends it. 4x4: down. The pooling to 1x1 is the embedding, not a stage; the head is the output.
    assert (taps.stages, taps.embedding) == (["refine", "down"], "pool")
    assert taps.of("middle") == ["refine"] and taps.of("embedding") == ["pool"]


@pytest.mark.parametrize("name", ["small_cnn", "lenet5", "mlp", "resnet20", "wrn_16_2", "mobilenet_v2"])
def test_hook_mode_finds_the_stages_the_graph_finds(name):
    """The same network traced and untraced: the same stages; the same embedding where it is a module's output
    (a functional flatten has no module, so hooks take the global pooling before it)."""
    spec = DataSpec(10, 3, 32)
    net = build_model(catalogue.load(name), spec)
    x = example(spec, 2)
    graph, hooks = default_taps(net, x), default_taps(Gate(net), x)
    assert tap_mode(Gate(net)) == "hooks"
    assert hooks.stages == [f"net.{s}" for s in graph.stages]
    expected = {"flatten": "avgpool"}.get(graph.embedding, graph.embedding)
    assert hooks.embedding == f"net.{expected}"


def test_a_wrong_layer_name_in_hook_mode_lists_the_modules():
    objective = build_objective({"name": "at", "student_layers": ["stem", "nope"]}, 4.0, 0.2)
    with pytest.raises(KdrunError) as error:
        objective.bind(branchy(), branchy(), example())
    message = str(error.value)
    assert "\n" not in message and "student has no layer 'nope'" in message
    assert "its layers are: stem, stem.0, stem.1, stem.2, refine, refine.0" in message


def test_a_module_that_does_not_run_or_gives_no_tensor_is_refused_clearly():
    net = branchy()
    net.unused = nn.Linear(3, 3)
    with pytest.raises(KdrunError, match=r"layer 'unused' of Branchy gave no tensor in the forward pass \(it did not"):
        feature_shapes(net, example(), ["unused"])
    with pytest.raises(KdrunError, match="gave no tensor"):
        FeatureTap(net, ["unused"])(example())
    with pytest.raises(KdrunError, match=r"^Branchy has no module 'nope'; its modules are: stem, stem.0, stem.1,"):
        feature_shapes(net, example(), ["nope"])


# --- the tapped forward pass and training through it ---------------------------------------------------------------


def test_feature_tap_with_hooks_gives_the_logits_and_follows_the_mode():
    torch.manual_seed(0)
    net, x = branchy().eval(), example()
    tap = FeatureTap(net, ["refine", "down", "pool"])
    assert tap.mode == "hooks" and tap.extractor is None
    logits, (refine, down, pool) = tap(x)
    assert torch.equal(logits, net(x)) and refine.shape == (4, 8, 8, 8) and down.shape == (4, 16, 4, 4)
    assert pool.shape == (4, 16, 1, 1)
    assert not any(m._forward_hooks for m in net.modules())  # hooks live for the pass only
    net.train()
    before = net.stem[1].running_mean.clone()
    tap(x)
    assert not torch.equal(before, net.stem[1].running_mean)  # train mode: BatchNorm statistics move


@pytest.mark.parametrize("loss, term", [("fitnet", "hint"), ("at", "at"), ("rkd", "rkd_distance")])
@pytest.mark.parametrize("teacher", ["untraceable", "traceable"])
def test_feature_losses_train_an_untraceable_student(loss, term, teacher):
    """As the training loop does it: the online teacher source binds the layers (building FitNet's adapter) and taps
    both models once; then steps."""
    torch.manual_seed(0)
    student = branchy()
    t_net = Branchy(10, 1, 8, width=16) if teacher == "untraceable" else build_model({"name": "resnet8"}, SPEC)
    x, y, index = example(n=16), torch.randint(0, 10, (16,)), torch.arange(16)
    objective = build_objective({"name": loss}, 4.0, 0.2)
    source = OnlineTeacher(t_net)
    net = source.attach(student, objective, SimpleNamespace(spec=SPEC), CPU, mixes=False)
    assert isinstance(net, FeatureTap) and net.mode == "hooks"
    assert source.forward.mode == {"untraceable": "hooks", "traceable": "graph"}[teacher]
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.05)
    values = []
    for _ in range(15):
        logits, features = net(x)
        t_logits, t_features = source(x, index)
        total, terms = objective(LossInput(logits, y, t_logits, features, t_features, index))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        values.append(terms[term].item())
    assert student.stem[0].weight.grad.abs().sum() > 0 and all(p.grad is None for p in t_net.parameters())
    assert values[-1] < values[0]  # the feature term itself is learned through the hooked features
    assert objective.student_layers == {"fitnet": ["refine"], "at": ["refine", "down"], "rkd": ["pool"]}[loss]
