"""kdrun-table: the CIFAR-100 benchmark table of synthetic sweep dirs laid out as Hydra and kdrun write them, and the
published numbers it prints beside ours (checked against the READMEs they are transcribed from)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.losses import LOSSES
from kdrun.reporting.table import LAYOUT, load_layout, main, write_table

REPO = Path(__file__).resolve().parents[2]
PAIRS = sorted(p.stem for p in (REPO / "conf" / "pair").glob("*.yaml"))


def add_job(sweep: Path, name: str, pair: str, loss: str, **outcome) -> Path:
    """A job dir as Hydra writes it (overrides, config, choices) with kdrun's metrics.json or failure.json.

    ``outcome``: ``student``/``baseline``/``teacher`` = (test_acc, test_acc_best) fractions for a finished job, with
    ``keys`` = (teacher cache key, baseline cache key); ``error`` for a failed job; nothing for a running one.
    """
    teacher, student = pair.split("-")
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    overrides = ["experiment=cifar100", f"pair={pair}", f"loss={loss}"]
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    config = {"teacher": {"name": teacher}, "student": {"name": student}, "loss": {"name": loss.split("_")[0]}}
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    choices = {"pair": pair, "loss": loss, "teacher": teacher, "student": student, "experiment": "cifar100"}
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), job / ".hydra" / "hydra.yaml")
    if "error" in outcome:
        (job / "failure.json").write_text(json.dumps({"error": outcome["error"]}))
    elif "student" in outcome:
        t_key, b_key = outcome.get("keys", ("t", "b"))
        metrics = {
            "config": {"dataset": "cifar100", "teacher": teacher, "student": student, "student_epochs": 240},
            "teacher": stage(*outcome.get("teacher", (0.75, 0.76)), cache_key=t_key),
            "baseline": stage(*outcome.get("baseline", (0.70, 0.71)), cache_key=b_key),
            "student": stage(*outcome["student"], **outcome.get("flags", {})),
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def stage(last: float, best: float, **extra) -> dict:
    return {"source": "trained", "test_acc": last, "test_acc_best": best, "val_acc_best": best, **extra}


def md_row(md: str, section: str, pair: str) -> dict[str, str]:
    """The cells of ``pair``'s row in the markdown table under the heading ``section``, by column label."""
    lines = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    row = next(r for r in rows if r[0] == pair.replace("-", " -> ", 1))
    return dict(zip(header, row, strict=True))


SAME_LAST = "Teacher and student of the same architectural type: last epoch (`test_acc`)"
SAME_BEST = "Teacher and student of the same architectural type: best validation epoch (`test_acc_best`)"
CROSS_LAST = "Teacher and student of different architectural types: last epoch (`test_acc`)"


def test_the_table_shows_ours_beside_the_published_numbers_and_the_difference(tmp_path):
    sweep = tmp_path / "sweep"
    add_job(sweep, "0", "resnet56-resnet20", "kd", student=(0.7012, 0.7050), teacher=(0.7200, 0.7210))
    add_job(sweep, "1", "resnet56-resnet20", "dkd", student=(0.7180, 0.7201))
    add_job(sweep, "2", "resnet56-resnet20", "crd_kd", student=(0.7100, 0.7110))

    md_path, csv_path = write_table(sweep)

    md = md_path.read_text()
    last = md_row(md, SAME_LAST, "resnet56-resnet20")
    assert last["KD"] == "70.12 / 70.66 [R] (-0.54)"  # RepDistiller's README: resnet56 -> resnet20, KD
    assert last["DKD"] == "71.80 / 71.97 [M] (-0.17)"  # mdistiller's README: DKD
    assert last["Teacher"] == "72.00 / 72.34 [R] (-0.34)"
    assert last["Student"] == "70.00 / 69.06 [R] (+0.94)"
    assert last["CRD+KD"] == "71.00 / –"  # no published number: none invented
    assert last["CRD"] == "pending / 71.16 [R]" and last["FSP"] == "pending / 69.95 [R]"
    best = md_row(md, SAME_BEST, "resnet56-resnet20")
    assert best["KD"] == "70.50 / 70.66 [R] (-0.16)" and best["DKD"] == "72.01 / 71.97 [M] (+0.04)"
    other = md_row(md, SAME_LAST, "wrn_40_2-wrn_40_1")
    assert other["FSP"] == "pending / –"  # the README's 0.00 (FSP does not apply) is no accuracy
    assert md_row(md, CROSS_LAST, "resnet32x4-shufflenet_v2_cifar")["DKD"] == "pending / 77.07 [M]"
    assert "HobbitLong/RepDistiller README.md" in md and "megvii-research/mdistiller README.md" in md
    assert "reports the last epoch" in md and "reports the best epoch" in md

    rows = list(csv.DictReader(csv_path.open()))
    row = next(r for r in rows if r["pair"] == "resnet56-resnet20" and r["metric"] == "last")
    assert (row["table"], row["teacher"], row["student"]) == ("same", "resnet56", "resnet20")
    assert float(row["KD"]) == pytest.approx(70.12) and float(row["KD published"]) == 70.66
    assert float(row["KD diff"]) == pytest.approx(-0.54) and row["KD source"] == "repdistiller" and row["KD n"] == "1"
    assert row["CRD"] == "pending" and row["CRD diff"] == "" and float(row["CRD published"]) == 71.16
    assert {r["pair"] for r in rows} == set(PAIRS) and len(rows) == 2 * len(PAIRS)  # every pair, last and best


