"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match the batch's cosine-kernel densities."""

from __future__ import annotations

import torch

from kdrun.core.schema import Weight
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers


def probabilistic_transfer(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL between the teacher's and the student's conditional densities p(j | i) over the batch.

    p(j | i) = K(f_i, f_j) / sum_k K(f_i, f_k) with the cosine kernel K = (cos + 1) / 2 (K(f_i, f_i) included);
    the loss is the mean over all (i, j) of p_t log((p_t + eps) / (p_s + eps)), as the authors' code (via
    RepDistiller's ``distiller_zoo/PKT.py``) computes it. Only the batch sizes must agree.
    """

    def conditional(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        kernel = (f @ f.t() + 1) / 2
        return kernel / kernel.sum(1, keepdim=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


@LOSSES.register("pkt")
class ProbabilisticTransfer(FeatureObjective):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): the student's embedding reproduces the
    teacher's distribution of pairwise cosine similarities over the batch, so the embedding sizes may differ.
    Default taps: each model's embedding."""

    tap_kind = "embedding"

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        pkt_weight: Weight = 30000.0,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.pkt_weight = float(pkt_weight)

    def weights(self):
        return {"pkt": self.pkt_weight}

    def feature_terms(self, student, teacher):
        losses = [probabilistic_transfer(s, t) for s, t in zip(student, teacher, strict=True)]
        return {"pkt": torch.stack(losses).sum()}
