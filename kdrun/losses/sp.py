"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match the batch's pairwise activation similarities."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Tung & Mori's loss ||G_t - G_s||_F^2 / b^2, where G = row-L2-normalised F F^T of the b flattened features.

    Only the batch sizes must agree (checked against RepDistiller's ``distiller_zoo/SP.py``).
    """
    b = student.shape[0]

    def similarities(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        return F.normalize(f @ f.t(), dim=1)

    return (similarities(teacher) - similarities(student)).pow(2).sum() / (b * b)


@LOSSES.register("sp")
class SimilarityPreserving(FeatureObjective):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): the student's batch similarity matrix of a layer's
    activations matches the teacher's, so the two layers' shapes may differ. Default taps: the last stage of each
    model (RepDistiller's ``feat[-2]``); named layers are paired one to one and summed."""

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        sp_weight: Weight = 3000.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.sp_weight = float(sp_weight)

    def weights(self):
        return {"sp": self.sp_weight}

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        super().bind(student, teacher, example)
        if self.requested == (None, None):  # defaults: only the deepest stage pair, as the paper and RepDistiller
            self.student_layers, self.teacher_layers = self.student_layers[-1:], self.teacher_layers[-1:]

    def feature_terms(self, student, teacher):
        losses = [similarity_preserving(s, t) for s, t in zip(student, teacher, strict=True)]
        return {"sp": torch.stack(losses).sum()}
