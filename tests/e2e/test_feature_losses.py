"""Every model family's default feature taps with every feature loss, as student and as teacher (slow: builds and
traces each torchvision family several times)."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrun.core.errors import KdrunError
from kdrun.losses import build_objective
from kdrun.models.features import default_taps, feature_shapes
from tests.conftest import QUICK, REPO, read_metrics, run_kdrun
from tests.unit.test_feature_losses import FAMILIES, SHAPES, example, model, step


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_default_taps_work_as_student_and_as_teacher(family, shape):
    spec = SHAPES[shape]
    x, y = example(spec), torch.randint(0, 10, (4,))
    net = model(family, spec)
    taps = default_taps(net, x)
    shapes = feature_shapes(net, x, [*taps.stages, taps.embedding])
    assert all(len(shapes[s]) == 4 for s in taps.stages) and len(shapes[taps.embedding]) == 2
    for student, teacher in ((net, model("resnet8", spec)), (model("small_cnn", spec), net)):
        for loss in ("fitnet", "at", "rkd", "sp", "pkt", "nst", "vid", "cc"):
            objective = build_objective({"name": loss}, 4.0, 0.2)
            if loss in ("at", "nst") and family == "mlp":
                with pytest.raises(KdrunError, match=f"loss={loss} needs spatial feature maps.*'net.6' gives shape"):
                    step(student, teacher, objective, x, y)  # refused when the teacher source binds the layers
                continue
            total, terms = step(student, teacher, objective, x, y)  # binds the default taps, then one step
            assert torch.isfinite(total) and set(objective.weights()) <= set(terms)


@pytest.mark.parametrize("loss, term", [("fitnet", "hint"), ("at", "at")])
def test_an_untraceable_model_distils_through_forward_hooks(tmp_path, loss, term):
    """A user's model that torch.fx cannot trace (tests.unit.test_feature_hooks.Branchy) as student and teacher of
    a feature method, in a real kdrun run: both are tapped with forward hooks, the feature term is logged."""
    (tmp_path / "mine" / "student").mkdir(parents=True)
    (tmp_path / "mine" / "teacher").mkdir()
    target = "_target_: tests.unit.test_feature_hooks.Branchy\n"
    (tmp_path / "mine" / "student" / "branchy.yaml").write_text(target + "width: 8\n")
    (tmp_path / "mine" / "teacher" / "branchy16.yaml").write_text(target + "width: 16\n")
    run_dir = tmp_path / "run"
    args = ["--config-dir", str(tmp_path / "mine"), f"hydra.run.dir={run_dir}", *QUICK, "train.teacher.epochs=3"]
    args += ["train.student.epochs=5"]
    args += ["student=branchy", "teacher=branchy16", f"loss={loss}", "cache=off", "report.enabled=false"]
    result = run_kdrun(args, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "kdrun.log").read_text()
    assert log.count("Branchy cannot be traced by torch.fx") == 2  # the student's tap and the teacher's
    expected = {"fitnet": "refine->refine", "at": "refine->refine, down->down"}[loss]
    assert f"on student->teacher layers {expected}" in log
    metrics = read_metrics(run_dir)
    assert metrics["config"]["student"] == "tests.unit.test_feature_hooks.Branchy"
    assert metrics["teacher"]["val_acc_best"] > 0.3  # the untraceable teacher learned (chance: 0.1)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    values = [e.value for e in events.Scalars(f"student/train/{term}")]
    assert len(values) == 5 and all(math.isfinite(v) and v > 0 for v in values)
    assert values[-1] < 0.75 * values[0]  # the student learns the teacher's features through the hooks
