"""Decoupled KD (Zhao et al. CVPR 2022): the KD term split into target and non-target parts."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from kdrun.core.schema import Range, Weight
from kdrun.data.augment import hard_labels
from kdrun.losses.base import LOSSES, LossInput, Objective, standardize


@LOSSES.register("dkd")
class DKD(Objective):
    """Decoupled KD (Zhao et al. CVPR 2022): the KD term split into its target-class part (TCKD: the binary
    target / non-target distribution) and its non-target part (NCKD: the distribution among the other classes),
    weighted separately and warmed up linearly over ``warmup_epochs``:

        L = alpha * CE(y, s) + (1 - alpha) * min(epoch / warmup, 1) * (tckd_weight * TCKD + nckd_weight * NCKD)

    with TCKD and NCKD each T^2 * KL, batchmean. The paper's CIFAR defaults are in conf/loss/dkd.yaml.
    """

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        tckd_weight: Weight = 1.0,
        nckd_weight: Weight = 8.0,
        warmup_epochs: Annotated[int, Range(ge=0, le=100_000)] = 20,
        standardize: bool = False,
    ):
        super().__init__(T, alpha)
        self.tckd_weight, self.nckd_weight = float(tckd_weight), float(nckd_weight)
        self.warmup_epochs, self.standardize = int(warmup_epochs), bool(standardize)
        self.warmup = 1.0

    def describe(self) -> str:
        z = " on z-scored logits" if self.standardize else ""
        return (
            f"L = {self.alpha:g} * CE(y, s) + {1 - self.alpha:g} * warmup * ({self.tckd_weight:g} * TCKD + "
            f"{self.nckd_weight:g} * NCKD){z} with T={self.T:g}, warm-up over {self.warmup_epochs} epochs"
        )

    def set_epoch(self, epoch: int) -> None:
        self.warmup = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def forward(self, inputs: LossInput):
        if inputs.teacher is None:
            raise ValueError("DKD needs teacher logits")
        student, teacher, labels = inputs.student.float(), inputs.teacher.float(), inputs.labels
        ce = F.cross_entropy(student, labels)
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        tckd, nckd = decoupled_kd_terms(student, teacher, labels, self.T)
        kd = self.warmup * (self.tckd_weight * tckd + self.nckd_weight * nckd)
        return self.alpha * ce + (1 - self.alpha) * kd, {"ce": ce, "tckd": tckd, "nckd": nckd}


def decoupled_kd_terms(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Decoupled KD, each T^2 * KL(teacher || student), batchmean."""
    target = F.one_hot(hard_labels(labels), student.shape[1]).bool()  # mixed labels: their largest share
    p_s, p_t = F.softmax(student / T, 1), F.softmax(teacher / T, 1)
    binary_s = torch.stack([p_s[target], p_s.masked_fill(target, 0).sum(1)], 1)
    binary_t = torch.stack([p_t[target], p_t.masked_fill(target, 0).sum(1)], 1)
    tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction="batchmean") * T * T
    # Among the non-target classes only: the target logit is pushed to -inf before the softmax.
    masked_s = (student / T).masked_fill(target, float("-inf"))
    masked_t = (teacher / T).masked_fill(target, float("-inf"))
    log_q_s, log_q_t = F.log_softmax(masked_s, 1), F.log_softmax(masked_t, 1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0).sum(1).mean() * T * T
    return tckd, nckd
