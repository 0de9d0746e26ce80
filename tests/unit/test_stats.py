"""Error bars on hand-computed cases: Wilson, Newcombe, Student's t, and the teacher-lead warning of a run."""

import json
import logging

import pytest
from hydra import compose, initialize_config_module

from kdrun.pipeline.run import run
from kdrun.reporting.report import assemble, hparam_metrics, report_markdown, summary_table
from kdrun.reporting.stats import difference_interval, t_interval, wilson_interval


def test_wilson_interval_of_90_of_100():
    # z = 1.959964, z^2/n = 0.0384146: centre = (0.9 + 0.0192073) / 1.0384146 = 0.8852026,
    # half = z / 1.0384146 * sqrt(0.9 * 0.1 / 100 + z^2 / 40000) = 0.0595683.
    assert wilson_interval(0.9, 100) == pytest.approx((0.8256343, 0.9447709), abs=1e-6)
    low, high = wilson_interval(0.0, 10)  # unlike the normal approximation: not [0, 0]
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775328, abs=1e-6)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_newcombe_difference_matches_his_published_example():
    # Newcombe (1998), Stat. Med. 17:873, table II, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    assert difference_interval(56 / 70, 70, 48 / 80, 80) == pytest.approx((0.0524, 0.3339), abs=5e-5)


def test_t_interval_over_seeds_by_hand():
    # gains 0.01, 0.03, 0.02: mean 0.02, std (ddof=1) 0.01, t_{0.975, 2} = 4.302653,
    # half-width 4.302653 * 0.01 / sqrt(3) = 0.0248414 -> [-0.0048414, 0.0448414]: contains 0.
    gain = t_interval([0.01, 0.03, 0.02])
    assert (gain.n, gain.mean, gain.std) == (3, pytest.approx(0.02), pytest.approx(0.01))
    assert (gain.low, gain.high) == pytest.approx((-0.0048414, 0.0448414), abs=1e-7)
    assert gain.within_noise is True
    # gains 0.02, 0.03, 0.04: [0.0051586, 0.0548414]: above 0.
    gain = t_interval([0.02, 0.03, 0.04])
    assert (gain.low, gain.high) == pytest.approx((0.0051586, 0.0548414), abs=1e-7)
    assert gain.within_noise is False
    one = t_interval([0.05])
    assert (one.n, one.mean, one.std, one.low, one.high, one.within_noise) == (1, 0.05, None, None, None, None)
    assert t_interval([]).mean is None


def stage(test_acc: float) -> dict:
    return {"source": "trained", "params": 1000, "test_acc": test_acc, "test_acc_best": test_acc,
            "val_acc_best": test_acc, "train_time_s": 1.0}  # fmt: skip


CONFIG = {"dataset": "digits", "teacher": "resnet18", "student": "small_cnn", "loss": "kd", "T": 4.0,
          "alpha": 0.5, "seed": 0, "test_images": 1000}  # fmt: skip


def test_each_stage_gets_its_wilson_interval_and_the_run_its_teacher_lead():
    stages = {"teacher": stage(0.99), "baseline": stage(0.95), "student": stage(0.96)}
    metrics = assemble(CONFIG, stages)
    assert metrics["student"]["test_acc_ci95"] == pytest.approx(list(wilson_interval(0.96, 1000)))
    assert "test_acc_ci95" not in stages["student"]  # the caller's dicts are left alone
    assert metrics["teacher_lead"] == pytest.approx(0.04)
    assert metrics["teacher_lead_ci95"] == pytest.approx(list(difference_interval(0.99, 1000, 0.95, 1000)))
    assert metrics["teacher_lead_ci95"][0] > 0 and "teacher_lead_warning" not in metrics
    assert "teacher lead (teacher - baseline test acc, last epoch): +4.00 points" in summary_table(metrics)


def test_a_teacher_within_noise_of_the_baseline_is_warned_about():
    # 95.0% vs 94.0% on 1000 images: lead +1.00 points, Newcombe 95% CI [-1.02, +3.03] -> the warning.
    metrics = assemble(CONFIG, {"teacher": stage(0.95), "baseline": stage(0.94), "student": stage(0.945)})
    assert metrics["teacher_lead_ci95"] == pytest.approx([-0.0101548, 0.0303024], abs=1e-6)
    assert metrics["teacher_lead_warning"] == (
        "the teacher is no better than the student alone: KD has nothing to transfer "
        "(teacher 95.00% vs baseline 94.00%, lead +1.00 points, 95% CI [-1.02, +3.03])"
    )
    assert "WARNING: the teacher is no better" in summary_table(metrics)
    evaluation = {
        "split": "test", "samples": 1000, "device": "cpu", "amp": "off", "ece_bins": 15,
        **{s: {"acc": 0.9, "per_class_acc": [0.9], "throughput_b8": 1.0} for s in ("teacher", "baseline", "student")},
    }  # fmt: skip
    report = report_markdown({**metrics, "evaluation": evaluation})
    assert "> **Warning:** the teacher is no better than the student alone" in report
    assert "last epoch): +1.00 points, 95% CI [-1.02, +3.03] (Newcombe)." in report
    low, high = wilson_interval(0.945, 1000)
    assert "| test accuracy, last epoch [95% CI] | 95.00% [" in report
    assert f"94.50% [{100 * low:.2f}, {100 * high:.2f}] |" in report


