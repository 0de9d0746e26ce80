"""FSP matrices (Yim et al. CVPR 2017, "A Gift from Knowledge Distillation"): the student matches the teacher's flow
between consecutive stages (the Gram matrices of their features), in an init phase before training.

Checked against RepDistiller (HobbitLong/RepDistiller: distiller_zoo/FSP.py, helper/pretrain.py, helper/loops.py,
train_student.py: ``--init_epochs 30``, the stem's output and every stage's, the FSP term only in the init phase).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.core.errors import KdrunError
from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES, InitEpochs, InitLr, LossInput, Terms
from kdrun.losses.feature import FeatureObjective, Layers
from kdrun.losses.taps import stem_output
from kdrun.models.features import default_taps


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[B, C_top, C_bottom]: the mean over positions of ``top_j * bottom_i``; the larger map is average-pooled to
    the smaller's size first (RepDistiller's ``compute_fsp``)."""
    if bottom.shape[2] > top.shape[2]:
        bottom = F.adaptive_avg_pool2d(bottom, (top.shape[2], top.shape[3]))
    elif bottom.shape[2] < top.shape[2]:
        top = F.adaptive_avg_pool2d(top, (bottom.shape[2], bottom.shape[3]))
    return torch.einsum("bihw,bjhw->bji", bottom, top) / (bottom.shape[2] * bottom.shape[3])


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The mean squared difference of the student's and teacher's FSP matrices between consecutive layers, summed
    over the consecutive pairs."""
    losses = [
        (fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
        for s0, s1, t0, t1 in zip(student, student[1:], teacher, teacher[1:], strict=False)
    ]
    return torch.stack(losses).sum()


@LOSSES.register("fsp")
class FSP(FeatureObjective):
    """FSP (Yim et al. CVPR 2017). Init phase (``init_epochs``): the student's FSP matrices between consecutive
    layers (default: the stem's output, then every stage's) regress the teacher's; the paired layers need the same
    channels in both models:

        init:         L = sum_i MSE(G_s(i, i+1), G_t(i, i+1))
        distillation: L = alpha * CE + (1 - alpha) * T^2 * KL + fsp_weight * FSP

    with ``fsp_weight`` 0 by default: as in RepDistiller, training is then plain CE (alpha=1) or KD.
    """

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        fsp_weight: Weight = 0.0,
        init_epochs: InitEpochs = 30,
        init_lr: InitLr = None,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.fsp_weight = float(fsp_weight)
        self.init_epochs, self.init_lr = int(init_epochs), None if init_lr is None else float(init_lr)

    def default_layers(self, model, example, role):
        stages = default_taps(model, example).stages
        stem = stem_output(model, stages[0]) if stages else None
        return [stem, *stages] if stem is not None else stages

    def weights(self):
        return {"fsp": self.fsp_weight}

    def build(self, student_shapes, teacher_shapes):
        s_shapes, t_shapes = [list(s) for s in student_shapes], [list(t) for t in teacher_shapes]
        if len(s_shapes) < 2 or any(len(s) != 4 for s in s_shapes + t_shapes):
            raise KdrunError(
                f"loss=fsp needs at least two spatial feature maps per model, not shapes {s_shapes} (student) and "
                f"{t_shapes} (teacher); name convolutional layers in loss.student_layers and loss.teacher_layers"
            )
        s_channels, t_channels = [s[1] for s in s_shapes], [t[1] for t in t_shapes]
        if s_channels != t_channels:
            raise KdrunError(
                f"loss=fsp compares FSP matrices of the same size, but the student's layers {self.student_layers} have "
                f"{s_channels} channels, the teacher's {self.teacher_layers} have {t_channels}; choose layers of equal "
                "widths (loss.student_layers / loss.teacher_layers), or a teacher of the student's widths"
            )

    def feature_terms(self, student, teacher):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.fsp_weight > 0):  # weight 0: logged, not trained
            return {"fsp": fsp_loss(student, teacher)}

    def describe_init(self) -> str:
        return f"L = sum of MSE between FSP matrices of {' -> '.join(self.student_layers)} (the student trains)"

    def init_loss(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        if not inputs.teacher_features:
            raise ValueError("FSP's init phase needs both models' features")
        fsp = fsp_loss(
            [f.float() for f in inputs.student_features], [f.detach().float() for f in inputs.teacher_features]
        )
        return fsp, {"fsp": fsp}
