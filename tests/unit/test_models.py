"""The model catalogue: every option builds and runs for the input shapes users have."""

from importlib.resources import files

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from kdrun.core.errors import KdrunError
from kdrun.core.registry import to_dict
from kdrun.data import DataSpec
from kdrun.models import MODELS, build_model, catalogue, count_params
from kdrun.models.registry import ROLE_KEYS

FOLDER = files("kdrun.models.catalogue")  # one YAML per model option, shared by the teacher and student groups
CATALOGUE = sorted(p.name[:-5] for p in FOLDER.iterdir() if p.name.endswith(".yaml"))


def option(name: str) -> dict:
    """The option's YAML, with the run-level interpolations (the ensemble's ${T}) resolved."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(str(FOLDER / f"{name}.yaml"))
    return OmegaConf.to_container(OmegaConf.create({"T": 4.0, "model": raw}), resolve=True)["model"]


def test_teacher_and_student_groups_share_the_catalogue():
    import kdrun.conf  # noqa: F401 - registers the catalogue, as Hydra does when it first reads the package

    assert catalogue.names() == CATALOGUE
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in ("teacher", "student"):
            assert loader.get_group_options(group) == CATALOGUE, group
        cfg = compose("config", overrides=["teacher=wrn_16_2", "student=wrn_16_2"])
    for group in ("teacher", "student"):  # the same option in either role is the catalogue's YAML
        assert {k: v for k, v in to_dict(cfg[group]).items() if k not in ROLE_KEYS} == option("wrn_16_2"), group
    assert set(MODELS.names()) <= set(CATALOGUE)


@pytest.mark.parametrize("name", CATALOGUE)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_every_model_builds_and_runs(name, channels, size):
    torch.manual_seed(0)
    model = build_model(option(name), DataSpec(num_classes=7, in_channels=channels, image_size=size)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_small_students_are_small():
    spec = DataSpec(10, 3, 32)
    assert 100_000 <= count_params(build_model(option("small_cnn"), spec)) <= 500_000
    assert count_params(build_model(option("resnet20"), spec)) == pytest.approx(
        272_474, rel=0.02
    )  # the literature's 0.27M


def test_torchvision_stem_adapts_to_small_images():
    small = build_model({"name": "resnet18", "stem": "auto"}, DataSpec(10, 1, 8))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    tutorial = build_model({"name": "resnet18", "stem": "auto"}, DataSpec(10, 1, 28))
    assert tutorial.conv1.kernel_size == (7, 7) and tutorial.conv1.stride == (2, 2) and tutorial.conv1.in_channels == 1
    assert isinstance(tutorial.maxpool, nn.MaxPool2d)
    forced = build_model({"name": "resnet18", "stem": "small"}, DataSpec(10, 3, 32))
    assert forced.conv1.kernel_size == (3, 3)
    assert tutorial.fc.out_features == 10


def test_any_torchvision_model_by_name():
    model = build_model({"name": "regnet_x_400mf", "stem": "small"}, DataSpec(5, 1, 16)).eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)


class UserNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


def test_user_model_through_target_gets_only_the_sizes_it_accepts():
    model = build_model({"_target_": f"{__name__}.UserNet", "width": 4}, DataSpec(3, 1, 8))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def user_factory(num_classes: int, width: int = 8, **kwargs) -> nn.Module:
    """A model factory in timm's ``create_model`` style: a function, not a class."""
    user_factory.kwargs = kwargs  # type: ignore[attr-defined]
    features = kwargs["in_channels"] * kwargs["image_size"] ** 2
    return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))


def not_a_model(num_classes: int) -> str:
    return f"{num_classes} classes"


def test_user_model_through_a_factory_function_target_builds_and_trains():
    spec = DataSpec(3, 1, 8)
    model = build_model({"_target_": f"{__name__}.user_factory", "width": 4}, spec, key="student")
    assert user_factory.kwargs == {"in_channels": 1, "image_size": 8}  # **kwargs: every size it is not given
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_target_that_is_no_model_builder_is_one_clear_line():
    spec = DataSpec(3, 1, 8)
    with pytest.raises(KdrunError, match=rf"^student._target_='{__name__}.not_a_model' returned a str, not a torch"):
        build_model({"_target_": f"{__name__}.not_a_model"}, spec, key="student")
    with pytest.raises(KdrunError, match=r"^teacher._target_='math.pi' is a float, not a class or function"):
        build_model({"_target_": "math.pi"}, spec, key="teacher")


def test_unknown_model_is_one_clear_line():
    with pytest.raises(KdrunError, match=r"teacher.name='resnet1000' is not a known model; choose one of: .*small_cnn"):
        build_model({"name": "resnet1000"}, DataSpec(10, 1, 8), key="teacher")
    with pytest.raises(KdrunError, match=r"^student._target_='no.such.Module' cannot be imported: .*No module") as e:
        build_model({"_target_": "no.such.Module"}, DataSpec(10, 1, 8), key="student")
    assert "\n" not in str(e.value)


def test_too_small_image_is_a_clear_error():
    with pytest.raises(KdrunError, match="too small"):
        build_model({"name": "small_cnn", "channels": [8, 8, 8, 8]}, DataSpec(10, 1, 8))


def test_option_yaml_names_match_their_model():
    for name in CATALOGUE:
        cfg = to_dict(option(name))
        assert cfg["name"] == name or name == "torchvision"


def test_factory_function_model_in_a_real_run(tmp_path):
    import json

    from omegaconf import OmegaConf

    from kdrun.pipeline.run import run

    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["teacher=lenet5", "baseline=false", "train.teacher.epochs=1", "train.student.epochs=1"]
            + ["report.enabled=false", "cache=off"],
        )
    cfg.student = OmegaConf.create({"_target_": f"{__name__}.user_factory", "width": 16})
    run(cfg, tmp_path)
    student = json.loads((tmp_path / "metrics.json").read_text())["student"]
    assert student["model"] == f"{__name__}.user_factory" and student["test_acc"] > 0


def test_mlp_max_norm_projects_each_units_incoming_weights_in_training_only():
    torch.manual_seed(0)
    spec = DataSpec(num_classes=10, in_channels=1, image_size=8)
    model = build_model({"name": "mlp", "hidden": [32], "dropout": 0.0, "max_norm": 0.5}, spec)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in linears:
            layer.weight.mul_(10)
    before = [layer.weight.norm(dim=1).max().item() for layer in linears]
    model.eval()(torch.randn(2, 1, 8, 8))
    assert [layer.weight.norm(dim=1).max().item() for layer in linears] == before  # evaluation changes nothing
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()(torch.randn(4, 1, 8, 8)).sum().backward()  # the projection keeps the graph intact
    for layer in linears:  # projected by that forward: every row was longer than 0.5
        assert torch.allclose(layer.weight.detach().norm(dim=1), torch.tensor(0.5))
    opt.step()
    stepped = [layer.weight.detach().norm(dim=1) for layer in linears]
    model(torch.randn(4, 1, 8, 8))
    for layer, old in zip(linears, stepped, strict=True):  # rows the step took past 0.5 go back to it, no other
        assert torch.allclose(layer.weight.detach().norm(dim=1), old.clamp(max=0.5), atol=1e-6)
    without = build_model({"name": "mlp", "hidden": [32]}, spec)
    assert without.max_norm is None  # off unless set: the catalogue's option leaves it out of artefact keys