def test_the_kd_gain_of_one_run_gets_its_interval_and_says_when_it_is_within_noise():
    # 95.0% vs 94.0% on 1000 images: gain +1.00 points, Newcombe 95% CI [-1.02, +3.03] (as the lead above).
    metrics = assemble(CONFIG, {"teacher": stage(0.99), "baseline": stage(0.94), "student": stage(0.95)})
    assert metrics["kd_gain_ci95"] == pytest.approx([-0.0101548, 0.0303024], abs=1e-6)
    hparams = hparam_metrics(metrics)
    assert (hparams["final/kd_gain_ci95_low"], hparams["final/kd_gain_ci95_high"]) == tuple(metrics["kd_gain_ci95"])
    line = "KD gain (student - baseline test acc, last epoch): +1.00 points, 95% CI [-1.02, +3.03] (Newcombe): "
    assert line + "within noise" in summary_table(metrics)
    evaluation = {
        "split": "test", "samples": 1000, "device": "cpu", "amp": "off", "ece_bins": 15,
        **{s: {"acc": 0.9, "per_class_acc": [0.9], "throughput_b8": 1.0} for s in ("teacher", "baseline", "student")},
    }  # fmt: skip
    report = report_markdown({**metrics, "evaluation": evaluation})
    assert "last epoch): +1.00 points, 95% CI [-1.02, +3.03] (Newcombe): within noise." in report
    # 99.0% vs 95.0%: [+2.55, +5.60], beyond noise, and the line does not say "within noise".
    metrics = assemble(CONFIG, {"teacher": stage(0.995), "baseline": stage(0.95), "student": stage(0.99)})
    assert metrics["kd_gain_ci95"] == pytest.approx([0.0255108, 0.0559781], abs=1e-6)
    table = summary_table(metrics)
    assert "last epoch): +4.00 points, 95% CI [+2.55, +5.60] (Newcombe)\n" in table and "within noise" not in table
    # A loss beyond noise is not "within noise" either: 95.0% vs 99.0%.
    metrics = assemble(CONFIG, {"teacher": stage(0.995), "baseline": stage(0.99), "student": stage(0.95)})
    assert metrics["kd_gain_ci95"] == pytest.approx([-0.0559781, -0.0255108], abs=1e-6)
    assert "within noise" not in summary_table(metrics)


def test_a_self_distillation_says_its_teacher_is_the_baseline():
    stages = {"teacher": stage(0.95), "baseline": stage(0.95), "student": stage(0.951)}
    metrics = assemble(CONFIG, stages, teacher_is_baseline=True)
    assert metrics["teacher_lead"] == 0 and metrics["teacher_lead_warning"].startswith(
        "the teacher is the student trained alone (the same model, recipe and seed: self-distillation), so it is "
        "no better than the baseline by construction: a gain is self-distillation's, not a stronger teacher's "
        "(teacher 95.00% vs baseline 95.00%, lead +0.00 points, 95% CI ["
    )
    assert "nothing to transfer" not in metrics["teacher_lead_warning"]


def test_no_lead_without_a_baseline_and_no_interval_without_the_test_size():
    metrics = assemble(CONFIG, {"teacher": stage(0.9), "student": stage(0.95)})
    assert "teacher_lead" not in metrics and "kd_gain" not in metrics
    old = assemble({k: v for k, v in CONFIG.items() if k != "test_images"},
                   {"teacher": stage(0.9), "baseline": stage(0.95), "student": stage(0.95)})  # fmt: skip
    assert "test_acc_ci95" not in old["student"] and "teacher_lead_ci95" not in old and "kd_gain_ci95" not in old
    assert "KD gain (student - baseline test acc, last epoch): +0.00 points\n" in summary_table(old)
    assert old["teacher_lead_warning"].endswith("lead -5.00 points)")


def test_a_run_whose_teacher_learnt_nothing_logs_one_warning_line(tmp_path, caplog):
    # Random labels (FakeData): teacher and baseline are both at chance on 128 test images.
    overrides = ["dataset=fake", "dataset.train_size=128", "dataset.image_size=8", "teacher=mlp", "student=mlp",
                 "student.hidden=[16]"]  # fmt: skip
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "train.progress=false", "report.enabled=false", "cache=off"])
    with caplog.at_level(logging.WARNING, logger="kdrun"):
        run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["test_images"] == 128
    teacher = metrics["teacher"]
    assert teacher["test_acc_ci95"] == pytest.approx(list(wilson_interval(teacher["test_acc"], 128)))
    warned = [r for r in caplog.records if "the teacher is no better than the student alone" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "\n" not in warned[0].getMessage()
    assert warned[0].getMessage() == metrics["teacher_lead_warning"]
