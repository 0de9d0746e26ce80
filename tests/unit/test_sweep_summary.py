"""The sweep summary on synthetic sweep dirs laid out as Hydra and kdrun write them: csv, markdown, heatmaps, CLI."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread
from omegaconf import OmegaConf

from kdrun.reporting.heatmap import HATCH, Marks, grid_figure, plot_kind
from kdrun.reporting.sweep import (
    POOLED_COLUMNS,
    collect_jobs,
    colour_centre,
    grid_flags,
    grid_noise,
    grid_pruned,
    grid_values,
    main,
    write_summary,
)

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA = "hydra_plugins.kdrun_optuna_sweeper.kdrun_optuna_sweeper.KdrunOptunaSweeper"
DEFAULTS = {"T": 4.0, "alpha": 0.2, "seed": 0, "baseline": True}
GROUPS = ("dataset", "teacher", "student")


def make_sweep(root: Path, task: list[str], sweeper: str = BASIC, params: dict | None = None) -> Path:
    root.mkdir(parents=True)
    hydra = {"sweeper": {"_target_": sweeper, "params": params}, "overrides": {"task": task}}
    OmegaConf.save(OmegaConf.create({**DEFAULTS, "hydra": hydra}), root / "multirun.yaml")
    return root


def job_config(overrides: list[str]) -> dict:
    config = {
        **DEFAULTS,
        **{group: {"name": name} for group, name in zip(GROUPS, ("mnist", "resnet18", "cnn"), strict=True)},
    }
    for override in overrides:
        key, value = override.split("=")
        if key in GROUPS:
            config[key] = {"name": value}
        else:
            config[key] = yaml.safe_load(value)
    return config


def stage(model: str, acc: float, key: str) -> dict:
    return {
        "source": "trained",
        "cache_key": key,
        "model": model,
        "params": 1000,
        "test_acc": acc,
        "test_acc_best": acc,
        "val_acc_best": acc + 0.001,
        "best_epoch": 3,
        "test_top5": 1.0,
        "train_time_s": 1.5,
        "img_per_s": 100.0,
    }


def add_job(
    sweep: Path,
    overrides: list[str],
    acc: float | None = None,
    error: str | None = None,
    name: str | None = None,
    baseline: bool = True,
) -> Path:
    """A job dir: with ``acc`` a finished job (metrics.json), with ``error`` a failed one, else one still running."""
    job = sweep / (name or ",".join(overrides))
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    config = job_config(overrides)
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if error is not None:
        (job / "failure.json").write_text(json.dumps({"error": error, "type": "RuntimeError"}))
    if acc is not None:
        seed, student = config["seed"], config["student"]["name"]
        metrics = {
            "config": {
                **{g: config[g]["name"] for g in GROUPS},
                "T": float(config["T"]),
                "alpha": float(config["alpha"]),
            },
            "teacher": stage("resnet18", 0.99 - 0.001 * seed, f"t{seed}"),
            "student": stage(student, acc, "s"),
            "objective": acc + 0.001,
        }
        metrics["config"].update(seed=seed, baseline=baseline, loss="kd")
        if baseline:
            base = 0.95 + (0.01 if student == "b" else 0.0) + 0.001 * seed
            metrics["baseline"] = stage(student, base, f"b{student}{seed}")
            metrics["kd_gain"] = acc - base
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def read_csv(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def table_rows(md: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def assert_png(path: Path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_grid_all_ok(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4", "alpha=0.1,0.5", "dataset=mnist"])
    accs = {("1", "0.1"): 0.96, ("1", "0.5"): 0.97, ("4", "0.1"): 0.985, ("4", "0.5"): 0.955}
    for (T, alpha), acc in accs.items():
        add_job(sweep, [f"T={T}", f"alpha={alpha}", "dataset=mnist"], acc)

    written = write_summary(sweep)

    names = ["summary.csv", "summary.md", "heatmap_test_acc.png", "heatmap_val_acc.png"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == sorted([*names, "multirun.yaml"])
    rows = read_csv(sweep)
    assert len(rows) == 4
    header = list(rows[0])
    assert header[:5] == ["job", "status", "error", "T", "alpha"]
    pooled = len(POOLED_COLUMNS)
    groups = [h.split(".")[0] if "." in h else "" for h in header[5:-pooled]]
    assert groups == sorted(groups, key=["config", "teacher", "baseline", "student", ""].index)
    assert header[-pooled - 4 :] == ["kd_gain", "objective", "teacher_lead", "teacher_lead_warning", *POOLED_COLUMNS]
    by_point = {(r["T"], r["alpha"]): r for r in rows}
    assert {p: float(r["student.test_acc"]) for p, r in by_point.items()} == accs
    assert by_point["4", "0.1"]["job"] == "T=4,alpha=0.1,dataset=mnist"
    assert by_point["4", "0.1"]["status"] == "ok" and by_point["4", "0.1"]["config.T"] == "4.0"

    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 4 ok, 0 failed, 0 incomplete, 0 pending" in md
    assert md.count("teacher resnet18") == 1 and md.count("baseline cnn") == 1
    table = table_rows(md)
    assert [row[:2] for row in table] == [["4", "0.1"], ["1", "0.5"], ["1", "0.1"], ["4", "0.5"]]
    assert table[0][3:] == ["98.60", "98.50", "+3.50", "n=1: no interval", "", "ok"]
    assert "## Failed jobs" not in md
    for png in written[2:]:
        assert_png(png)


def test_failed_incomplete_and_pending_jobs(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4", "alpha=0.1,0.5"])
    add_job(sweep, ["T=1", "alpha=0.1"], 0.97)
    add_job(sweep, ["T=1", "alpha=0.5"], error="CUDA out of memory. Tried to allocate 2.00 GiB")
    add_job(sweep, ["T=4", "alpha=0.1"])  # started, no result yet: T=4,alpha=0.5 has no dir at all

    jobs = collect_jobs(sweep)
    assert [(job.overrides, job.status) for job in jobs] == [
        (["T=1", "alpha=0.1"], "ok"),
        (["T=1", "alpha=0.5"], "failed"),
        (["T=4", "alpha=0.1"], "incomplete"),
        (["T=4", "alpha=0.5"], "pending"),
    ]
    assert jobs[3].dir is None and (jobs[3].T, jobs[3].alpha, jobs[3].seed) == (4.0, 0.5, 0)

    write_summary(sweep)
    rows = read_csv(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("T=1,alpha=0.1", "ok"),
        ("T=1,alpha=0.5", "failed"),
        ("T=4,alpha=0.1", "incomplete"),
        ("", "pending"),
    ]
    assert rows[1]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[1]["student.test_acc"] == "" and rows[3]["T"] == "4"

    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 1 ok, 1 failed, 1 incomplete, 1 pending" in md
    assert [row[-1] for row in table_rows(md)] == ["ok", "failed", "incomplete", "pending"]
    failed_section = md.split("## Failed jobs")[1]
    assert "- `T=1 alpha=0.5` in `T=1,alpha=0.5`: CUDA out of memory. Tried to allocate 2.00 GiB" in failed_section
    assert "- `T=4 alpha=0.1` in `T=4,alpha=0.1`" in md.split("## Incomplete jobs")[1]
    assert "- `T=4 alpha=0.5`" in md.split("## Pending jobs")[1]

    values, failed = grid_values(jobs, "student.test_acc")
    assert values == {(1.0, 0.1): 0.97, (1.0, 0.5): None, (4.0, 0.1): None, (4.0, 0.5): None}
    assert failed == {(1.0, 0.5)}
    assert_png(sweep / "heatmap_test_acc.png")


def test_seed_axis_pools_seeds(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["seed=0,1,2", "T=1,4"])
    accs = {"1": [0.96, 0.97, 0.98], "4": [0.98, 0.985, 0.99]}
    for seed in range(3):
        for T in ("1", "4"):
            add_job(sweep, [f"seed={seed}", f"T={T}"], accs[T][seed])

    write_summary(sweep)

    rows = read_csv(sweep)
    assert len(rows) == 6 and list(rows[0])[3:5] == ["seed", "T"]
    assert sorted((r["seed"], r["T"]) for r in rows) == [(s, T) for s in "012" for T in "14"]
    md = (sweep / "summary.md").read_text()
    objective = [100 * (acc + 0.001) for acc in accs["1"]]
    row_T1 = f"{statistics.fmean(objective):.2f} ± {statistics.stdev(objective):.2f}"
    assert table_rows(md)[1][:3] == ["1", "3", row_T1]
    assert table_rows(md)[0][:2] == ["4", "3"] and table_rows(md)[0][-1] == "ok"
    teacher = [99.0, 98.9, 98.8]
    assert f"teacher resnet18 on mnist: test acc 98.90 ± {statistics.stdev(teacher):.2f}% (n=3)" in md

    jobs = collect_jobs(sweep)
    values, failed = grid_values(jobs, "student.test_acc")
    assert values == pytest.approx({(1.0, 0.2): statistics.fmean(accs["1"]), (4.0, 0.2): statistics.fmean(accs["4"])})
    assert not failed
    assert colour_centre(jobs, "baseline.test_acc", values)[0] == pytest.approx(0.951)
    assert_png(sweep / "heatmap_val_acc.png")


def test_extra_axis_gets_its_own_heatmaps(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["student=a,b", "T=1,4"])
    for student in "ab":
        for T in (1, 4):
            add_job(sweep, [f"student={student}", f"T={T}"], 0.95 + 0.01 * T)

    written = write_summary(sweep)

    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == [f"heatmap_{m}__student={s}.png" for m in ("test_acc", "val_acc") for s in "ab"]
    for name in pngs:
        assert_png(sweep / name)
    md = (sweep / "summary.md").read_text()
    assert "baseline a on mnist" in md and "baseline b on mnist" in md
    assert [row[:2] for row in table_rows(md)] == [["a", "4"], ["b", "4"], ["a", "1"], ["b", "1"]]


@pytest.mark.parametrize("kind", ["missing", "file", "empty dir"])
def test_cli_rejects_a_bad_path(tmp_path, capsys, kind):
    path = tmp_path / "not-a-sweep"
    if kind == "file":
        path.write_text("hello\n")
    elif kind == "empty dir":
        path.mkdir()
        (path / "notes").mkdir()

    with pytest.raises(SystemExit) as exit_info:
        main([str(path)])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kdrun-summary: error: ") and str(path) in err[0]
    assert (
        sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
        == {
            "missing": [],
            "file": ["not-a-sweep"],
            "empty dir": ["not-a-sweep", "not-a-sweep/notes"],
        }[kind]
    )


def test_cli_prints_the_summary(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4"])
    add_job(sweep, ["T=1"], 0.97)

    main([str(sweep)])

    out = capsys.readouterr().out
    assert out.startswith(f"# Sweep summary: {sweep}") and "2 jobs: 1 ok, 0 failed, 0 incomplete, 1 pending" in out
    assert str(sweep / "heatmap_test_acc.png") in out


def test_continuous_search_is_a_scatter_plot(tmp_path):
    params = {"T": "interval(1.0, 10.0)", "alpha": "interval(0.0, 1.0)"}
    sweep = make_sweep(tmp_path / "sweep", ["hparams_search=optuna_T_alpha"], sweeper=OPTUNA, params=params)
    for i in range(15):
        T, alpha = 1 + 0.6 * i, (0.37 * i) % 1
        overrides = ["hparams_search=optuna_T_alpha", f"T={T}", f"alpha={alpha}"]
        if i == 3:
            add_job(sweep, overrides, error="loss is NaN", name=str(i))
        else:
            add_job(sweep, overrides, 0.9 + 0.005 * i, name=str(i), baseline=False)

    written = write_summary(sweep)

    jobs = collect_jobs(sweep)
    assert len(jobs) == 15 and {job.status for job in jobs} == {"ok", "failed"}
    assert list(read_csv(sweep)[0])[3:5] == ["T", "alpha"]
    values, failed = grid_values(jobs, "student.test_acc")
    assert plot_kind(values) == "scatter" and len(failed) == 1
    center, how = colour_centre(jobs, "baseline.test_acc", values)
    assert center == pytest.approx(statistics.median(v for v in values.values() if v is not None))
    assert "median" in how
    assert [p.name for p in written[2:]] == ["heatmap_test_acc.png", "heatmap_val_acc.png"]
    for png in written[2:]:
        assert_png(png)


def test_uncached_teachers_of_different_seeds_count_once_each(tmp_path):
    # Ensembles have no cache key: two seeds' ensembles with the same test acc are still two teachers, while
    # every job distilling from one loaded checkpoint shares one.
    sweep = make_sweep(tmp_path / "sweep", ["seed=0,1,2"])
    for seed in range(3):
        job = add_job(sweep, [f"seed={seed}"], 0.97)
        metrics = json.loads((job / "metrics.json").read_text())
        metrics["teacher"].update(cache_key=None, model="ensemble", test_acc=0.994, ensemble_key=f"e{seed // 2}")
        (job / "metrics.json").write_text(json.dumps(metrics))
    write_summary(sweep)
    assert "teacher ensemble on mnist: test acc 99.40 ± 0.00% (n=2)" in (sweep / "summary.md").read_text()


def edit_metrics(job: Path, **stages: dict) -> None:
    """Merge ``stages`` (stage or top-level key -> entries) into the job's metrics.json."""
    metrics = json.loads((job / "metrics.json").read_text())
    for key, value in stages.items():
        if isinstance(value, dict):
            metrics[key].update(value)
        else:
            metrics[key] = value
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_paired_gain_over_seeds_with_its_t_interval(tmp_path):
    # The baseline of seed s is 0.95 + 0.001 s; kd_gain = student - baseline of the same job.
    # T=1: gains 0.01, 0.03, 0.02 -> mean 0.02, std 0.01, t_{0.975,2} = 4.302653,
    #      half-width 4.302653 * 0.01 / sqrt(3) = 0.0248414 -> [-0.0048414, 0.0448414]: within noise.
    # T=4: gains 0.02, 0.03, 0.04 -> [0.0051586, 0.0548414]: not within noise.
    sweep = make_sweep(tmp_path / "sweep", ["seed=0,1,2", "T=1,4"])
    gains = {"1": [0.01, 0.03, 0.02], "4": [0.02, 0.03, 0.04]}
    for seed in range(3):
        for T in ("1", "4"):
            add_job(sweep, [f"seed={seed}", f"T={T}"], 0.95 + 0.001 * seed + gains[T][seed])

    write_summary(sweep)

    rows = read_csv(sweep)
    expected = {"1": (-0.0048414, 0.0448414, "True"), "4": (0.0051586, 0.0548414, "False")}
    for row in rows:
        low, high, within = expected[row["T"]]
        assert float(row["gain_mean"]) == pytest.approx(statistics.fmean(gains[row["T"]]))
        assert float(row["gain_std"]) == pytest.approx(0.01) and row["gain_n"] == "3"
        assert float(row["gain_ci95_low"]) == pytest.approx(low, abs=1e-6)
        assert float(row["gain_ci95_high"]) == pytest.approx(high, abs=1e-6)
        assert row["within_noise"] == within
    table = {row[0]: row for row in table_rows((sweep / "summary.md").read_text())}
    assert table["1"][4:7] == ["+2.00 ± 1.00", "[-0.48, +4.48]", "**within noise**"]
    assert table["4"][4:7] == ["+3.00 ± 1.00", "[+0.52, +5.48]", ""]


