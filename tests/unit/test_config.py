"""Every config composes through Hydra, and every bad value is one line naming the key."""

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdrun.config.validate import validate
from kdrun.core.errors import KdrunError

GROUPS = ("dataset", "teacher", "student", "loss", "optim", "sched")


def options(group: str) -> list[str]:
    """The group's options as Hydra lists them: YAML files of conf/, and the model catalogue (teacher, student)."""
    import kdrun.conf  # noqa: F401 - registers the catalogue, as Hydra does when it first reads the package

    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group)


def composed(*overrides: str):
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_and_issue_command_compose():
    cfg = composed()
    assert (cfg.T, cfg.alpha, cfg.device, cfg.amp, cfg.baseline) == (4.0, 0.2, "auto", "auto", True)
    assert cfg.dataset.name == "digits"
    validate(cfg)
    cfg = composed("teacher=resnet18", "student=small_cnn", "T=4", "alpha=0.2")
    assert (cfg.teacher.name, cfg.student.name, cfg.T, cfg.alpha) == ("resnet18", "small_cnn", 4, 0.2)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if option == "imagefolder":
        overrides.append("dataset.root=/tmp")
    cfg = composed(*overrides)
    OmegaConf.to_container(cfg, resolve=True)
    if (group, option) == ("student", "ensemble"):  # the catalogue is shared, but an ensemble only teaches
        with pytest.raises(KdrunError, match="student=ensemble is not supported"):
            validate(cfg)
    elif group != "dataset" or option in ("digits", "fake"):
        validate(cfg)


def test_stage_recipes_can_differ():
    cfg = composed(
        "train.teacher.lr=0.1", "train.student.lr=0.01", "train.teacher.epochs=3", "train.student.batch_size=32"
    )
    assert (cfg.train.teacher.lr, cfg.train.student.lr, cfg.train.teacher.epochs, cfg.train.student.batch_size) == (
        0.1,
        0.01,
        3,
        32,
    )


BAD_VALUES = [
    ("T=0", "T=0 is invalid: must be a finite number > 0 and <= 1000"),
    ("T=-1", "T=-1 is invalid: must be a finite number > 0 and <= 1000"),
    ("T=abc", "T='abc' is invalid: must be a finite number"),
    ("alpha=1.5", "alpha=1.5 is invalid: must be a finite number >= 0 and <= 1"),
    ("alpha=-0.1", "alpha=-0.1 is invalid: must be a finite number >= 0 and <= 1"),
    ("train.teacher.epochs=0", "train.teacher.epochs=0 is invalid: must be an integer >= 1 and <= 100000"),
    ("train.student.epochs=2.5", "train.student.epochs=2.5 is invalid: must be an integer >= 1 and <= 100000"),
    ("train.student.batch_size=-4", "train.student.batch_size=-4 is invalid: must be an integer >= 1 and <= 1000000"),
    ("train.teacher.lr=0", "train.teacher.lr=0 is invalid: must be a finite number > 0 and <= 10"),
    ("train.student.lr=-0.1", "train.student.lr=-0.1 is invalid: must be a finite number > 0 and <= 10"),
    ("amp=fp8", "amp='fp8' is invalid: must be one of: auto, bf16, fp16, off"),
    ("channels_last=maybe", "channels_last='maybe' is invalid: must be one of: auto, true, false"),
    ("compile=yes", "compile='yes' is invalid: must be true or false"),
    ("device=tpu", "device='tpu' is invalid; choose one of: auto, cpu, cuda, cuda:N, mps"),
    ("seed=-1", "seed=-1 is invalid: must be an integer >= 0"),
    ("baseline=maybe", "baseline='maybe' is invalid: must be true or false"),
    ("dataset.val_fraction=1.5", "dataset.val_fraction=1.5 is invalid"),
    ("teacher.name=resnet1000", "teacher.name='resnet1000' is not a known model"),
    ("teacher=resnet18 teacher.stem=huge", "teacher.stem='huge' is invalid: must be one of: auto, small, imagenet"),
    ("teacher.checkpoint=/no/such/file.pt", "teacher.checkpoint=/no/such/file.pt is not a file"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_fail_validation_with_one_line(override, message):
    with pytest.raises(KdrunError) as err:
        validate(composed(*override.split()))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_dataset_root_is_named():
    with pytest.raises(KdrunError, match="dataset.root is required"):
        validate(composed("dataset=imagefolder"))
