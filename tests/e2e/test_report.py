"""The evaluation report of a real run: every item in metrics.json, report.md, TensorBoard, and kdrun-eval."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_metrics, run_kdrun


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    args = [
        f"hydra.run.dir={run_dir}",
        "cache=off",
        "train.teacher.epochs=2",
        "train.student.epochs=3",
        "train.progress=false",
        "report.latency_repeats=5",
        "export=[onnx,pt2]",
    ]
    result = run_kdrun(args, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_the_default_run_reports_every_item(reported_run):
    metrics = read_metrics(reported_run)
    evaluation = metrics["evaluation"]
    assert evaluation["split"] == "test" and evaluation["samples"] == 360 and evaluation["ece_bins"] == 15
    for stage in ("teacher", "baseline", "student"):
        e = evaluation[stage]
        for key in ("acc", "top5", "per_class_acc", "ece", "agreement", "kl_to_teacher", "params",
                    "flops", "size_mb", "latency_ms_b1", "throughput_b256"):  # fmt: skip
            assert e.get(key) is not None, (stage, key)
        assert len(e["per_class_acc"]) == 10
        assert e["acc"] == pytest.approx(metrics[stage]["test_acc_best"])  # the saved (best-val) model
        assert e["params"] == metrics[stage]["params"]
        for key in ("agreement", "kl_to_teacher", "ece", "flops", "size_mb", "latency_ms_b1", "throughput_b256",
                    "latency_ms_b1_iqr", "throughput_b256_iqr", "timing_threads"):  # fmt: skip
            assert metrics[stage][key] == e[key], (stage, key)  # the contract's keys inside each stage
        # Timed by torch.utils.benchmark: medians with their interquartile ranges, over enough measurements.
        assert 0 <= e["latency_ms_b1_iqr"] < 10 * e["latency_ms_b1"] and 0 <= e["throughput_b256_iqr"]
        assert e["latency_ms_b1_n"] >= 5 and e["throughput_b256_n"] >= 4 and e["timing_threads"] >= 1
    assert evaluation["teacher"]["agreement"] == 1.0 and evaluation["teacher"]["kl_to_teacher"] == pytest.approx(0)
    assert evaluation["student_vs_teacher"]["compression_params"] == pytest.approx(
        evaluation["teacher"]["params"] / evaluation["student"]["params"]
    )
    for fmt in ("onnx", "pt2"):
        assert (
            metrics["export"][fmt]["max_abs_diff"] < 1e-3 and (reported_run / metrics["export"][fmt]["path"]).is_file()
        )
    report = (reported_run / "report.md").read_text()
    for text in ("top-1 agreement with the teacher", "KL(teacher ‖ model), T=1", "expected calibration error",
                 "FLOPs per image", "checkpoint size", "latency, batch 1", "throughput, batch 256",
                 "Student vs teacher", "Per-class accuracy", "student_reliability.png", "## Export",
                 "latency, batch 1 (ms, median [IQR])", "Timings by `torch.utils.benchmark`"):  # fmt: skip
        assert text in report, text
    latency_row = next(line for line in report.splitlines() if line.startswith("| latency, batch 1"))
    e = evaluation["student"]
    assert f"{e['latency_ms_b1']:.2f} [{e['latency_ms_b1_iqr']:.2f}]" in latency_row
    for png in ("student_reliability.png", "student_confusion.png"):
        assert (reported_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_is_in_tensorboard(reported_run):
    acc = EventAccumulator(str(reported_run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"report/student_reliability", "report/student_confusion"} <= set(tags["images"])
    assert "report/text_summary" in tags["tensors"]
    assert {"final/student_agreement", "final/student_ece", "final/speedup_latency_b1"} <= set(tags["scalars"])


def test_kdrun_eval_reevaluates_the_saved_models_on_another_split(reported_run, tmp_path):
    out = tmp_path / "val-report"
    result = run_kdrun(["--split", "val", "--device", "cpu", "--out", str(out), str(reported_run)], cwd=tmp_path,
                       command="kdrun-eval")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "evaluation.json").read_text())["evaluation"]
    metrics = read_metrics(reported_run)
    assert evaluation["split"] == "val"
    for stage in ("teacher", "baseline", "student"):  # the saved model is the best-validation one
        assert evaluation[stage]["acc"] == pytest.approx(metrics[stage]["val_acc_best"])
    assert (out / "report.md").is_file() and (out / "student_confusion.png").is_file()
    bad = run_kdrun([str(tmp_path / "nothing")], cwd=tmp_path, command="kdrun-eval")
    assert bad.returncode == 2 and "is not a kdrun run dir" in bad.stderr
