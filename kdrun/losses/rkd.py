"""Relational KD (Park et al. CVPR 2019): match distances and angles among the batch's embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e``, with an exact zero diagonal."""
    squared = e.pow(2).sum(1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp_min(eps)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: smooth-L1 between the batch's pairwise distances, each normalised by its mean non-zero distance."""

    def normalised(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e.flatten(1))
        return d / d[d > 0].mean().clamp_min(1e-12)

    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: smooth-L1 between the cosines of the angles that every triplet of the batch forms."""

    def cosines(e: torch.Tensor) -> torch.Tensor:
        e = e.flatten(1)
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # unit[a, b] = n(e_b - e_a)
        return torch.bmm(unit, unit.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(cosines(student), cosines(teacher))


@LOSSES.register("rkd")
class RelationalKD(FeatureObjective):
    """Relational KD (Park et al. CVPR 2019): match the distances and angles among the batch's embeddings, so the
    student's and teacher's embedding sizes may differ. Default taps: each model's embedding."""

    tap_kind = "embedding"

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        distance_weight: Weight = 25.0,
        angle_weight: Weight = 50.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def weights(self):
        return {"rkd_distance": self.distance_weight, "rkd_angle": self.angle_weight}

    def feature_terms(self, student, teacher):
        pairs = list(zip(student, teacher, strict=True))
        return {
            "rkd_distance": torch.stack([rkd_distance(s, t) for s, t in pairs]).sum(),
            "rkd_angle": torch.stack([rkd_angle(s, t) for s, t in pairs]).sum(),
        }
