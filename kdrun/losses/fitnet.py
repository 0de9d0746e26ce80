"""FitNets (Romero et al. ICLR 2015): regress the teacher's hint layer through a learned adapter."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers


class HintAdapter(nn.Module):
    """Maps a student feature to its teacher feature's shape (FitNet's regressor).

    Maps: 1x1 conv + BatchNorm to the teacher's channels, then average-pooled (or bilinearly upsampled) to its
    size. Vectors: a linear layer. A map against a vector is average-pooled to a vector first.
    """

    def __init__(self, student_shape: tuple, teacher_shape: tuple):
        super().__init__()
        s_channels, t_channels = student_shape[1], teacher_shape[1]
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        self.proj: nn.Module
        if len(student_shape) == 4 and self.size is not None:
            self.proj = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))
        else:
            self.proj = nn.Linear(s_channels, t_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Linear):
            return self.proj(x.mean((2, 3)) if x.ndim == 4 else x.flatten(1))
        x = self.proj(x)
        assert self.size is not None
        if tuple(x.shape[2:]) == self.size:
            return x
        if x.shape[2] >= self.size[0] and x.shape[3] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def hint_loss(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the adapted student feature against the teacher's (pooled to a vector if needed)."""
    if teacher.ndim == 4 and adapted.ndim == 2:
        teacher = teacher.mean((2, 3))
    return F.mse_loss(adapted, teacher)


@LOSSES.register("fitnet")
class FitNet(FeatureObjective):
    """FitNets (Romero et al. 2015): regress the teacher's hint layer from the student's guided layer through a
    learned adapter (``HintAdapter``), trained with the student and not part of it. Default taps: the middle
    stage of each model."""

    tap_kind = "middle"

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        hint_weight: Weight = 100.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.hint_weight = float(hint_weight)
        self.adapters = nn.ModuleList()

    def weights(self):
        return {"hint": self.hint_weight}

    def build(self, student_shapes, teacher_shapes):
        self.adapters = nn.ModuleList(HintAdapter(s, t) for s, t in zip(student_shapes, teacher_shapes, strict=True))

    def feature_terms(self, student, teacher):
        losses = [hint_loss(a(s), t) for a, s, t in zip(self.adapters, student, teacher, strict=True)]
        return {"hint": torch.stack(losses).sum()}
