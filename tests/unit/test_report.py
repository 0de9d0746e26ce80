"""The evaluation report in-process: fidelity, calibration and cost numbers on known cases, and export."""

import math
import os
import time

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.data import DataSpec
from kdrun.models import build_model
from kdrun.reporting.evaluation import (
    Timing,
    cost_metrics,
    flops_per_image,
    prediction_metrics,
    ratios,
    reliability_bins,
    time_forward,
)
from kdrun.reporting.export import check_formats, export_student
from kdrun.training.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "off")
COST = OmegaConf.create(
    {"latency_repeats": 5, "warmup": 2, "throughput_batch": 8, "min_run_time": 0.01, "timing_threads": 1}
)


def logits_of(probs):
    return torch.tensor(probs).log()


def test_a_student_that_is_the_teacher_agrees_fully_with_zero_kl():
    logits = torch.randn(50, 10)
    labels = torch.randint(0, 10, (50,))
    m = prediction_metrics(logits, labels, teacher_logits=logits.clone())
    assert m["agreement"] == 1.0 and m["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_and_kl_on_hand_made_logits():
    teacher = logits_of([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    student = logits_of([[0.25, 0.75], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    m = prediction_metrics(student, torch.tensor([1, 0, 1, 0]), teacher)
    # argmax: teacher [0 (tie -> first), 0, 1, 0], student [1, 0, 1, 1]: 2 of 4 agree.
    assert m["agreement"] == 0.5
    kl_first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_last = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert m["kl_to_teacher"] == pytest.approx((kl_first + kl_last) / 4, rel=1e-5)


def test_ece_and_per_class_accuracy_on_hand_made_logits():
    # Confidence 0.9 twice (one right, one wrong) and 0.65 twice (both right), in two of the 15 bins:
    # ECE = 2/4 * |0.9 - 0.5| + 2/4 * |0.65 - 1.0| = 0.375.
    logits = logits_of([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 0, 1])
    m = prediction_metrics(logits, labels)
    assert m["ece"] == pytest.approx(0.375, abs=1e-5)
    assert m["acc"] == 0.75 and m["per_class_acc"] == pytest.approx([1.0, 0.5])
    assert m["top5"] is None  # fewer than 6 classes
    bins = reliability_bins(logits, labels, 15)
    assert sum(bins["count"]) == 4 and bins["count"][13] == 2 and bins["count"][9] == 2
    assert bins["accuracy"][13] == 0.5 and bins["accuracy"][9] == 1.0
    assert bins["confidence"][13] == pytest.approx(0.9)


def test_flops_of_a_model_counted_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32, 3, bias=False))
    # conv: 2 x 4 x 4 outputs x 9 multiply-adds = 288 MACs; linear: 32 x 3 = 96 MACs; 2 FLOPs per MAC.
    assert flops_per_image(model, DataSpec(3, 1, 4)) == 2 * (288 + 96)


def test_timing_is_torch_benchmark_measurements_after_the_warmup():
    model = build_model({"name": "mlp", "hidden": [8]}, DataSpec(3, 1, 4)).train()
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    threads = torch.get_num_threads()
    measurement = time_forward(model, DataSpec(3, 1, 4), CPU, 5, Timing(warmup=3, min_run_time=0.01, threads=1))
    assert calls[:3] == [5, 5, 5] and set(calls) == {5} and model.training  # the mode is restored
    timed = measurement.number_per_run * len(measurement.times)
    assert len(calls) > 3 + timed  # the warm-up, the library's block-size search, then the timed blocks
    assert len(measurement.times) >= 4 and all(t > 0 for t in measurement.times)
    assert measurement.task_spec.num_threads == 1 and torch.get_num_threads() == threads  # stated, then restored
    assert 0 <= measurement.iqr < max(measurement.times) and min(measurement.times) <= measurement.median


def test_a_slow_model_still_gets_the_measurements_an_iqr_needs():
    class Slow(nn.Module):  # each pass sleeps 20 ms: a 10 ms budget holds a single pass
        def forward(self, x):
            time.sleep(0.02)
            return x.flatten(1)[:, :3]

    measurement = time_forward(
        Slow(), DataSpec(3, 1, 4), CPU, 1, Timing(warmup=0, min_run_time=0.01, min_measurements=6)
    )
    assert measurement.number_per_run == 1 and 6 <= len(measurement.times) < 10  # merged into per-pass times
    assert all(t >= 0.02 for t in measurement.times)


def test_cost_metrics_report_medians_iqrs_and_threads():
    model = build_model({"name": "mlp", "hidden": [8]}, DataSpec(3, 1, 4))
    cost = cost_metrics(model, DataSpec(3, 1, 4), CPU, None, COST)
    assert cost["latency_ms_b1"] > 0 and cost["throughput_b8"] > 0 and cost["size_mb"] is None
    assert cost["latency_ms_b1_iqr"] >= 0 and cost["throughput_b8_iqr"] >= 0 and cost["timing_threads"] == 1
    assert cost["latency_ms_b1_n"] >= 5 and cost["throughput_b8_n"] >= 4  # latency_repeats=5; 4 at the large batch
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    old_run = OmegaConf.create({"latency_repeats": 1, "warmup": 0, "throughput_batch": 2})  # before min_run_time
    assert Timing.of(old_run) == Timing(warmup=0, min_run_time=0.2, min_measurements=4, threads=None)


def test_ratios_say_how_much_cheaper_the_student_is():
    teacher = {"params": 100, "flops": 1000, "size_mb": 4.0, "latency_ms_b1": 2.0,
               "throughput_b8": 50.0}  # fmt: skip
    student = {"params": 10, "flops": 100, "size_mb": 0.5, "latency_ms_b1": 0.5,
               "throughput_b8": 400.0}  # fmt: skip
    assert ratios(teacher, student, 8) == {
        "compression_params": 10.0,
        "compression_flops": 10.0,
        "compression_checkpoint": 8.0,
        "speedup_latency_b1": 4.0,
        "speedup_throughput_b8": 8.0,
    }


def test_every_export_format_matches_pytorch_on_a_tiny_model(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model({"name": "small_cnn", "channels": [4, 8], "hidden": 16}, DataSpec(3, 1, 8))
    example = torch.randn(6, 1, 8, 8)
    results = export_student(model, example, tmp_path, ["onnx", "pt2", "torchscript"])
    for fmt, result in results.items():
        assert (tmp_path / result["path"]).is_file(), fmt
        assert result["max_abs_diff"] < 1e-4, (fmt, result)
    assert results["onnx"]["checked_with"].startswith("onnxruntime")
    assert sorted(os.listdir(tmp_path)) == ["student.onnx", "student.pt2", "student.torchscript.pt"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    batch_of_two = torch.randn(2, 1, 8, 8)
    got = torch.from_numpy(session.run(None, {"images": batch_of_two.numpy()})[0])  # the batch size is dynamic
    torch.testing.assert_close(got, model.eval()(batch_of_two).detach(), atol=1e-4, rtol=1e-4)


def test_export_formats_are_checked():
    assert check_formats([]) == [] and check_formats("pt2") == ["pt2"]
    with pytest.raises(KdrunError, match="export='tflite' is invalid; choose any of: onnx, pt2, torchscript"):
        check_formats(["onnx", "tflite"])


def test_a_failing_export_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import kdrun.reporting.export

    def broken(model, example, path):
        path.write_bytes(b"half a file")
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setitem(kdrun.reporting.export.EXPORTERS, "pt2", broken)
    model = build_model({"name": "mlp", "hidden": [4]}, DataSpec(3, 1, 4))
    with pytest.raises(KdrunError, match=r"export=pt2 failed \(RuntimeError: unsupported operator aten::frobnicate\)"):
        export_student(model, torch.randn(2, 1, 4, 4), tmp_path, ["pt2"])
    assert os.listdir(tmp_path) == []


def test_the_confusion_figure_is_scikit_learns_display_of_row_fractions():
    from kdrun.reporting.figures import close, confusion_figure

    matrix = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 never occurs: its row stays empty
    fig = confusion_figure(matrix, "student")
    ax = fig.axes[0]
    image = ax.get_images()[0].get_array()
    assert image.tolist() == [[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # exact in binary
    shown = {t.get_text() for t in ax.texts if t.get_visible()}
    assert shown == {"0.75", "0.25", "1.00"}  # empty cells are left blank
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert fig.axes[1].get_ylabel() == "fraction of the true class"  # the colour bar
    close(fig)
    many = torch.diag(torch.arange(1, 101))
    fig = confusion_figure(many, "100 classes")
    ax = fig.axes[0]
    assert not [t for t in ax.texts if t.get_visible()]  # 10,000 cells: colours only
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(0, 100, 5)]
    close(fig)
