"""Multi-teacher KD: the ensemble averages its members' softened outputs."""

import torch
import torch.nn.functional as F

from kdrun.data import DataSpec
from kdrun.models import build_model


def test_the_ensembles_softmax_at_T_is_the_members_average():
    torch.manual_seed(0)
    spec = DataSpec(5, 1, 8)
    ensemble = build_model({"name": "ensemble", "members": [{"name": "mlp"}, {"name": "lenet5"}], "temperature": 3.0},
                           spec, key="teacher").eval()  # fmt: skip
    x = torch.randn(4, 1, 8, 8)
    average = sum(F.softmax(m(x) / 3.0, 1) for m in ensemble.members) / 2
    torch.testing.assert_close(F.softmax(ensemble(x) / 3.0, 1), average)
