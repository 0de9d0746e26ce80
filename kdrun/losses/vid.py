"""Variational information distillation (Ahn et al. CVPR 2019): maximise a variational bound on the mutual
information between paired student and teacher features."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers, common_size


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A feature as an (N, C, H, W) map; any other (a vector (N, C)) is flattened to a 1x1 map."""
    return feature if feature.ndim == 4 else feature.flatten(1)[:, :, None, None]


def _channels(shape: tuple) -> int:
    return shape[1] if len(shape) == 4 else math.prod(shape[1:])


class VariationalRegressor(nn.Module):
    """VID's Gaussian q(t | s): mean = three 1x1 convs with ReLUs (student channels -> teacher channels -> teacher
    channels), one variance per teacher channel, softplus(log_scale) + eps, starting at ``init_variance``.

    As the authors' code (via RepDistiller's ``distiller_zoo/VID.py``, whose hidden width is the teacher's).
    """

    def __init__(self, student_channels: int, teacher_channels: int, init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()

        def conv(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)

        self.mean = nn.Sequential(
            conv(student_channels, teacher_channels),
            nn.ReLU(),
            conv(teacher_channels, teacher_channels),
            nn.ReLU(),
            conv(teacher_channels, teacher_channels),
        )
        start = init_variance - eps
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), start + math.log(-math.expm1(-start))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The mean over batch, channels and positions of -log q(t | s) (without the constant log sqrt(2 pi))."""
        student, teacher = common_size(as_map(student), as_map(teacher))
        variance = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((self.mean(student) - teacher).pow(2) / variance + variance.log())).mean()


@LOSSES.register("vid")
class VariationalInformationDistillation(FeatureObjective):
    """Variational information distillation (Ahn et al. CVPR 2019): for each paired layer a learned Gaussian
    q(t | s) (``VariationalRegressor``, trained with the student and not part of it) predicts the teacher's
    feature from the student's; the term is its negative log-likelihood, summed over the pairs. It may be
    negative (once the variances fall below 1). Default taps: every stage (the deepest ones pair up); a vector
    layer is taken as a 1x1 map."""

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        vid_weight: Weight = 1.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.vid_weight = float(vid_weight)
        self.regressors = nn.ModuleList()

    def weights(self):
        return {"vid": self.vid_weight}

    def build(self, student_shapes, teacher_shapes):
        self.regressors = nn.ModuleList(
            VariationalRegressor(_channels(s), _channels(t))
            for s, t in zip(student_shapes, teacher_shapes, strict=True)
        )

    def feature_terms(self, student, teacher):
        losses = [q(s, t) for q, s, t in zip(self.regressors, student, teacher, strict=True)]
        return {"vid": torch.stack(losses).sum()}