def test_a_single_seed_has_no_interval(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4"])
    add_job(sweep, ["T=1"], 0.97)
    add_job(sweep, ["T=4"], error="boom")

    write_summary(sweep)

    one, failed = read_csv(sweep)
    assert float(one["gain_mean"]) == pytest.approx(0.02) and one["gain_n"] == "1"
    assert one["gain_std"] == one["gain_ci95_low"] == one["gain_ci95_high"] == one["within_noise"] == ""
    assert failed["gain_n"] == "0" and failed["gain_mean"] == ""
    table = table_rows((sweep / "summary.md").read_text())
    assert table[0][5] == "n=1: no interval" and table[1][5] == "–"


def test_a_single_seed_row_shows_its_runs_own_interval_and_whether_it_is_within_noise(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4"])
    for overrides, acc, ci in ((["T=1"], 0.97, [-0.0102, 0.0303]), (["T=4"], 0.99, [0.0255, 0.056])):
        path = add_job(sweep, overrides, acc) / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "kd_gain_ci95": ci}))

    write_summary(sweep)

    table = {row[0]: row for row in table_rows((sweep / "summary.md").read_text())}
    assert table["1"][5:7] == ["n=1: [-1.02, +3.03] over test images (Newcombe)", "**within noise**"]
    assert table["4"][5:7] == ["n=1: [+2.55, +5.60] over test images (Newcombe)", ""]
    rows = {row["T"]: row for row in read_csv(sweep)}  # the csv's gain columns stay over seeds: none for one
    assert rows["1"]["within_noise"] == rows["1"]["gain_ci95_low"] == ""
    assert json.loads(rows["1"]["kd_gain_ci95"]) == [-0.0102, 0.0303]


