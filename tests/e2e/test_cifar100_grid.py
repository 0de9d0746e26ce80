"""Every teacher -> student pair x every method of the CIFAR-100 table trains a few steps: on CIFAR-100-shaped
FakeData (32 px, 100 classes), each cell composed through Hydra as the documented table sweep composes it
(``experiment=cifar100 pair=<pair> loss=<method>``) and trained by the real loop, init phase included, for one
epoch of 2 steps.

In process, not 200-odd ``kdrun`` jobs: the job path (data, cache, report, the table) is covered by
``test_cifar100_table.py``; what only the whole grid shows is whether each method's layers, adapters and losses fit
each pair's models. Teachers are untrained, their BatchNorm statistics set from the training batch so that deep
stages keep a sane scale.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.data import build_data
from kdrun.losses import build_objective
from kdrun.models import build_model
from kdrun.pipeline.stages import RunContext, fit_with_init
from kdrun.reporting.table import load_layout
from kdrun.training.loop import Stage
from kdrun.training.runtime import Runtime
from kdrun.training.teacher import OnlineTeacher

REPO = Path(__file__).resolve().parents[2]
PAIRS = sorted(p.stem for p in (REPO / "conf" / "pair").glob("*.yaml"))
EXCLUDED = ["ce", "soft_ce", "mse", "lskd"]  # the documented sweep's 'loss=glob(*,exclude=[ce,soft_ce,mse,lskd])'
LOSSES = {p.stem: OmegaConf.load(p) for p in sorted((REPO / "conf" / "loss").glob("*.yaml"))}
METHODS = sorted(set(LOSSES) - set(EXCLUDED))
CPU = Runtime(torch.device("cpu"), "off")
# 8 training images in 2 steps of 4, 2 validation images, 2 test images.
TINY = [
    "dataset=fake",
    "dataset.num_classes=100",
    "dataset.train_size=10",
    "dataset.test_size=2",
    "dataset.val_fraction=0.2",
]


def calibrated(teacher: nn.Module, images: torch.Tensor) -> nn.Module:
    """The teacher in eval mode with BatchNorm's running statistics those of ``images``."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass sets the batch's statistics
    with torch.no_grad():
        teacher.train()(images)
    return teacher.eval().requires_grad_(False)


@pytest.fixture
def one_thread():
    """One intra-op thread: the cells are tiny, and two threads spin against whatever else holds the other core
    (a second pytest worker made this test five times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_grid_is_every_pair_times_every_method_and_fsp_has_no_number_where_it_cannot_apply():
    layout = load_layout()
    labels = {loss: label for label, loss in layout.columns}
    assert len(METHODS) >= 16 and len(PAIRS) == 13
    assert len([p for p in PAIRS if layout.published.get((p, labels["fsp"])) is None]) == 7


@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_trains_a_few_steps_on_the_pair(tmp_path, one_thread, pair):
    layout = load_layout()
    labels = {loss: label for label, loss in layout.columns}
    trained, refused = set(), {}
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cifar100", f"pair={pair}", *TINY])
        data = build_data(cfg.dataset)
        images = next(iter(data.train.batches(len(data.train), shuffle=False)))[0]
        torch.manual_seed(0)
        teacher = calibrated(build_model(cfg.teacher, data.spec, key="teacher"), data.transform(images))
        student = build_model(cfg.student, data.spec, key="student")
        initial = copy.deepcopy(student.state_dict())
        for method in METHODS:
            try:
                init = train_cell((pair, method), data, teacher, student, initial, tmp_path / method)
            except KdrunError as e:
                refused[method] = str(e)
                continue
            assert bool(init) == ("init_epochs" in LOSSES[method]), method
            trained.add(method)

    assert trained | set(refused) == set(METHODS)
    # Only FSP refuses, and exactly where it cannot apply (unequal widths): where the published tables have no
    # FSP number either. Its error names the channels.
    fsp_published = layout.published.get((pair, labels["fsp"])) is not None
    assert set(refused) == (set() if fsp_published else {"fsp"}), refused
    assert all("channels" in message for message in refused.values())


def train_cell(
    cell: tuple[str, str], data, teacher: nn.Module, student: nn.Module, initial: dict, run_dir: Path
) -> dict:
    """One cell of the table: ``student``, from its ``initial`` weights (one model for every method: its trace is
    kept), distilled for one epoch (after the method's init phase, 1 epoch, if it has one). Checks that every step
    was finite and the student moved; returns the init phase's metrics.json entry."""
    pair, method = cell
    extra = ["++loss.init_epochs=1"] if "init_epochs" in LOSSES[method] else []
    cfg = compose("config", overrides=["experiment=cifar100", f"pair={pair}", f"loss={method}", *TINY, *extra])
    student.load_state_dict(initial)
    objective = build_objective(cfg.loss, cfg.T, cfg.alpha)
    (run_dir / "checkpoints").mkdir(parents=True)
    lr = float(cfg.train.student.lr)
    plan = Stage("student", 1, 4, lr, cfg.optim, cfg.sched, seed=0, clip_grad_norm=1.0)  # 2 steps of 4 images
    ctx = RunContext(cfg, data, CPU, run_dir=run_dir)
    result, init = fit_with_init(ctx, plan, student, objective, OnlineTeacher(teacher), data)
    assert result.nonfinite_steps == 0, (pair, method)
    assert math.isfinite(result.history[-1]["train/loss"]), (pair, method, result.history)
    after = student.state_dict()
    assert any(not torch.equal(initial[k], after[k]) for k in initial), (pair, method)
    return init
