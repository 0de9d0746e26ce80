"""Real multirun sweeps through the ``kdrun`` command: one teacher per sweep, summaries, failures, kills, Optuna."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import KDRUN, QUICK, read_metrics, run_kdrun
from tests.e2e.test_cli import hparams_of

GRID = ["T=1,4", "alpha=0.1,0.5"]


def sweep(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / name
    result = run_kdrun(["-m", *QUICK, *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    return result, sweep_dir


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml"))


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def sources(sweep_dir: Path, stage: str) -> list[str]:
    return sorted(read_metrics(job)[stage]["source"] for job in job_dirs(sweep_dir))


def test_parallel_sweep_trains_one_teacher_and_one_baseline_then_none(tmp_path):
    result, first = sweep(tmp_path, "first", *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(first)
    assert [",".join(o for o in j.name.split(",") if o.startswith(("T=", "alpha="))) for j in jobs] == [
        "T=1,alpha=0.1",
        "T=1,alpha=0.5",
        "T=4,alpha=0.1",
        "T=4,alpha=0.5",
    ]
    for stage in ("teacher", "baseline"):
        assert sources(first, stage) == ["cache", "cache", "cache", "trained"], stage
        assert len({read_metrics(j)[stage]["cache_key"] for j in jobs}) == 1
        assert len(list((tmp_path / "outputs" / ".cache" / stage).glob("[0-9a-f]*[0-9a-f]"))) == 1
    logs = "".join((j / "kdrun.log").read_text() for j in jobs)
    assert logs.count("cache miss: teacher ") == 1 and logs.count("cache hit: teacher ") == 3
    assert "2 jobs run at once: 1 CPU thread(s)" in logs

    rows = summary_rows(first)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {(float(r["T"]), float(r["alpha"])) for r in rows} == {(1, 0.1), (1, 0.5), (4, 0.1), (4, 0.5)}
    for row, job in zip(sorted(rows, key=lambda r: r["job"]), jobs, strict=True):
        assert float(row["student.test_acc"]) == pytest.approx(read_metrics(job)["student"]["test_acc"])
    assert "T" in (first / "summary.md").read_text()
    for png in ("heatmap_test_acc.png", "heatmap_val_acc.png"):
        assert (first / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for job in jobs:  # one HParams session per job, with the swept values and the final metrics
        acc = EventAccumulator(str(job / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        hp = hparams_of(acc)
        assert {hp["T"], hp["alpha"]} == {read_metrics(job)["config"]["T"], read_metrics(job)["config"]["alpha"]}
        assert "seed" in hp and "final/student_test_acc" in acc.Tags()["scalars"]
        # every job shows the teacher's and the baseline's curves, replayed where they came from the cache
        assert {"teacher/val/acc", "baseline/train/loss"} <= set(acc.Tags()["scalars"])

    result, again = sweep(tmp_path, "again", *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("teacher", "baseline"):
        assert sources(again, stage) == ["cache"] * 4
    assert "cache miss" not in "".join((j / "kdrun.log").read_text() for j in job_dirs(again))

    summary = subprocess.run([str(KDRUN) + "-summary", str(again)], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "4 ok" in summary.stdout


def test_failed_job_is_listed_and_the_sweep_still_finishes(tmp_path):
    result, sweep_dir = sweep(tmp_path, "sweep", "T=4,-1")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("kdrun: error: 1 job(s) of the sweep failed") and "T=-1" in error
    rows = {r["T"]: r for r in summary_rows(sweep_dir)}
    assert rows["4"]["status"] == "ok"
    assert rows["-1"]["status"] == "failed" and "T=-1" in rows["-1"]["error"]
    failure = json.loads((sweep_dir / rows["-1"]["job"] / "failure.json").read_text())
    assert failure["type"] == "KdrunError" and "Traceback" in failure["traceback"]
    assert "failed" in (sweep_dir / "summary.md").read_text()


def test_seed_axis_trains_one_teacher_per_seed_and_aggregates(tmp_path):
    result, sweep_dir = sweep(tmp_path, "seeds", "seed=0,1", "T=1,4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(summary_rows(sweep_dir)) == 4
    assert len(list((tmp_path / "outputs" / ".cache" / "teacher").glob("[0-9a-f]*[0-9a-f]"))) == 2
    assert "±" in (sweep_dir / "summary.md").read_text()


def test_killed_sweep_reruns_reusing_every_finished_artefact(tmp_path):
    args = ["-m", *QUICK, "T=1,2,3,4,5,6", "train.student.epochs=3", f"hydra.sweep.dir={tmp_path / 'killed'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(
        [str(KDRUN), *args],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob("*/metrics.json")):
        assert proc.poll() is None and time.time() < deadline, (
            "the sweep ended or stalled before its first job finished"
        )
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((tmp_path / "killed").glob("*/metrics.json"))) < 6

    result, rerun = sweep(tmp_path, "rerun", "T=1,2,3,4,5,6", "train.student.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sources(rerun, "teacher") == ["cache"] * 6 and sources(rerun, "baseline") == ["cache"] * 6
    assert [r["status"] for r in summary_rows(rerun)] == ["ok"] * 6


def test_optuna_search_maximises_validation_accuracy_and_resumes(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed: pip install -e '.[optuna]'")
    storage = f"sqlite:///{tmp_path / 'studies' / 'kd.db'}"
    search = ["hparams_search=optuna_T_alpha", f"hydra.sweeper.storage={storage}"]
    result, first = sweep(tmp_path, "optuna1", *search, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    result, again = sweep(tmp_path, "optuna2", *search, "hydra.sweeper.n_trials=1")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="kd_T_alpha", storage=storage)
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)  # 2, then 1 more
    assert study.direction.name == "MAXIMIZE"
    assert [j.name.split(",")[0] for j in job_dirs(first) + job_dirs(again)] == ["trial_0", "trial_1", "trial_2"]
    assert len({t.params["T"] for t in study.trials}) == 3  # the resumed search did not draw trial 0's point again
    for trial in study.trials:
        (job,) = [j for j in job_dirs(first) + job_dirs(again) if j.name.startswith(f"trial_{trial.number},")]
        metrics = read_metrics(job)
        assert 1 <= trial.params["T"] <= 10 and 0 <= trial.params["alpha"] <= 1
        assert metrics["config"]["T"] == pytest.approx(trial.params["T"])
        assert trial.value == pytest.approx(metrics["student"]["val_acc_best"]) == metrics["objective"]
        assert trial.intermediate_values == {1: pytest.approx(metrics["student"]["val_acc_best"])}  # 1 epoch
        assert trial.user_attrs["kdrun.run_dir"] == str(job) and "pruned" not in metrics
    assert len(summary_rows(first)) == 2
    results = (first / "optimization_results.yaml").read_text()
    assert "best_value" in results and "complete: 2" in results


def test_optuna_pruner_stops_trials_run_by_parallel_jobs(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed: pip install -e '.[optuna]'")
    storage = f"sqlite:///{tmp_path / 'studies' / 'kd.db'}"
    args = [
        *("-m", "train.teacher.epochs=1", "train.student.epochs=3", "train.progress=false"),
        *("hparams_search=optuna_T_alpha", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2"),
        # a real Optuna pruner that stops every trial at its 2nd epoch: no validation accuracy reaches 1.01
        *("hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=1.01", "hydra.sweeper.pruner.n_warmup_steps=2"),
        *("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'pruned'}"),
    ]
    result = run_kdrun(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(tmp_path / "pruned")
    logs = "".join((j / "kdrun.log").read_text() for j in jobs)
    assert "2 jobs run at once" in logs  # two processes, each opening its trial from the storage
    study = optuna.load_study(study_name="kd_T_alpha", storage=storage)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for trial in study.trials:
        (job,) = [j for j in jobs if j.name.startswith(f"trial_{trial.number},")]
        metrics = read_metrics(job)
        assert metrics["pruned"] is True and metrics["pruned_epoch"] == 2 and metrics["student"]["stopped_epoch"] == 2
        acc = EventAccumulator(str(job / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        logged = {e.step: e.value for e in acc.Scalars("student/val/acc")}
        assert trial.intermediate_values == pytest.approx(logged) and set(logged) == {1, 2}
        assert trial.value == pytest.approx(logged[2])  # Optuna keeps a pruned trial's last report
        assert (job / "student.safetensors").is_file() and "search." not in job.name
    rows = summary_rows(tmp_path / "pruned")
    assert [r["status"] for r in rows] == ["pruned", "pruned"] and {r["pruned_epoch"] for r in rows} == {"2"}
    md = (tmp_path / "pruned" / "summary.md").read_text()
    assert "2 jobs: 0 ok, 2 pruned, 0 failed" in md and md.count("**pruned** after epoch 2") == 2
    assert "no trial of study kd_T_alpha has completed yet" in result.stderr + result.stdout