def test_flagged_runs_are_marked_and_never_pooled_silently(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["seed=0,1,2", "T=1,4"])
    jobs = {(seed, T): add_job(sweep, [f"seed={seed}", f"T={T}"], 0.97) for seed in range(3) for T in (1, 4)}
    reason = "val acc stayed at chance (10.0%) for the last 3 epochs"
    edit_metrics(jobs[1, 4], student={"collapsed": True, "flag_reason": reason, "test_acc": 0.1})
    edit_metrics(jobs[2, 4], baseline={"diverged": True, "flag_reason": "loss was NaN in epoch 2"})

    write_summary(sweep)

    rows = {r["job"]: r for r in read_csv(sweep)}
    assert (rows["seed=1,T=4"]["collapsed"], rows["seed=1,T=4"]["diverged"]) == ("student", "")
    assert (rows["seed=2,T=4"]["collapsed"], rows["seed=2,T=4"]["diverged"]) == ("", "baseline")
    assert rows["seed=1,T=4"]["student.flag_reason"] == reason
    assert all(r["collapsed"] == r["diverged"] == "" for name, r in rows.items() if name.endswith("T=1"))
    md = (sweep / "summary.md").read_text()
    table = {row[0]: row for row in table_rows(md)}
    assert "**1 of 3 runs collapsed** (student)" in table["4"][6]
    assert "**1 of 3 runs diverged** (baseline)" in table["4"][6]
    assert "collapsed" not in table["1"][6] and "diverged" not in table["1"][6]
    flagged = md.split("## Flagged jobs (collapsed or diverged)")[1]
    assert f"- `seed=1 T=4` in `seed=1,T=4`: student collapsed: {reason}" in flagged
    assert "- `seed=2 T=4` in `seed=2,T=4`: baseline diverged: loss was NaN in epoch 2" in flagged

    assert grid_flags(collect_jobs(sweep)) == {(4.0, 0.2): "1/3 collapsed"}  # the student's flags only
    assert_png(sweep / "heatmap_test_acc.png")


