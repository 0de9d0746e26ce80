"""experiment=cifar100: the recipe of RepDistiller / mdistiller composed through Hydra, its learning-rate schedule, the
per-architecture learning rate and the methods' weights (tests/e2e/test_cifar100_table.py composes the whole grid).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from kdrun.core.keys import pick
from kdrun.losses import LossInput, build_objective
from kdrun.losses.dkd import decoupled_kd_terms
from kdrun.training.optim import build_scheduler

REPO = Path(__file__).resolve().parents[2]
PAIRS = sorted(p.stem for p in (REPO / "conf" / "pair").glob("*.yaml"))
# The methods of the documented table sweep: 'loss=glob(*,exclude=[ce,soft_ce,mse,lskd])'.
EXCLUDED = ("ce", "soft_ce", "mse", "lskd")
METHODS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem not in EXCLUDED)
SMALL_LR = {"mobilenet_v2_half", "shufflenet_v1", "shufflenet_v2_cifar"}  # RepDistiller's lr 0.01 students
# DKD's BETA in mdistiller's configs/cifar100/dkd/<pair>.yaml (8, cfg.py's default, where a config sets none or
# there is no config for the pair).
DKD_BETA = {"resnet56-resnet20": 2, "resnet110-resnet32": 2, "vgg13_cifar-vgg8_cifar": 6, "wrn_40_2-wrn_16_2": 6,
            "wrn_40_2-wrn_40_1": 6, "vgg13_cifar-mobilenet_v2_half": 6}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def hydra_config():
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        yield


@functools.cache
def composed(*overrides: str):
    return compose("config", overrides=["experiment=cifar100", *overrides])


def test_the_recipe_is_repdistillers():
    cfg = composed("pair=resnet56-resnet20", "loss=kd")
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == ("resnet56", "resnet20", "cifar100")
    for stage in ("teacher", "student"):
        recipe = cfg.train[stage]
        assert (recipe.epochs, recipe.batch_size, recipe.lr) == (240, 64, 0.05)
        assert (recipe.augment.crop_pad, recipe.augment.flip, recipe.augment.mix) == (4, True, "none")
    assert cfg.train.student.max_samples is None
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == ("sgd", 0.9, False, 5e-4)
    assert (cfg.sched.name, cfg.sched.gamma, cfg.sched.warmup_epochs) == ("step", 0.1, 0)
    assert (cfg.T, cfg.alpha) == (4.0, 0.1)  # KD: RepDistiller's -r 0.1 -a 0.9
    assert cfg.dataset.val_fraction == 0.02


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 766])  # 766: 49,000 training images in batches of 64
def test_the_schedule_is_repdistillers_lr_of_every_epoch(steps_per_epoch):
    """RepDistiller's helper/util.py adjust_learning_rate at (1-based) epoch e: lr * 0.1 ** sum(e > [150, 180, 210]),
    set before the epoch; kdrun's schedule steps per batch: the first and the last batch of the epoch have that lr."""
    cfg = composed("pair=resnet56-resnet20", "loss=kd")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    factor = build_scheduler(cfg.sched, optimizer, steps_per_epoch, int(cfg.train.student.epochs)).lr_lambdas[0]
    for epoch in range(1, 241):
        theirs = 0.1 ** sum(epoch > m for m in (150, 180, 210))
        for step in ((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1):
            assert factor(step) == pytest.approx(theirs, rel=1e-12), f"epoch {epoch}, step {step}"


@pytest.mark.parametrize("pair", PAIRS)
def test_the_learning_rate_follows_the_architecture(pair):
    cfg = composed(f"pair={pair}", "loss=kd")
    teacher, student = pair.split("-")
    assert (cfg.teacher.name, cfg.student.name) == (teacher, student)
    assert cfg.train.teacher.lr == 0.05  # no teacher of the tables is a MobileNetV2 or ShuffleNet
    assert cfg.train.student.lr == (0.01 if student in SMALL_LR else 0.05)
    scaled = composed(f"pair={pair}", "loss=kd", "optim.lr=0.1")
    assert scaled.train.student.lr == (0.01 if student in SMALL_LR else 0.1)
    assert composed(f"pair={pair}", "loss=kd", "train.student.lr=0.2").train.student.lr == 0.2  # overrides win


def test_pick_looks_a_name_up_and_never_raises():
    table = {"a": 1}
    assert pick("a", table, 0) == 1 and pick("b", table, 0) == 0
    assert pick(["unhashable"], table, 0) == 0 and pick(float("nan"), table, 0) == 0 and pick("a", None, 0) == 0


def test_methods_weights_in_kdruns_convention():
    """kd: their 0.1 CE + 0.9 KD; CRD+KD: CE + KD + 0.8 CRD at half; DKD: their loss times 0.99; every other method
    CE + its own term (alpha 1, RepDistiller's -r 1 -a 0)."""
    for method in METHODS:
        cfg = composed("pair=resnet56-resnet20", f"loss={method}")
        expected = {"kd": 0.1, "crd_kd": 0.5, "dkd": 0.99}.get(method, 1.0)
        assert cfg.alpha == expected, method
    assert composed("pair=resnet56-resnet20", "loss=crd_kd").loss.crd_weight == 0.4
    assert composed("pair=resnet56-resnet20", "loss=kd", "alpha=0.3").alpha == 0.3  # the command line wins


@pytest.mark.parametrize("pair", PAIRS)
def test_dkd_is_mdistillers_loss_with_the_pairs_beta(pair):
    cfg = composed(f"pair={pair}", "loss=dkd")
    beta = DKD_BETA.get(pair, 8)
    objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
    objective.set_epoch(5)  # inside the 20-epoch warm-up: both scale the DKD terms by 5/20
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
    total, _ = objective(LossInput(student, labels, teacher))
    tckd, nckd = decoupled_kd_terms(student, teacher, labels, 4.0)
    theirs = F.cross_entropy(student, labels) + 5 / 20 * (1.0 * tckd + beta * nckd)  # CE_WEIGHT 1, ALPHA 1, BETA
    assert total.item() == pytest.approx(0.99 * theirs.item(), rel=1e-5)


def test_the_documented_sweep_is_the_one_composed_here():
    header = (REPO / "conf" / "experiment" / "cifar100.yaml").read_text()
    assert "kdrun -m experiment=cifar100 'pair=glob(*)' 'loss=glob(*,exclude=[ce,soft_ce,mse,lskd])'" in header