def test_missing_failed_and_running_jobs_are_never_numbers(tmp_path):
    sweep = tmp_path / "sweep"
    add_job(sweep, "0", "resnet32x4-resnet8x4", "kd", error="CUDA out of memory")
    add_job(sweep, "1", "resnet32x4-resnet8x4", "dkd")  # running: no metrics.json yet
    add_job(sweep, "2", "wrn_40_2-wrn_40_1", "fsp", error="fsp needs equal channel widths")

    md = write_table(sweep)[0].read_text()

    row = md_row(md, SAME_LAST, "resnet32x4-resnet8x4")
    assert row["KD"] == "failed / 73.33 [R]" and row["DKD"] == "pending / 76.32 [M]"
    assert row["Teacher"] == "pending / 79.42 [R]" and row["Student"] == "pending / 72.50 [R]"
    assert md_row(md, SAME_LAST, "wrn_40_2-wrn_40_1")["FSP"] == "failed / –"
    assert "3 jobs: 0 ok, 2 failed, 1 incomplete" in md
    for line in md.splitlines():
        if line.startswith("| resnet32x4 -> resnet8x4"):
            assert "(" not in line, "a difference for a cell without a finished run"


def test_seeds_pool_and_a_shared_teacher_counts_once(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, acc in enumerate((0.70, 0.72, 0.74)):
        keys = (f"t{seed}", f"b{seed}")
        add_job(sweep, f"kd{seed}", "resnet56-resnet20", "kd", student=(acc, acc), keys=keys, teacher=(0.72, 0.72))
        teacher = (0.72, 0.72)  # the same cached teacher again (same key) in another method's job
        add_job(sweep, f"at{seed}", "resnet56-resnet20", "at", student=(acc, acc), keys=keys, teacher=teacher)
    add_job(sweep, "flagged", "resnet110-resnet32", "at", student=(0.01, 0.01), flags={"collapsed": True})

    md = write_table(sweep)[0].read_text()

    row = md_row(md, SAME_LAST, "resnet56-resnet20")
    assert row["KD"] == "72.00±2.00 (n=3) / 70.66 [R] (+1.34)"
    assert row["Teacher"] == "72.00±0.00 (n=3) / 72.34 [R] (-0.34)"  # 3 teachers (one per seed), not 6
    assert md_row(md, SAME_LAST, "resnet110-resnet32")["AT"] == "1.00 ! / 72.31 [R] (-71.31)"


def test_a_method_or_pair_outside_the_layout_gets_its_own_column_or_table(tmp_path):
    sweep = tmp_path / "sweep"
    add_job(sweep, "0", "resnet56-resnet20", "lskd", student=(0.71, 0.71))
    add_job(sweep, "1", "resnet8-resnet8", "kd", student=(0.30, 0.31))

    md = write_table(sweep)[0].read_text()

    assert md_row(md, SAME_LAST, "resnet56-resnet20")["lskd"] == "71.00 / –"
    assert md_row(md, "Other pairs: last epoch (`test_acc`)", "resnet8-resnet8")["KD"] == "30.00 / –"


def test_a_sweep_split_over_several_dirs_is_one_table(tmp_path):
    add_job(tmp_path / "a", "0", "resnet56-resnet20", "kd", student=(0.70, 0.70))
    add_job(tmp_path / "b", "0", "resnet56-resnet20", "fsp", student=(0.69, 0.69))

    md_path, _ = write_table([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path / "out")

    row = md_row(md_path.read_text(), SAME_LAST, "resnet56-resnet20")
    assert row["KD"].startswith("70.00 / ") and row["FSP"].startswith("69.00 / ")
    assert md_path.parent == tmp_path / "out"


def test_the_recipe_warning_when_the_runs_are_not_cifar100_for_240_epochs(tmp_path):
    job = add_job(tmp_path / "sweep", "0", "resnet56-resnet20", "kd", student=(0.70, 0.70))
    metrics = json.loads((job / "metrics.json").read_text())
    metrics["config"].update(dataset="fake", student_epochs=1)
    (job / "metrics.json").write_text(json.dumps(metrics))
    md = write_table(tmp_path / "sweep")[0].read_text()
    assert "Datasets: fake; student epochs: 1." in md and "**Not the published recipe**" in md

    add_job(tmp_path / "real", "0", "resnet56-resnet20", "kd", student=(0.70, 0.70))
    assert "Not the published recipe" not in write_table(tmp_path / "real")[0].read_text()


def test_cli_prints_the_table_and_refuses_a_bad_path(tmp_path, capsys):
    add_job(tmp_path / "sweep", "0", "resnet56-resnet20", "kd", student=(0.70, 0.70))
    main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "| resnet56 -> resnet20 |" in out and str(tmp_path / "sweep" / "cifar100_table.csv") in out

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


# Spot checks against the READMEs (HobbitLong/RepDistiller and megvii-research/mdistiller, the commits the layout
# names): one number per table and row kind, read off the README by hand.
README_CELLS = [
    ("wrn_40_2-wrn_16_2", "Teacher", 75.61, "repdistiller"),
    ("vgg13_cifar-vgg8_cifar", "Student", 70.36, "repdistiller"),
    ("resnet110-resnet20", "FitNet", 68.99, "repdistiller"),
    ("resnet32x4-resnet8x4", "CRD", 75.51, "repdistiller"),
    ("wrn_40_2-wrn_16_2", "FSP", 72.91, "repdistiller"),
    ("resnet50_cifar-mobilenet_v2_half", "Teacher", 79.34, "repdistiller"),
    ("vgg13_cifar-mobilenet_v2_half", "AT", 59.40, "repdistiller"),
    ("wrn_40_2-shufflenet_v1", "CRD", 76.05, "repdistiller"),
    ("resnet32x4-shufflenet_v2_cifar", "NST", 74.68, "repdistiller"),
    ("resnet110-resnet32", "KD", 73.08, "repdistiller"),  # in both READMEs: RepDistiller's is shown
    ("wrn_40_2-wrn_40_1", "DKD", 74.81, "mdistiller"),
    ("resnet50_cifar-mobilenet_v2_half", "DKD", 70.35, "mdistiller"),
]


@pytest.mark.parametrize(("pair", "label", "value", "source"), README_CELLS)
def test_published_numbers_match_the_readmes(pair, label, value, source):
    published = load_layout().published[(pair, label)]
    assert (published.value, published.source) == (value, source)


def test_the_layout_is_consistent_with_the_configs():
    layout = load_layout()
    pairs = [pair for _, table_pairs in layout.tables.values() for pair in table_pairs]
    assert sorted(pairs) == PAIRS, "every conf/pair option is a row of the table, and every row is a pair option"
    for pair in PAIRS:
        node = OmegaConf.load(REPO / "conf" / "pair" / f"{pair}.yaml")
        assert [next(iter(d)) for d in node.defaults] == ["override /teacher", "override /student"]
        assert "-".join(d[next(iter(d))] for d in node.defaults) == pair
    raw = OmegaConf.to_container(OmegaConf.load(LAYOUT))
    for source in raw["sources"].values():
        assert source["repo"] and source["file"] == "README.md" and source["commits"] and source["reports"]
        for table in source["tables"].values():
            assert len(table["headers"]) == len(table["pairs"]) and set(table["pairs"]) <= set(PAIRS)
            assert all(len(values) == len(table["pairs"]) for values in table["rows"].values())
    labels = {label for label, _ in layout.columns} | {"Teacher", "Student"}
    assert {label for _, label in layout.published} <= labels, "a published row that no column shows"
    options = {p.stem: OmegaConf.load(p).name for p in (REPO / "conf" / "loss").glob("*.yaml")}
    for _, loss in layout.columns:  # a column's loss option, where it exists here, runs a registered method
        assert loss not in options or options[loss] in LOSSES
