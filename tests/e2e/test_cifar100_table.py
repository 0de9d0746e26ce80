"""The CIFAR-100 benchmark table through its real command path, on CIFAR-100-shaped FakeData (32 px, 100 classes):
real ``kdrun -m experiment=cifar100`` multiruns, then ``kdrun-table`` on their sweep dirs.

Every pair x every method would be 13 x 12+ trained jobs, too slow for one test on 2 cores. So: every pair with
one method (KD), every method on one pair (resnet56 -> resnet20, where all apply, FSP's equal widths too), and
the whole grid composed and validated through Hydra without training (its artefact keys: one teacher per teacher
architecture, one baseline per student, whatever the method). The methods with an init phase run it for 1 epoch
(RepDistiller's 30 is the recipe's) in a sweep of their own, ``++loss.init_epochs=1``: the other methods do not take
the key, and ``++`` because Hydra composes a multirun's own config with the default loss first. CRD keeps its 16,384
negatives (cheap at this size).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from kdrun.config.validate import validate
from kdrun.pipeline.cache import cache_key
from kdrun.pipeline.stages import artefact_fields
from kdrun.reporting.table import load_layout
from tests.conftest import read_metrics, run_kdrun

REPO = Path(__file__).resolve().parents[2]
PAIRS = sorted(p.stem for p in (REPO / "conf" / "pair").glob("*.yaml"))
EXCLUDED = ["ce", "soft_ce", "mse", "lskd"]  # the documented sweep's 'loss=glob(*,exclude=[ce,soft_ce,mse,lskd])'
LOSSES = {p.stem: OmegaConf.load(p) for p in sorted((REPO / "conf" / "loss").glob("*.yaml"))}
METHODS = sorted(set(LOSSES) - set(EXCLUDED))
INIT_PHASE = sorted(m for m in METHODS if "init_epochs" in LOSSES[m])  # ab, ft, fsp
ONE_PAIR = "resnet56-resnet20"
# CIFAR-100-shaped and tiny: 32 training images of 100 classes, 8 validation, 10 test; one epoch per stage.
SMOKE = [
    "dataset=fake",
    "dataset.num_classes=100",
    "dataset.train_size=40",
    "dataset.test_size=10",
    "dataset.val_fraction=0.2",
    "dataset.batch_size=16",
    "train.teacher.epochs=1",
    "train.student.epochs=1",
    "train.progress=false",
    "report.enabled=false",
    "device=cpu",
    "amp=off",
    # A teacher of 2 steps keeps BatchNorm's initial statistics, so in eval mode its deep stages' features reach ~1e4
    # (resnet56's last stage); FT's paraphraser and FSP's matrices on them need bounded steps to stay finite.
    "train.student.clip_grad_norm=1.0",
    "hydra.sweep.subdir=${hydra.job.num}",  # the folder names of many overrides would pass the OS's 255 bytes
]


def table_sweep(tmp_path: Path, name: str, *axes: str) -> Path:
    sweep_dir = tmp_path / name
    result = run_kdrun(["-m", "experiment=cifar100", *axes, *SMOKE, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def jobs_of(*sweep_dirs: Path) -> list[Path]:
    return sorted(p.parent.parent for d in sweep_dirs for p in d.glob("*/.hydra/overrides.yaml"))


def md_rows(md: str, section: str) -> dict[str, dict[str, str]]:
    """The markdown table under ``section``: pair -> column label -> cell."""
    lines = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:]]
    return {row[header[0]].replace(" -> ", "-", 1): row for row in rows}


def test_every_pair_and_every_method_reach_the_table_beside_the_published_numbers(tmp_path):
    every_pair = table_sweep(tmp_path, "pairs", "pair=glob(*)", "loss=kd")
    rest = ",".join([*EXCLUDED, "kd", *INIT_PHASE])
    every_method = table_sweep(tmp_path, "methods", f"pair={ONE_PAIR}", f"loss=glob(*,exclude=[{rest}])")
    init_methods = f"loss={','.join(INIT_PHASE)}"
    init_phase = table_sweep(tmp_path, "init", f"pair={ONE_PAIR}", init_methods, "++loss.init_epochs=1")
    result = run_kdrun(
        [str(every_pair), str(every_method), str(init_phase), "--out", "table"], tmp_path, command="kdrun-table"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = jobs_of(every_pair, every_method, init_phase)
    ran = {(pair_of(j), choice(j)) for j in jobs}
    assert {pair for pair, _ in ran} == set(PAIRS)
    assert {method for pair, method in ran if pair == ONE_PAIR} == set(METHODS)
    sources = [(stage, read_metrics(j)[stage]["source"]) for j in jobs for stage in ("teacher", "baseline")]
    assert sources.count(("teacher", "trained")) == 6 and sources.count(("baseline", "trained")) == 9  # once each

    md = (tmp_path / "table" / "cifar100_table.md").read_text()
    assert "Datasets: fake" in md and "**Not the published recipe**" in md
    layout = load_layout()
    rows = {**md_rows(md, f"{layout.tables['same'][0]}: last epoch (`test_acc`)"),
            **md_rows(md, f"{layout.tables['cross'][0]}: last epoch (`test_acc`)")}  # fmt: skip
    assert set(rows) == set(PAIRS)
    assert_cells_show_each_job(rows, jobs, layout)
    assert rows["resnet32x4-resnet8x4"]["DKD"] == "pending / 76.32 [M]"  # not run: no number
    for pair in PAIRS:  # every row has its teacher and its student alone, each beside the published one
        for label in ("Teacher", "Student"):
            ours, published = rows[pair][label].split(" / ")
            assert float(ours.rstrip(" !")) >= 0 and published.endswith(")") and "[R]" in published, (pair, label)

    assert_csv_shows_each_kd_job(tmp_path / "table" / "cifar100_table.csv", jobs, layout)


def pair_of(job: Path) -> str:
    return "-".join(read_metrics(job)["config"][role] for role in ("teacher", "student"))


def assert_cells_show_each_job(rows: dict[str, dict[str, str]], jobs: list[Path], layout) -> None:
    """Each job's cell: its student's last-epoch accuracy, the published one beside it and the difference."""
    labels = {loss: label for label, loss in layout.columns}
    for job in jobs:
        pair, student = pair_of(job), read_metrics(job)["student"]
        ours, label = 100 * student["test_acc"], labels.get(choice(job), choice(job))
        published = layout.published.get((pair, label))
        expected = f"{ours:.2f}" + (" !" if student.get("collapsed") or student.get("diverged") else "")
        if published is not None:
            tag = layout.sources[published.source]["tag"]
            expected += f" / {published.value:.2f} [{tag}] ({ours - published.value:+.2f})"
        else:
            expected += " / –"
        assert rows[pair][label] == expected, (pair, choice(job))


def assert_csv_shows_each_kd_job(path: Path, jobs: list[Path], layout) -> None:
    table = list(csv.DictReader(path.open()))
    assert len(table) == 2 * len(PAIRS)
    for row in table:
        kd_job = next(j for j in jobs if pair_of(j) == row["pair"] and choice(j) == "kd")
        key = "test_acc" if row["metric"] == "last" else "test_acc_best"
        assert float(row["KD"]) == pytest.approx(100 * read_metrics(kd_job)["student"][key], abs=1e-4)
        assert float(row["Teacher"]) == pytest.approx(100 * read_metrics(kd_job)["teacher"][key], abs=1e-4)
        assert float(row["KD published"]) == layout.published[(row["pair"], "KD")].value


def choice(job: Path) -> str:
    """The job's ``loss=`` choice (``crd_kd``, not its method ``crd``), as Hydra recorded it."""
    return str(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices.loss)


