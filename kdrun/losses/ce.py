"""Plain cross-entropy: the teacher's and the baseline's objective, and ``loss=ce`` (no distillation)."""

from __future__ import annotations

import torch.nn.functional as F

from kdrun.losses.base import LOSSES, LossInput, Objective


@LOSSES.register("ce")
class CrossEntropy(Objective):
    """Plain cross-entropy with the labels: no distillation (the teacher and baseline objective)."""

    needs_teacher = False

    def describe(self) -> str:
        return "L = CE(y, s) (no distillation)"

    def forward(self, inputs: LossInput):
        ce = F.cross_entropy(inputs.student.float(), inputs.labels)
        return ce, {"ce": ce}
