"""Logit regression (Ba & Caruana 2014): mean squared difference of the logits."""

from __future__ import annotations

import torch.nn.functional as F

from kdrun.losses.base import LOSSES, HardSoft


@LOSSES.register("mse")
class LogitMSE(HardSoft):
    """Logit regression (Ba & Caruana 2014): mean squared difference of the raw logits; T is unused."""

    formula = "mean((s - t)^2)"

    def soft_term(self, student, teacher):
        return F.mse_loss(student, teacher)
