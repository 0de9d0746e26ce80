"""A stage that collapses or diverges is flagged (metrics.json, one warning line), never a silent number."""

import json

from tests.conftest import read_metrics, run_kdrun


def test_an_absurd_learning_rate_is_flagged_and_a_healthy_run_is_not(tmp_path):
    common = ["train.progress=false", "report.enabled=false", f"cache.dir={tmp_path / 'cache'}"]
    absurd = ["teacher=mlp", "train.student.lr=10", "train.student.epochs=3", "sched.warmup_epochs=0"]
    # skipping never stops the stage: the run goes to its end and must say what became of it
    no_stop = "train.max_nonfinite_steps=100000"
    bad = run_kdrun([*common, *absurd, no_stop, f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode == 0, bad.stderr[-2000:]
    metrics = read_metrics(tmp_path / "bad")
    for stage in ("baseline", "student"):
        entry = metrics[stage]
        assert entry.get("collapsed") or entry.get("diverged"), (stage, entry)
        assert entry["flag_reason"]
    assert "collapsed" not in metrics["teacher"] and "diverged" not in metrics["teacher"]
    log = (tmp_path / "bad" / "kdrun.log").read_text()
    flagged = [line for line in log.splitlines() if "Its numbers are not a result" in line]
    assert len(flagged) == 2 and "train.student.lr" in flagged[0], flagged
    good = run_kdrun([*common, f"hydra.run.dir={tmp_path / 'good'}"], tmp_path)  # the default recipe
    assert good.returncode == 0, good.stderr[-2000:]
    healthy = read_metrics(tmp_path / "good")
    for stage in ("teacher", "baseline", "student"):
        assert not ({"collapsed", "diverged", "flag_reason"} & set(healthy[stage])), json.dumps(healthy[stage])
