"""Neuron selectivity transfer (Huang & Wang, 2017): match the distributions of the channels' spatial patterns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers, common_size


def neuron_selectivity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD between the student's and the teacher's channels, each channel an L2-normalised map of H*W
    positions, with the polynomial kernel k(a, b) = (a . b)^2 (d = 2, c = 0):

        MMD^2 = mean_ij k(s_i, s_j) + mean_ij k(t_i, t_j) - 2 mean_ij k(s_i, t_j)

    averaged over the batch; the larger map is average-pooled to the smaller's size, so the channel counts may
    differ (checked against RepDistiller's ``distiller_zoo/NST.py``, which computes the full loss).
    """
    student, teacher = common_size(student, teacher)
    s = F.normalize(student.flatten(2), dim=2)  # (N, C_s, HW)
    t = F.normalize(teacher.flatten(2), dim=2)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return kernel(s, s) + kernel(t, t) - 2 * kernel(s, t)


@LOSSES.register("nst")
class NeuronSelectivityTransfer(FeatureObjective):
    """Neuron selectivity transfer (Huang & Wang, arXiv 2017): the student's channels take the teacher's spatial
    activation patterns, matched as distributions (MMD, polynomial kernel), summed over paired stage outputs.
    Default taps: every stage (the deepest ones pair up)."""

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        nst_weight: Weight = 50.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.nst_weight = float(nst_weight)

    def weights(self):
        return {"nst": self.nst_weight}

    def build(self, student_shapes, teacher_shapes):
        self.require_maps("nst", student_shapes, teacher_shapes)

    def feature_terms(self, student, teacher):
        losses = [neuron_selectivity(s, t) for s, t in zip(student, teacher, strict=True)]
        return {"nst": torch.stack(losses).sum()}
