"""ReviewKD (Chen et al. CVPR 2021, "Distilling Knowledge via Knowledge Review"): the student's stage features,
fused from the deepest to the shallowest by attention-based fusion (ABF) modules, regress the teacher's stage
features under the hierarchical context loss (HCL).

Checked against mdistiller (megvii-research/mdistiller: mdistiller/distillers/ReviewKD.py, engine/cfg.py and
configs/cifar100/reviewkd.yaml).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.errors import KdrunError
from kdrun.core.schema import Range, Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers
from kdrun.losses.taps import stage_preactivations
from kdrun.models.features import default_taps

Size2 = tuple[int, int]


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A feature as a map: a vector [B, C] becomes [B, C, 1, 1] (the pooled embedding, ReviewKD's deepest level)."""
    return feature.view(*feature.shape, 1, 1) if feature.ndim == 2 else feature


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The hierarchical context loss, summed over the levels: at each, the MSE of the maps and of their average
    pools to 4x4, 2x2 and 1x1 (those smaller than the map), weighted 1, 1/2, 1/4, 1/8 and divided by the weights'
    sum (mdistiller's ``hcl_loss``)."""
    total = torch.zeros((), device=student[0].device)
    for fs, ft in zip(student, teacher, strict=True):
        h = fs.shape[2]
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion: the level's student feature (1x1 conv + BN to ``mid`` channels) mixed with the
    residual from the deeper level (upsampled, nearest) by two per-pixel sigmoid weights, resized to the teacher's
    map, then 3x3 conv + BN to the teacher's channels. Returns (output, residual for the next shallower level)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        reduce, expand = nn.Conv2d(in_channels, mid, 1, bias=False), nn.Conv2d(mid, out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_uniform_(reduce.weight, a=1)
        nn.init.kaiming_uniform_(expand.weight, a=1)
        self.conv1 = nn.Sequential(reduce, nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(expand, nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: Size2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], 1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


@LOSSES.register("reviewkd")
class ReviewKD(FeatureObjective):
    """ReviewKD (Chen et al. CVPR 2021): the student's stage outputs and embedding, fused deepest first by ABF
    modules (trained with the student), regress the teacher's stage pre-activations and embedding under HCL:

        L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(...) + min(epoch / warmup_epochs, 1) * reviewkd_weight * HCL

    Default taps: every stage output plus the embedding (as a 1x1 map); for the teacher, each stage's input to its
    final ReLU (``teacher_preact``), as mdistiller does. mdistiller's CIFAR-100 defaults are in conf/loss/reviewkd.yaml.
    """

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        reviewkd_weight: Weight = 5.0,
        warmup_epochs: Annotated[int, Range(ge=0, le=100_000)] = 20,
        teacher_preact: bool = True,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.reviewkd_weight, self.warmup_epochs = float(reviewkd_weight), int(warmup_epochs)
        self.teacher_preact = bool(teacher_preact)
        self.warmup = 1.0
        self.abfs = nn.ModuleList()
        self.out_sizes: list[Size2] = []

    def default_layers(self, model, example, role):
        taps = default_taps(model, example)
        preact = role == "teacher" and self.teacher_preact
        stages = stage_preactivations(model, example, role, taps) if preact else taps.stages
        return [*stages, taps.embedding]

    def set_epoch(self, epoch: int) -> None:
        self.warmup = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def weights(self):
        return {"hcl": self.reviewkd_weight * self.warmup}

    def describe(self) -> str:
        return f"{super().describe()}, the HCL weight warmed up over {self.warmup_epochs} epochs"

    def build(self, student_shapes, teacher_shapes):
        for role, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            for shape in shapes:
                if len(shape) not in (2, 4):
                    raise KdrunError(
                        f"loss=reviewkd takes feature maps or vectors, but a {role} layer gives shape {list(shape)}; "
                        f"name other layers in loss.{role}_layers"
                    )
        if len(self.abfs):  # a second bind (after an init phase) keeps the trained fusion modules
            return
        s_channels, t_channels = [s[1] for s in student_shapes], [t[1] for t in teacher_shapes]
        mid = min(512, s_channels[-1])
        last = len(s_channels) - 1
        self.abfs = nn.ModuleList(
            ABF(s, mid, t, i < last) for i, (s, t) in enumerate(zip(s_channels, t_channels, strict=True))
        )
        self.out_sizes = [(t[2], t[3]) if len(t) == 4 else (1, 1) for t in teacher_shapes]

    def fused(self, student: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, one per level (shallowest first), computed from the deepest level up."""
        out: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(student))):
            y, residual = self.abfs[i](as_map(student[i]), residual, self.out_sizes[i])
            out.insert(0, y)
        return out

    def feature_terms(self, student, teacher):
        return {"hcl": hcl_loss(self.fused(student), [as_map(t) for t in teacher])}
