"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match spatial attention maps of paired stages."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from kdrun.core.schema import Range, Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers, common_size


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |f|^p, flattened and L2-normalised."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps; the larger map is average-pooled to the smaller's size."""
    student, teacher = common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@LOSSES.register("at")
class AttentionTransfer(FeatureObjective):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match the spatial attention maps of paired stage
    outputs, summed over the pairs. Default taps: every stage (the deepest ones pair up)."""

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        at_weight: Weight = 1000.0,
        p: Annotated[float, Range(ge=1, le=8)] = 2.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.at_weight, self.p = float(at_weight), float(p)

    def weights(self):
        return {"at": self.at_weight}

    def build(self, student_shapes, teacher_shapes):
        self.require_maps("at", student_shapes, teacher_shapes)

    def feature_terms(self, student, teacher):
        losses = [attention_transfer(s, t, self.p) for s, t in zip(student, teacher, strict=True)]
        return {"at": torch.stack(losses).sum()}
