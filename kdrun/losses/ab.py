"""Activation boundaries (Heo et al. AAAI 2019): the student learns where the teacher's hidden neurons switch on,
in an init phase before distillation.

Checked against RepDistiller (HobbitLong/RepDistiller: distiller_zoo/AB.py, models/util.py's ``Connector``,
helper/pretrain.py, helper/loops.py, train_student.py: ``--init_epochs 30``, pre-activation features of every stage,
the AB term only in the init phase).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn

from kdrun.core.modes import eval_mode
from kdrun.core.schema import Range, Weight
from kdrun.losses.base import LOSSES, InitEpochs, InitLr, LossInput, Terms
from kdrun.losses.feature import FeatureObjective, Layers
from kdrun.losses.fitnet import HintAdapter
from kdrun.losses.taps import stage_preactivations

Margin = Annotated[float, Range(ge=0, le=1000)]


def boundary_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Heo et al.'s alternative (squared hinge) loss, summed over every element: where the teacher's neuron is off
    (``target <= 0``), ``(source + margin)^2`` while ``source > -margin``; where it is on, ``(source - margin)^2``
    while ``source <= margin`` (RepDistiller's ``criterion_alternative_l2``)."""
    off = (target <= 0) & (source > -margin)
    on = (target > 0) & (source <= margin)
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


def ab_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """The boundary losses of the paired (connected) pre-activations, weighted 2^(i - n + 1) from the shallowest
    (the deepest weighs 1), divided by the batch size and scaled by 3/1000, summed (RepDistiller's ``ABLoss``)."""
    n, batch = len(student), student[0].shape[0]
    losses = [
        2.0 ** (i - n + 1) * boundary_loss(s, t, margin) for i, (s, t) in enumerate(zip(student, teacher, strict=True))
    ]
    return torch.stack(losses).sum() / batch / 1000 * 3


@LOSSES.register("ab")
class ActivationBoundaries(FeatureObjective):
    """Activation boundaries (Heo et al. AAAI 2019). Init phase (``init_epochs``): the student's stages (through
    connectors where shapes differ: 1x1 conv + BN, resized) learn the teacher's activation boundaries, on the
    pre-activations of every stage of both models:

        init:         L = AB(connector(f_s), f_t)
        distillation: L = alpha * CE + (1 - alpha) * T^2 * KL + ab_weight * AB

    with ``ab_weight`` 0 by default: as in RepDistiller, distillation is then plain CE (alpha=1) or KD.
    """

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        ab_weight: Weight = 0.0,
        margin: Margin = 1.0,
        init_epochs: InitEpochs = 30,
        init_lr: InitLr = None,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.ab_weight, self.margin = float(ab_weight), float(margin)
        self.init_epochs, self.init_lr = int(init_epochs), None if init_lr is None else float(init_lr)
        self.connectors = nn.ModuleList()

    def default_layers(self, model, example, role):
        return stage_preactivations(model, example, role)

    def weights(self):
        return {"ab": self.ab_weight}

    def build(self, student_shapes, teacher_shapes):
        self.require_maps("ab", student_shapes, teacher_shapes)
        if not len(self.connectors):  # a second bind (after the init phase) keeps the trained connectors
            self.connectors = nn.ModuleList(
                nn.Identity() if s[1:] == t[1:] else HintAdapter(s, t)
                for s, t in zip(student_shapes, teacher_shapes, strict=True)
            )

    def ab(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        connected = [c(s) for c, s in zip(self.connectors, student, strict=True)]
        return ab_loss(connected, teacher, self.margin)

    def feature_terms(self, student, teacher):
        if self.ab_weight > 0:
            return {"ab": self.ab(student, teacher)}
        with torch.no_grad(), eval_mode(self.connectors):  # weight 0 (RepDistiller's): logged, nothing trains
            return {"ab": self.ab(student, teacher)}

    def describe_init(self) -> str:
        return f"L = AB(connector(f_s), f_t) with margin {self.margin:g} (student and connectors train)"

    def init_loss(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        if not inputs.teacher_features:
            raise ValueError("AB's init phase needs both models' features")
        student = [f.float() for f in inputs.student_features]
        ab = self.ab(student, [f.detach().float() for f in inputs.teacher_features])
        return ab, {"ab": ab}
