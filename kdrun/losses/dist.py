"""DIST (Huang et al. NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): match the correlations of the
two models' predictions across classes and across the batch, not the predictions themselves."""

from __future__ import annotations

import torch

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES, LossInput, Objective
from kdrun.losses.kd import KD


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_relations(student: torch.Tensor, teacher: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): with p = softmax(z / T), T^2 * (1 - mean over samples of pearson(p_s[i], p_t[i])) and
    T^2 * (1 - mean over classes of pearson(p_s[:, c], p_t[:, c])), as the authors' ``dist_kd.py``."""
    p_s, p_t = (student / T).softmax(1), (teacher / T).softmax(1)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.t(), p_t.t()).mean()
    return inter * T * T, intra * T * T


@LOSSES.register("dist")
class DIST(Objective):
    """DIST (Huang et al. NeurIPS 2022): the student keeps the teacher's inter-class relation (each sample's class
    probabilities correlate with the teacher's) and intra-class relation (each class's probabilities over the batch
    correlate), added to the logit-KD objective; T is DIST's temperature tau.

        L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(...) + inter_weight * inter + intra_weight * intra
    """

    def __init__(self, T: float = 4.0, alpha: float = 0.2, inter_weight: Weight = 2.0, intra_weight: Weight = 2.0):
        super().__init__(T, alpha)
        self.logit_kd = KD(T, alpha)
        self.inter_weight, self.intra_weight = float(inter_weight), float(intra_weight)

    def describe(self) -> str:
        return (
            f"{self.logit_kd.describe()} + {self.inter_weight:g} * T^2 * (1 - mean_i pearson(p_s[i], p_t[i])) + "
            f"{self.intra_weight:g} * T^2 * (1 - mean_c pearson(p_s[:, c], p_t[:, c])), p = softmax(z/T)"
        )

    def forward(self, inputs: LossInput):
        if inputs.teacher is None:
            raise ValueError("DIST needs teacher logits")
        total, terms = self.logit_kd(inputs)
        inter, intra = dist_relations(inputs.student.float(), inputs.teacher.float(), self.T)
        total = total + self.inter_weight * inter + self.intra_weight * intra
        return total, {**terms, "dist_inter": inter, "dist_intra": intra}