def test_the_whole_grid_composes_validates_and_trains_each_teacher_and_baseline_once():
    """Every pair x every method of the documented table sweep composes through Hydra and passes validation (not
    run); the artefact keys, what the cache trains once, depend on the teacher / student alone, never the method."""
    teachers: dict[str, set[str]] = {}
    baselines: dict[str, set[str]] = {}
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        for pair in PAIRS:
            for method in METHODS:
                cfg = compose("config", overrides=["experiment=cifar100", f"pair={pair}", f"loss={method}"])
                validate(cfg)
                teacher, student = pair.split("-")
                teachers.setdefault(teacher, set()).add(cache_key(artefact_fields(cfg, "teacher", "bf16")))
                baselines.setdefault(student, set()).add(cache_key(artefact_fields(cfg, "baseline", "bf16")))
    assert len(METHODS) >= 11 and len(PAIRS) == 13
    assert all(len(keys) == 1 for keys in teachers.values()), teachers
    assert all(len(keys) == 1 for keys in baselines.values()), baselines
    assert len(set.union(*teachers.values())) == len(teachers) == 6
    assert len(set.union(*baselines.values())) == len(baselines) == 9
    assert sorted(teachers) == ["resnet110", "resnet32x4", "resnet50_cifar", "resnet56", "vgg13_cifar", "wrn_40_2"]
