"""Per-stage recipes: each stage trains on its own augmentation and mixing; warm-up, clipping and health flags."""

import math

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from kdrun.data import build_data
from kdrun.pipeline.stages import RunContext, stage_inputs
from kdrun.training.health import Chance, assess
from kdrun.training.optim import build_scheduler, warmup_steps
from kdrun.training.runtime import resolve_runtime

CPU = resolve_runtime("cpu", "off", False)


def context(*overrides: str) -> RunContext:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["train.progress=false", *overrides])
    return RunContext(cfg, build_data(cfg.dataset), CPU, run_dir=None)  # type: ignore[arg-type]


def test_each_stage_gets_its_own_augmentation_and_mixing():
    ctx = context("train.teacher.augment.crop_pad=2", "train.teacher.augment.mix=mixup", "augment=cutmix")
    teacher_data, teacher_mix = stage_inputs(ctx, "teacher")
    student_data, student_mix = stage_inputs(ctx, "student")
    assert (teacher_data.transform.crop_pad, teacher_data.transform.flip) == (2, False)
    assert type(teacher_mix).__name__ == "MixUp"
    assert not student_data.transform.augments
    assert type(student_mix).__name__ == "CutMix"  # the `augment` group is the student recipe's mixing
    assert len(student_data.train) == 100 and len(teacher_data.train) > 1000  # digits: data-limited student
    # the jitter moves the teacher's training images and nothing else
    images = teacher_data.train.images[:64]
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(teacher_data.transform(images, train=True, generator=g), teacher_data.transform(images))
    assert torch.equal(student_data.transform(images, train=True, generator=g), student_data.transform(images))


def test_defaults_follow_the_dataset_and_the_baseline_shares_the_students_recipe():
    ctx = context("dataset.augment.flip=true")
    assert stage_inputs(ctx, "teacher")[0].transform.flip and stage_inputs(ctx, "baseline")[0].transform.flip
    assert stage_inputs(ctx, "teacher")[1] is None and stage_inputs(ctx, "baseline")[1] is None


@pytest.mark.parametrize(
    "warmup, per_epoch, epochs, expected",
    [
        ("auto", 422, 3, 211),  # half an epoch
        ("auto", 422, 2, 168),  # capped at a fifth of the stage
        ("auto", 2, 60, 1),
        (0, 100, 5, 0),
        (1.5, 100, 5, 150),  # a number is taken as given
    ],
)
def test_warmup_length(warmup, per_epoch, epochs, expected):
    assert warmup_steps(warmup, per_epoch, per_epoch * epochs) == expected


def test_the_default_schedule_warms_up_linearly():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler({"name": "none", "warmup_epochs": "auto"}, opt, steps_per_epoch=20, epochs=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])  # 10 steps = half an epoch
    assert lrs[10:] == [1.0, 1.0]


def history(losses, val_acc, ce=None, val_loss=2.3):
    row = {"val/acc": val_acc, "val/loss": val_loss, **({"train/ce": ce} if ce else {})}
    return [{"train/loss": loss, **row} for loss in losses]


def test_health_flags():
    chance = Chance.of(torch.arange(1000) % 10, 10)
    assert (chance.acc, chance.ce) == pytest.approx((0.1, math.log(10)))
    assert chance.matched_by(0.11) and not chance.matched_by(0.2)
    assert assess(history([2.3, 0.5, 0.2], 0.95), 0, chance) == {}
    # a first-epoch blow-up (mean loss 4.1), then a constant prediction: CE at the prior's entropy
    collapsed = assess(history([4.1, 2.31, 2.30], 0.098), 0, chance)
    assert collapsed["collapsed"] is True and "chance level" in collapsed["flag_reason"]
    # a KD stage: its hard-label CE term decides, not the total
    assert assess(history([9.0, 5.0], 0.1, ce=2.3), 0, chance)["collapsed"] is True
    diverged = assess(history([2.3, 0.5, 40.0], 0.6), 0, chance)
    assert diverged["diverged"] is True and "diverged" in diverged["flag_reason"]
    assert assess(history([2.3, 2.2], 0.1), 3, chance)["diverged"] is True  # non-finite steps, then chance
    assert assess(history([2.3, 0.1, 0.7], 0.9), 0, chance)["diverged"] is True  # gave back a quarter of its fall
    # a loss near 0 that wobbles (DIST's relation terms: 0.0005 -> 0.008) has not run away
    assert assess(history([0.05, 0.0005, 0.008], 0.9), 0, chance) == {}
    assert assess(history([2.3, math.inf], 0.5), 0, chance)["diverged"] is True
    # a model at chance whose training CE fell (random labels, memorised) is not a collapse
    assert assess(history([2.3, 1.0], 0.1), 0, chance) == {}
    # stuck on two classes (20%, above chance), its CE never below 90% of ln(10): a collapse all the same
    # (its validation CE, 2.045, is below 90% of ln 10: measured on that run, and not what decides)
    stuck = assess(history([19.1, 14.3], 0.2, ce=2.107, val_loss=2.045), 0, chance)
    assert stuck["collapsed"] is True and "validation accuracy 20.0%" in stuck["flag_reason"]
    # a stage of one epoch that is learning: its epoch's mean training CE is still high, its validation CE fell
    assert assess(history([2.09], 0.71, val_loss=1.78), 0, chance) == {}
    one = assess(history([2.09], 0.12, val_loss=2.3), 0, chance)
    assert one["collapsed"] is True and "the validation CE 2.3 did not fall" in one["flag_reason"]
    # unbalanced classes: chance is the largest class's share, and the prior's entropy
    unbalanced = Chance.of(torch.tensor([0] * 90 + [1] * 10), 2)
    assert (unbalanced.acc, unbalanced.ce) == pytest.approx((0.9, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))
