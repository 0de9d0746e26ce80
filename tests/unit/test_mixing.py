"""Batch mixing for function matching: mixed images and labels stay paired; the teacher sees the same batch."""

import pytest
import torch

from kdrun.config.validate import validate
from kdrun.core.errors import KdrunError
from kdrun.data.augment import CutMix, MixUp, build_mix, hard_labels
from kdrun.pipeline.run import run
from tests.unit.test_engine import config


def batch():
    torch.manual_seed(0)
    return torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))


def test_mixup_mixes_images_and_labels_with_the_same_weight_and_partner():
    x, y = batch()
    mixed, soft = MixUp(1.0)(x, y, 5, torch.Generator().manual_seed(1))
    assert torch.allclose(soft.sum(1), torch.ones(16))
    # Recover lam and the partner of each sample from the labels, then check the pixels agree.
    for i in range(16):
        weights = soft[i]
        if weights.max() == 1.0:  # mixed with a sample of its own class
            continue
        lam = weights[y[i]].item()
        partner_class = int(torch.nonzero(weights > 1e-6).flatten()[torch.nonzero(weights > 1e-6).flatten() != y[i]])
        candidates = [j for j in range(16) if y[j] == partner_class]
        assert any(torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5) for j in candidates)


def test_mixing_follows_the_generator():
    x, y = batch()
    a = MixUp(0.4)(x, y, 5, torch.Generator().manual_seed(7))
    b = MixUp(0.4)(x, y, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area():
    x, y = batch()
    mixed, soft = CutMix(1.0)(x, y, 5, torch.Generator().manual_seed(3))
    changed = (mixed != x).any(0).any(0)  # pixels changed in any image or channel
    rows, cols = torch.nonzero(changed, as_tuple=True)
    box = int((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    assert 0 < box < 64 and int(changed.sum()) == box  # one rectangle
    kept = 1 - box / 64
    own = torch.tensor([soft[i, y[i]].item() for i in range(16)])
    # Each image keeps its own label for the share it keeps (all of it when its partner has the same class).
    assert all(v == pytest.approx(kept) or v == pytest.approx(1.0) for v in own.tolist())
    assert torch.allclose(soft.sum(1), torch.ones(16))
    assert torch.equal(hard_labels(torch.nn.functional.one_hot(y, 5).float()), y)


def test_none_builds_nothing_and_a_bad_alpha_is_refused():
    assert build_mix({"name": "none"}) is None
    with pytest.raises(KdrunError, match="augment.alpha=0 is invalid: must be a finite number > 0"):
        build_mix({"name": "mixup", "alpha": 0})
    with pytest.raises(KdrunError, match="augment.name='shuffle' is not known; choose one of: none, cutmix, mixup"):
        validate(config("augment.name=shuffle"))
    with pytest.raises(KdrunError, match="augment.alpha=-1 is invalid"):
        validate(config("augment=mixup", "augment.alpha=-1"))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_function_matching_runs_end_to_end_with_the_teacher_online(tmp_path, mix):
    import json

    run(config(f"augment={mix}", "cache=off", "loss.name=kd", "alpha=0.0"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["student"]["teacher_logits"] == "online"
    assert metrics["config"]["augment"] == mix
    assert 0 <= metrics["student"]["test_acc"] <= 1