def hatched(fig) -> list:
    return [p for ax in fig.axes for p in ax.patches if p.get_hatch() == HATCH]


def test_a_cell_with_a_flagged_student_is_hatched_and_annotated():
    values = {(1.0, 0.1): 0.96, (4.0, 0.1): 0.5, (1.0, 0.5): None, (4.0, 0.5): 0.97}
    marks = Marks(failed={(1.0, 0.5)}, flagged={(4.0, 0.1): "1/3 collapsed"})

    fig = grid_figure(values, marks, 0.95, "title")

    (patch,) = hatched(fig)
    assert patch.get_xy() == (0.5, -0.5) and (patch.get_width(), patch.get_height()) == (1, 1)  # column T=4, row 0.1
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "50.00%\n-45.00\n1/3 collapsed" in texts and "failed" in texts
    assert not hatched(grid_figure(values, Marks(failed={(1.0, 0.5)}), 0.95, "title"))


def test_a_cell_whose_gain_is_within_noise_says_so_on_the_test_heatmap(tmp_path, monkeypatch):
    sweep = make_sweep(tmp_path / "sweep", ["T=1,4", "seed=0,1"])
    # T=1: gains +2.0 and +3.9 points over the two seeds -> t-interval [-9.6, +15.0]: within noise.
    # T=4: gains +2.0 and +2.0 -> [+2.0, +2.0]: beyond it.
    for T, accs in ((1, (0.97, 0.99)), (4, (0.97, 0.971))):
        for seed, acc in enumerate(accs):
            add_job(sweep, [f"T={T}", f"seed={seed}"], acc)
    assert grid_noise(collect_jobs(sweep)) == {(1.0, 0.2)}
    seen = {}
    monkeypatch.setattr("kdrun.reporting.sweep.plot_grid", lambda v, marks, c, t, path, label: seen.update(
        {Path(path).name: marks}) or Path(path))  # fmt: skip
    write_summary(sweep)
    assert set(seen["heatmap_test_acc.png"].noise) == {(1.0, 0.2)}
    assert not seen["heatmap_val_acc.png"].noise  # its colours are validation accuracy, not the test gain

    values = {(1.0, 0.1): 0.96, (4.0, 0.1): 0.97}
    fig = grid_figure(values, Marks(noise={(1.0, 0.1)}), 0.95, "title")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "96.00%\n+1.00 within noise" in texts and "97.00%\n+2.00" in texts
    scatter = {(float(t), 0.37 * t % 1): 0.9 + 0.001 * t for t in range(1, 16)}
    fig = grid_figure(scatter, Marks(noise={(2.0, 0.74)}), 0.9, "title")
    assert "KD gain within noise" in fig.axes[0].get_legend_handles_labels()[1]


