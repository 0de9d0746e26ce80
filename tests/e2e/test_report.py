"""The evaluation report of a real run: every item in metrics.json, report.md, TensorBoard, and kdrun-eval."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import built_once, read_metrics, run_kdrun


def _reported_run(tmp: Path) -> None:
    args = [
        f"hydra.run.dir={tmp / 'run'}",
        "cache=off",
        "train.teacher.epochs=2",
        "train.student.epochs=3",
        "train.progress=false",
        "report.latency_repeats=5",
        "export=[onnx,pt2]",
    ]
    result = run_kdrun(args, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "reported-run", _reported_run) / "run"


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


def test_the_run_writes_its_models_as_safetensors_files_without_pickle(reported_run):
    metrics = read_metrics(reported_run)
    assert not list(reported_run.glob("*.pt"))
    for stage in ("teacher", "baseline", "student"):
        path = reported_run / f"{stage}.safetensors"
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["kdrun"])
        assert meta["model_cfg"]["name"] == metrics["config"][stage if stage == "teacher" else "student"]
        assert (meta["num_classes"], meta["in_channels"], meta["image_size"]) == (10, 1, 8)
        assert meta["epoch"] == metrics[stage]["best_epoch"] and len(meta["history"]) == metrics[stage]["epochs"]
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        spans = [v["data_offsets"] for k, v in json.loads(data[8:header]).items() if k != "__metadata__"]
        assert header + max(end for _, end in spans) == len(data)  # the JSON header and tensor data: nothing else
        assert metrics["evaluation"][stage]["size_mb"] == (len(data) - header) / 2**20  # the weights alone


def test_kdrun_eval_still_evaluates_a_run_dir_of_an_earlier_kdrun(reported_run, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(reported_run, old, ignore=shutil.ignore_patterns("tb", "eval-*"))
    for stage in ("teacher", "baseline", "student"):  # <stage>.pt as kdrun wrote them before: torch.save of a dict
        path = old / f"{stage}.safetensors"
        with safe_open(path, framework="pt") as f:
            saved = {**json.loads(f.metadata()["kdrun"]), "state_dict": {k: f.get_tensor(k) for k in f.keys()}}
        torch.save(saved, old / f"{stage}.pt")
        path.unlink()
    out = tmp_path / "report"
    result = run_kdrun(["--device", "cpu", "--out", str(out), str(old)], cwd=tmp_path, command="kdrun-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "evaluation.json").read_text())["evaluation"]
    metrics = read_metrics(reported_run)
    for stage in ("teacher", "baseline", "student"):
        assert evaluation[stage]["acc"] == pytest.approx(metrics[stage]["test_acc_best"])
        assert evaluation[stage]["size_mb"] == pytest.approx((old / f"{stage}.pt").stat().st_size / 2**20)
    assert not list(old.glob("*.safetensors"))  # evaluating converts nothing behind the user's back
    (old / "student.pt").unlink()
    bad = run_kdrun([str(old)], cwd=tmp_path, command="kdrun-eval")
    assert bad.returncode == 2 and "has no student.safetensors (nor student.pt): the run did not finish" in bad.stderr
