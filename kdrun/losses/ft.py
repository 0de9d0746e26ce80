"""Factor transfer (Kim et al. NeurIPS 2018, "Paraphrasing Complex Network"): a paraphraser, trained first to
reconstruct the teacher's last stage, gives the teacher's factors; a translator maps the student's to them.

Checked against RepDistiller (HobbitLong/RepDistiller: distiller_zoo/FT.py, models/util.py's ``Paraphraser`` and
``Translator``, helper/pretrain.py: the paraphraser alone trains, 30 epochs at lr 0.01 for CIFAR ResNet/WRN
students; helper/loops.py: the paraphraser frozen afterwards; scripts/run_cifar_distill.sh: ``-b 200``).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.errors import KdrunError
from kdrun.core.schema import Range, Weight
from kdrun.losses.base import LOSSES, InitEpochs, InitLr, LossInput, Terms
from kdrun.losses.feature import FeatureObjective, Layers

Rate = Annotated[float, Range(gt=0, le=4)]


def _conv_stack(channels: list[int], transposed: bool = False, bn: bool = False) -> nn.Sequential:
    """3x3 convolutions (stride 1, padding 1) between the successive ``channels``, each followed by (BN and)
    LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """An autoencoder of the teacher's feature: the encoder gives ``rate * C`` factor channels (RepDistiller's, without
    BatchNorm)."""

    def __init__(self, channels: int, rate: float):
        super().__init__()
        factor = max(1, int(channels * rate))
        self.encoder = _conv_stack([channels, channels, factor, factor])
        self.decoder = _conv_stack([factor, factor, channels, channels], transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


def factor_transfer(student: torch.Tensor, teacher: torch.Tensor, channel_mean: bool = True) -> torch.Tensor:
    """The mean absolute difference of the L2-normalised factors (the larger map average-pooled to the smaller's
    size first). ``channel_mean``: each factor reduced to its spatial map mean_c f^2 first (RepDistiller's
    ``FactorTransfer``, p1=2, p2=1); else the whole factor, flattened (Kim et al.'s formula)."""
    if student.shape[2] > teacher.shape[2]:
        student = F.adaptive_avg_pool2d(student, (teacher.shape[2], teacher.shape[3]))
    elif student.shape[2] < teacher.shape[2]:
        teacher = F.adaptive_avg_pool2d(teacher, (student.shape[2], student.shape[3]))

    def factor(f: torch.Tensor) -> torch.Tensor:
        return F.normalize((f.pow(2).mean(1) if channel_mean else f).flatten(1), dim=1)

    return (factor(student) - factor(teacher)).abs().mean()


@LOSSES.register("ft")
class FactorTransfer(FeatureObjective):
    """Factor transfer (Kim et al. NeurIPS 2018), on the last stage of each model. Init phase (``init_epochs``): the
    paraphraser learns to reconstruct the teacher's feature (the student is left as it was). Distillation: a
    translator (3 conv + BN + LeakyReLU, trained with the student) maps the student's feature to factors that match
    the frozen paraphraser's encoding of the teacher's:

        init:         L = MSE(paraphraser(f_t), f_t)
        distillation: L = alpha * CE + (1 - alpha) * T^2 * KL + ft_weight * FT
    """

    init_trains_student = False

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        ft_weight: Weight = 200.0,
        rate: Rate = 0.5,
        channel_mean: bool = True,
        init_epochs: InitEpochs = 30,
        init_lr: InitLr = 0.01,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.ft_weight, self.rate, self.channel_mean = float(ft_weight), float(rate), bool(channel_mean)
        self.init_epochs, self.init_lr = int(init_epochs), None if init_lr is None else float(init_lr)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None

    def default_layers(self, model, example, role):
        return super().default_layers(model, example, role)[-1:]  # the last stage (RepDistiller's feat[-2])

    def weights(self):
        return {"ft": self.ft_weight}

    def build(self, student_shapes, teacher_shapes):
        shapes = [list(s) for s in student_shapes + teacher_shapes]
        if len(student_shapes) != 1 or any(len(s) != 4 for s in shapes):
            raise KdrunError(
                f"loss=ft takes one spatial feature map per model, not shapes {shapes}; name one convolutional layer "
                "in loss.student_layers and loss.teacher_layers (or null for the last stage)"
            )
        if self.paraphraser is None:  # a second bind (after the init phase) keeps the trained paraphraser
            s_channels, t_channels = student_shapes[0][1], teacher_shapes[0][1]
            self.paraphraser = Paraphraser(t_channels, self.rate)
            factor = max(1, int(t_channels * self.rate))
            self.translator = _conv_stack([s_channels, s_channels, factor, factor], bn=True)

    def feature_terms(self, student, teacher):
        assert self.paraphraser is not None and self.translator is not None, "bind() first"
        with torch.no_grad():  # the paraphraser is frozen after its init phase
            factor_t = self.paraphraser.encoder(teacher[0])
        return {"ft": factor_transfer(self.translator(student[0]), factor_t, self.channel_mean)}

    def describe_init(self) -> str:
        return "L = MSE(paraphraser(f_t), f_t) (the paraphraser alone trains)"

    def init_loss(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        if not inputs.teacher_features or self.paraphraser is None:
            raise ValueError("FT's init phase needs bind() and the teacher's features")
        target = inputs.teacher_features[0].detach().float()
        reconstruction = F.mse_loss(self.paraphraser(target), target)
        return reconstruction, {"reconstruction": reconstruction}
