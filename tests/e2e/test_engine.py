"""Every KD method and mixing through the whole pipeline, in-process, on digits and on real MNIST (slow: 28 runs)."""

import pytest

from kdrun.data import DataSpec
from kdrun.models import build_model
from kdrun.models.checkpoint import read_checkpoint
from kdrun.pipeline.run import run
from tests.unit.test_engine import config

METHODS = {  # option -> (overrides, the student's logged loss terms)
    "dkd": (["loss=dkd"], {"ce", "tckd", "nckd"}),
    "lskd": (["loss=lskd"], {"ce", "kd"}),
    "mixup": (["augment=mixup"], {"ce", "kd"}),
    "cutmix": (["augment=cutmix"], {"ce", "kd"}),
    "fitnet": (["loss=fitnet"], {"ce", "kd", "hint"}),
    "at": (["loss=at"], {"ce", "kd", "at"}),
    "rkd": (["loss=rkd"], {"ce", "kd", "rkd_distance", "rkd_angle"}),
    "sp": (["loss=sp"], {"ce", "kd", "sp"}),
    "pkt": (["loss=pkt"], {"ce", "kd", "pkt"}),
    "nst": (["loss=nst"], {"ce", "kd", "nst"}),
    "vid": (["loss=vid"], {"ce", "kd", "vid"}),
    "cc": (["loss=cc"], {"ce", "kd", "cc"}),
    "cc_gaussian": (["loss=cc", "loss.kernel=gaussian"], {"ce", "kd", "cc"}),
    "dist": (["loss=dist", "alpha=1.0"], {"ce", "kd", "dist_inter", "dist_intra"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_methods_run_end_to_end(tmp_path, method, dataset, request):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides, terms = METHODS[method]
    extra = ["cache=off", *overrides]
    if dataset == "mnist":
        root = request.getfixturevalue("mnist_root")
        extra += ["dataset=mnist", f"dataset.root={root}", "train.teacher.max_samples=600"]
        extra += ["train.student.max_samples=300", "train.eval_batch_size=2048", "report.enabled=false"]
    objective = run(config(*extra), tmp_path)
    assert 0 <= objective <= 1
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert {f"student/train/{t}" for t in terms} <= set(events.Tags()["scalars"])
    # Only the student's own weights are saved: a FitNet adapter is needed for training, not for using the student.
    saved = read_checkpoint(tmp_path / "student.safetensors")
    spec = DataSpec(saved["num_classes"], saved["in_channels"], saved["image_size"])
    assert set(saved["state_dict"]) == set(build_model(config(*extra).student, spec).state_dict())
