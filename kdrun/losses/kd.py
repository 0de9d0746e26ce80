"""Hinton et al. 2015 KD, and logit standardization (Sun et al. CVPR 2024; ``loss=lskd``)."""

from __future__ import annotations

import torch.nn.functional as F

from kdrun.losses.base import LOSSES, HardSoft, standardize


@LOSSES.register("kd")
class KD(HardSoft):
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean.

    ``standardize=true`` is logit standardization (Sun et al. CVPR 2024, ``loss=lskd``): student and teacher
    logits are z-scored per sample before the temperature, so the student matches the teacher's logit
    relations rather than their range.
    """

    formula = "T^2 * KL(softmax(t/T) || softmax(s/T))"

    def __init__(self, T: float = 4.0, alpha: float = 0.2, standardize: bool = False):
        super().__init__(T, alpha)
        self.standardize = bool(standardize)
        if self.standardize:
            self.formula = "T^2 * KL(softmax(z(t)/T) || softmax(z(s)/T)), z = per-sample z-score"

    def soft_term(self, student, teacher):
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        T = self.T
        return F.kl_div(
            F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean", log_target=True
        ) * (T * T)