def test_teacher_lead_warning_reaches_the_summary(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["seed=0,1"])
    warning = "the teacher is no better than the student alone: KD has nothing to transfer (...)"
    for seed in range(2):
        job = add_job(sweep, [f"seed={seed}"], 0.97)
        lead = {"teacher_lead": 0.001} | ({"teacher_lead_warning": warning} if seed == 0 else {})
        edit_metrics(job, **lead)

    write_summary(sweep)

    rows = read_csv(sweep)
    assert [r["teacher_lead_warning"] for r in rows] == [warning, ""]
    assert [float(r["teacher_lead"]) for r in rows] == [0.001, 0.001]
    md = (sweep / "summary.md").read_text()
    assert "teacher no better than baseline (1 of 2 runs)" in table_rows(md)[0][5]
    assert f"- {warning} (1 job)" in md.split("## Teacher no better than the baseline")[1]


def test_pruned_trials_are_shown_as_pruned_and_kept_out_of_the_numbers(tmp_path):
    params = {"T": "interval(1.0, 10.0)", "alpha": "interval(0.0, 1.0)"}
    sweep = make_sweep(tmp_path / "sweep", ["hparams_search=optuna_T_alpha"], sweeper=OPTUNA, params=params)
    jobs = {}
    for trial, (T, alpha, acc) in enumerate([(2.5, 0.3, 0.96), (7.5, 0.8, 0.40), (4.0, 0.5, 0.97)]):
        overrides = ["hparams_search=optuna_T_alpha", f"T={T}", f"alpha={alpha}", f"search.trial={trial}"]
        jobs[trial] = add_job(sweep, overrides, acc, name=f"trial_{trial},T={T},alpha={alpha}")
    edit_metrics(jobs[1], pruned=True, pruned_epoch=3, student={"epochs": 10, "stopped_epoch": 3})

    written = write_summary(sweep)

    assert [job.status for job in collect_jobs(sweep)] == ["ok", "pruned", "ok"]
    rows = {r["job"]: r for r in read_csv(sweep)}
    pruned = rows["trial_1,T=7.5,alpha=0.8"]
    assert pruned["status"] == "pruned" and pruned["pruned_epoch"] == "3" and pruned["student.stopped_epoch"] == "3"
    assert pruned["gain_n"] == "0" and "search.trial" not in pruned  # the trial's number names its folder instead
    md = (sweep / "summary.md").read_text()
    assert "3 jobs: 2 ok, 1 pruned, 0 failed, 0 incomplete, 0 pending" in md
    table = table_rows(md)
    assert [row[0] for row in table] == ["4.0", "2.5", "7.5"]  # the pruned trial after every finished one
    assert table[2][2:5] == ["0", "–", "–"] and table[2][-1] == "pruned"
    assert table[2][-2] == "**pruned** after epoch 3 (val acc 40.10% by then)"
    section = md.split("## Pruned jobs")[1]
    assert "in `trial_1,T=7.5,alpha=0.8`: pruned after epoch 3 of 10, best val acc by then 40.10%" in section
    assert "search.trial" not in section and "- teacher resnet18 on mnist" in md
    values, _ = grid_values(collect_jobs(sweep), "student.test_acc")
    assert grid_pruned(collect_jobs(sweep), values) == {(7.5, 0.8)}
    for png in written[2:]:
        assert_png(png)


def test_a_pruned_point_is_marked_as_pruned():
    values = {(1.0, 0.1): 0.96, (4.0, 0.1): None, (1.0, 0.5): None, (4.0, 0.5): 0.97}
    fig = grid_figure(values, Marks(failed={(1.0, 0.5)}, pruned={(4.0, 0.1)}), 0.95, "title")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "pruned" in texts and "failed" in texts
    scatter = {(float(t), 0.37 * t % 1): None for t in range(1, 16)} | {(2.0, 0.5): 0.9}
    fig = grid_figure(scatter, Marks(pruned={next(p for p in scatter if p[0] == 3.0)}), 0.9, "title")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "pruned (stopped early)" in labels and "no result" in labels
