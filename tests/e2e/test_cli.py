"""The real ``kdrun`` command in a subprocess: output contract, TensorBoard, errors, packaging."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from kdrun.models.checkpoint import read_checkpoint
from kdrun.training.runtime import resolve_runtime
from tests.conftest import QUICK, REPO, built_once, read_metrics, run_kdrun, without_timings

STAGE_KEYS = {
    "source",
    "cache_key",
    "params",
    "test_acc",
    "test_acc_best",
    "val_acc_best",
    "best_epoch",
    "test_top5",
    "train_time_s",
    "img_per_s",
}


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def hparams_of(acc: EventAccumulator) -> dict:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value or v.number_value or v.bool_value for k, v in info.hparams.items()}


def check_run_dir(run_dir: Path, stages=("teacher", "baseline", "student")) -> dict:
    metrics = read_metrics(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    for stage in stages:
        assert STAGE_KEYS <= set(metrics[stage]), stage
        assert 0 <= metrics[stage]["test_acc"] <= 1 and 0 <= metrics[stage]["val_acc_best"] <= 1
        assert (run_dir / f"{stage}.safetensors").is_file() and not (run_dir / f"{stage}.pt").exists()
    assert metrics["objective"] == metrics["student"]["val_acc_best"]
    if "baseline" in stages:
        assert metrics["kd_gain"] == pytest.approx(metrics["student"]["test_acc"] - metrics["baseline"]["test_acc"])
    return metrics


def test_default_run_writes_the_output_contract(tmp_path):
    run_dir = tmp_path / "run"
    result = run_kdrun([f"hydra.run.dir={run_dir}", *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(run_dir)
    assert (
        metrics["config"]
        | {
            "dataset": "digits",
            "teacher": "resnet20",
            "student": "small_cnn",
            "loss": "kd",
            "T": 4.0,
            "alpha": 0.2,
            "seed": 0,
            "device": "cpu",
            "amp": resolve_runtime("cpu", "auto").amp,  # bf16 where the CPU has native bf16
        }
        == metrics["config"]
    )
    assert metrics["teacher"]["params"] > 10 * metrics["student"]["params"]
    log = (run_dir / "kdrun.log").read_text() + result.stdout
    assert "CE weight 0.2, KD weight 0.8" in log
    assert "KD gain" in log and "teacher" in log and "baseline" in log
    acc = events(run_dir)
    tags = set(acc.Tags()["scalars"])
    for stage in ("teacher", "baseline", "student"):
        assert {
            f"{stage}/train/loss",
            f"{stage}/train/acc",
            f"{stage}/val/loss",
            f"{stage}/val/acc",
            f"{stage}/lr",
            f"{stage}/img_per_s",
        } <= tags
    assert {"student/train/ce", "student/train/kd"} <= tags
    assert {"final/student_test_acc", "final/kd_gain", "final/kd_gain_ci95_low", "final/kd_gain_ci95_high"} <= tags
    hp = hparams_of(acc)
    assert hp["dataset"] == "digits" and hp["teacher"] == "resnet20" and hp["T"] == 4.0 and hp["alpha"] == 0.2
    assert hp["student_epochs"] == 1


def test_issue_command_on_real_mnist(tmp_path, mnist_root):
    run_dir = tmp_path / "run"
    result = run_kdrun(
        [
            f"hydra.run.dir={run_dir}",
            "dataset=mnist",
            f"dataset.root={mnist_root}",
            "dataset.download=false",
            "teacher=lenet5",
            "student=mlp",
            "T=4",
            "alpha=0.2",
            "student.hidden=[32]",
            *QUICK,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(run_dir)
    assert metrics["config"]["dataset"] == "mnist"
    assert metrics["teacher"]["test_acc"] > 0.9 and metrics["student"]["test_top5"] > 0.9
    assert {"student/train/kd", "teacher/val/acc"} <= set(events(run_dir).Tags()["scalars"])


def test_baseline_false_and_teacher_checkpoint(tmp_path):
    first = tmp_path / "first"
    assert run_kdrun([f"hydra.run.dir={first}", "teacher=lenet5", *QUICK], cwd=tmp_path).returncode == 0
    # the teacher file as an earlier kdrun wrote it: torch.save of the same dict
    old = tmp_path / "old-teacher.pt"
    torch.save(read_checkpoint(first / "teacher.safetensors"), old)
    second = tmp_path / "second"
    result = run_kdrun(
        [
            f"hydra.run.dir={second}",
            "teacher=lenet5",
            f"teacher.checkpoint={old}",
            "baseline=false",
            *QUICK,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(second, stages=("teacher", "student"))
    assert "baseline" not in metrics and "kd_gain" not in metrics
    assert metrics["teacher"]["source"] == "checkpoint"
    assert metrics["teacher"]["test_acc_best"] == pytest.approx(read_metrics(first)["teacher"]["test_acc_best"])
    result = run_kdrun(
        [
            f"hydra.run.dir={tmp_path / 'third'}",
            "teacher=resnet20",
            f"teacher.checkpoint={first / 'teacher.safetensors'}",
            *QUICK,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "holds a lenet5 but the run's model is resnet20" in result.stderr


CLI_ERRORS = [
    # overrides
    (["teacher=resnet1000"], "teacher='resnet1000' is not a known option; choose one of:"),
    (["dataset=imagenet21k"], "dataset='imagenet21k' is not a known option; choose one of: cifar10"),
    (["optim=rmsprop"], "optim='rmsprop' is not a known option; choose one of: adam, adamw, sgd"),
    (["T=-1"], "T=-1 is invalid: must be a finite number > 0 and <= 1000"),
    (["alpha=2"], "alpha=2 is invalid: must be a finite number >= 0 and <= 1"),
    (["alpha=abc"], "alpha='abc' is invalid: must be a finite number"),
    (["train.student.epochs=0"], "train.student.epochs=0 is invalid"),
    (["train.max_nonfinite_steps=-1"], "train.max_nonfinite_steps=-1 is invalid: must be an integer >= 0"),
    (["dataset.val_fraction=0"], "dataset.val_fraction=0 is invalid: must be a finite number > 0 and < 1"),
    (["amp=fp8"], "amp='fp8' is invalid: must be one of: auto, bf16, fp16, off"),
    (
        ["loss=dkd", "+loss.tckd_weigth=2"],
        "loss.tckd_weigth is not an option of loss=dkd; its options are: nckd_weight, standardize, tckd_weight",
    ),
    (
        ["loss=at", "loss.student_layers=3"],
        "loss.student_layers=3 is invalid: must be a list of strings or a string or null",
    ),
    (["loss=fitnet", "loss.student_layers=[nope]"], "student has no layer 'nope'; its layers are: features.0, "),
    (["loss=at", "student=mlp"], "loss=at needs spatial feature maps, but the student's layer 'net.6' gives shape"),
    (["compile=maybe"], "compile='maybe' is invalid: must be true or false"),
    (["student.widht=3"], "Could not override 'student.widht'"),
    (["alpah=0.3"], "Could not override 'alpah'"),
    # paths
    (
        ["dataset=mnist", "dataset.root=/no/such/dir", "dataset.download=false"],
        "dataset.root=/no/such/dir is not a folder",
    ),
    (["dataset=mnist", "dataset.root={d}/afile", "dataset.download=false"], "dataset.root={d}/afile is not a folder"),
    (["cache.dir={d}/afile/cache"], "cache.dir={d}/afile/cache cannot be a folder: {d}/afile is a file"),
    (["hydra.run.dir={d}/afile/run"], "cannot use {d}/afile/run: Not a directory"),
    # config files
    (["--config-dir", "{d}/conf", "student=broken"], "{d}/conf/student/broken.yaml, line 3 is not valid YAML"),
    (["--config-dir", "{d}/conf", "student=typo"], "student.widht is not an option of small_cnn; its options are"),
    # checkpoint files
    (["teacher.checkpoint={d}/evil.pt"], "{d}/evil.pt was refused by torch.load(weights_only=True)"),
    (["teacher.checkpoint={d}/cut.pt"], "{d}/cut.pt is not a readable PyTorch checkpoint (truncated or corrupt?)"),
    (
        ["teacher.checkpoint={d}/cut.safetensors"],
        "{d}/cut.safetensors is not a readable safetensors file (truncated or corrupt?)",
    ),
    (["teacher.checkpoint={d}/notes.txt"], "{d}/notes.txt is not a readable PyTorch checkpoint"),
    (["teacher.checkpoint={d}/list.pt"], "{d}/list.pt holds a list, not a state_dict or a kdrun checkpoint"),
    (["teacher.checkpoint={d}/mlp.safetensors"], "{d}/mlp.safetensors holds a mlp but the run's model is resnet20"),
    (["teacher.checkpoint={d}/c100.safetensors"], "trained with num_classes=100 but the dataset has num_classes=10"),
    (["teacher.checkpoint={d}/rgb.safetensors"], "was trained with in_channels=3 but the dataset has in_channels=1"),
    (["teacher.checkpoint={d}/sd100.pt"], "{d}/sd100.pt does not fit resnet20 for this dataset: shape mismatch"),
    (["teacher.checkpoint={d}/absent.pt"], "teacher.checkpoint={d}/absent.pt is not a file"),
]


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))  # would create a file when unpickled


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    """Files that the bad-input table points kdrun at: broken configs and checkpoints of every kind."""
    return built_once(tmp_path_factory, "bad-files", _write_bad_files)


def _write_bad_files(d: Path) -> None:
    from kdrun.data import DataSpec
    from kdrun.models import build_model
    from kdrun.models.checkpoint import save_model

    (d / "afile").write_text("a file, not a folder\n")
    (d / "conf" / "student").mkdir(parents=True)
    (d / "conf" / "student" / "broken.yaml").write_text("name: small_cnn\nchannels: [16, 32\n")
    (d / "conf" / "student" / "typo.yaml").write_text("name: small_cnn\nwidht: 3\n")
    _Payload.marker = d / "pwned"
    torch.save({"state_dict": {}, "x": _Payload()}, d / "evil.pt")
    digits, resnet20 = DataSpec(10, 1, 8), {"name": "resnet20"}
    save_model(d / "good.safetensors", build_model(resnet20, digits), resnet20, digits)
    data = (d / "good.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(read_checkpoint(d / "good.safetensors"), d / "good.pt")  # as an earlier kdrun wrote it
    data = (d / "good.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("these are not weights\n")
    torch.save([1, 2, 3], d / "list.pt")
    save_model(d / "mlp.safetensors", build_model({"name": "mlp"}, digits), {"name": "mlp"}, digits)
    save_model(d / "c100.safetensors", build_model(resnet20, DataSpec(100, 1, 8)), resnet20, DataSpec(100, 1, 8))
    save_model(d / "rgb.safetensors", build_model(resnet20, DataSpec(10, 3, 8)), resnet20, DataSpec(10, 3, 8))
    torch.save(build_model(resnet20, DataSpec(100, 1, 8)).state_dict(), d / "sd100.pt")  # bare: no metadata


def bad_input_call(row: int, bad_files: Path, folder: Path) -> tuple[list[str], Path]:
    """Row ``row`` of the table as a command line, run from ``folder`` into ``folder/run`` unless it names a run dir."""
    args = [a.format(d=bad_files) for a in CLI_ERRORS[row][0]]
    run_dir_args = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={folder / 'run'}"]
    return [*args, *run_dir_args], folder


@pytest.mark.parametrize("row", range(len(CLI_ERRORS)), ids=[m for _, m in CLI_ERRORS])
def test_bad_input_exits_non_zero_with_one_line(bad_files, tmp_path, row):
    result = run_kdrun(*bad_input_call(row, bad_files, tmp_path), timeout=120)
    message = CLI_ERRORS[row][1]
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kdrun: error: ") and message.format(d=bad_files) in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (bad_files / "pwned").exists()  # the malicious pickle never ran


# One row of each kind of failure: a Hydra group option, a value, a path, a YAML file, a pickle that must not run.
AS_PROCESSES = ["teacher=resnet1000", "T=-1", "hydra.run.dir={d}/afile/run", "student=broken", "{d}/evil.pt"]


def test_forked_kdrun_processes_fail_and_finish_as_cold_ones(bad_files, tmp_path):
    """run_kdrun's processes, forked from a server that has done the imports (tests/kdrun_forkserver.py), against
    ``kdrun`` started cold: a row of each kind of refusal gives the same exit status and stderr, and a finished run
    the same log lines and numbers, its timings and peak memory aside (a forked child shares the imports' pages)."""
    rows = [next(r for r, (args, _) in enumerate(CLI_ERRORS) if any(key in a for a in args)) for key in AS_PROCESSES]
    for row in rows:
        call = bad_input_call(row, bad_files, tmp_path)
        forked, cold = (run_kdrun(*call, timeout=120, cold=c) for c in (False, True))
        assert forked.returncode == cold.returncode == 2, (row, cold.stderr)
        assert forked.stderr == cold.stderr, row
    assert not (bad_files / "pwned").exists()

    runs = {}
    for how in ("forked", "cold"):
        folder = tmp_path / how  # each with a cache of its own
        folder.mkdir()
        result = run_kdrun([f"hydra.run.dir={folder / 'run'}", *QUICK], cwd=folder, cold=how == "cold")
        assert result.returncode == 0, result.stderr[-3000:]
        timed = re.compile(r"[0-9.]+ ?(img/s|s|ms)\b")
        log = [timed.sub("<timed>", line.split("] - ", 1)[-1]) for line in result.stdout.splitlines()]
        metrics = without_timings(read_metrics(folder / "run"))
        runs[how] = ("\n".join(log).replace(str(folder), "<folder>"), result.stderr.count("\n"), metrics)
    assert runs["forked"] == runs["cold"]


def test_the_bad_input_table_is_large():
    assert len(CLI_ERRORS) >= 20


def test_missing_dataset_files_offline(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_kdrun(
        [
            f"hydra.run.dir={tmp_path / 'run'}",
            "dataset=fashion_mnist",
            f"dataset.root={tmp_path / 'empty'}",
            "dataset.download=false",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"files not found under {tmp_path / 'empty' / 'FashionMNIST' / 'raw'}" in result.stderr


def test_user_config_dir_and_target_model(tmp_path):
    (tmp_path / "mine" / "student").mkdir(parents=True)
    (tmp_path / "mine" / "student" / "tiny.yaml").write_text("_target_: usernet.Tiny\nwidth: 16\n")
    (tmp_path / "usernet.py").write_text(
        "import torch.nn as nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, num_classes, in_channels, image_size, width=8):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, width), nn.ReLU(),\n"
        "                                 nn.Linear(width, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
    )
    run_dir = tmp_path / "run"
    result = run_kdrun(
        ["--config-dir", str(tmp_path / "mine"), f"hydra.run.dir={run_dir}", "student=tiny", "teacher=lenet5", *QUICK],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(run_dir)
    assert metrics["config"]["student"] == "usernet.Tiny"
    assert metrics["student"]["params"] == 64 * 16 + 16 + 16 * 10 + 10


def _build_wheel(out: Path) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*command, str(REPO)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, the way `pip install .` builds it."""
    return next(built_once(tmp_path_factory, "wheel", _build_wheel).glob("kdrun-*.whl"))


def test_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "kdrun/conf/__init__.py",  # registers the model catalogue as the teacher and student groups
        "kdrun/conf/config.yaml",
        "kdrun/conf/dataset/digits.yaml",
        "kdrun/models/catalogue/resnet18.yaml",  # the teacher and student options
        "kdrun/models/catalogue/small_cnn.yaml",
        "kdrun/conf/loss/kd.yaml",
        "kdrun/cli/main.py",
    ):
        assert required in names, required
    # every module of the package, subpackages included (kdrun/data/ is also a name .gitignore ignores)
    for path in (REPO / "kdrun").rglob("*.py"):
        required = path.relative_to(REPO).as_posix()
        assert required in names, required
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kdrun = kdrun.cli.main:main" in entry_points
    assert "kdrun-eval = kdrun.cli.evaluate:main" in entry_points
    assert "kdrun-summary = kdrun.reporting.sweep:main" in entry_points


def test_metrics_json_is_valid_json_with_fractions(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        run_kdrun(
            [
                f"hydra.run.dir={run_dir}",
                "dataset=fake",
                "teacher=resnet8",
                "student=mlp",
                "dataset.train_size=64",
                *QUICK,
            ],
            cwd=tmp_path,
        ).returncode
        == 0
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "fake"


def test_non_editable_wheel_install_runs(tmp_path, wheel):
    # Install the wheel into a folder that shadows the editable install, and run kdrun from it.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run(
        [sys.executable, "-c", "import kdrun; print(kdrun.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(tmp_path / "site"))
    result = subprocess.run(
        [sys.executable, "-m", "kdrun", "teacher=resnet18", "student=small_cnn", "--cfg", "job"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "name: resnet18" in result.stdout and "T: 4.0" in result.stdout
