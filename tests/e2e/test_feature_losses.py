"""Every model family's default feature taps with every feature loss, as student and as teacher (slow: builds and
traces each torchvision family several times)."""

import pytest
import torch

from kdrun.core.errors import KdrunError
from kdrun.losses import build_objective
from kdrun.models.features import default_taps, feature_shapes
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
