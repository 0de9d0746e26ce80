"""Correlation congruence (Peng et al. ICCV 2019): match the correlations among the batch's embeddings."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.schema import Range, Weight, Width
from kdrun.losses.base import LOSSES
from kdrun.losses.feature import FeatureObjective, Layers

Kernel = Literal["repdistiller", "gaussian"]
DEFAULT_WEIGHT = {"repdistiller": 0.02, "gaussian": 100.0}  # RepDistiller's -b; Knowledge-Distillation-Zoo's lambda


def gaussian_correlation(e: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Peng et al.'s correlation matrix: the Gaussian RBF exp(-gamma ||x - y||^2) of the L2-normalised rows,
    by its order-P Taylor expansion exp(-2 gamma) sum_{p <= P} (2 gamma)^p / p! (x . y)^p."""
    e = F.normalize(e.flatten(1), dim=1)
    cosine = e @ e.t()
    correlation = torch.zeros_like(cosine)
    for p in range(order + 1):
        correlation = correlation + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine.pow(p)
    return correlation


def repdistiller_correlation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``distiller_zoo/CC.py`` (the code its authors got from Peng et al.): with d = |e_s - e_t|
    per sample, the mean over consecutive samples i, i+1 of sum_k d_ik d_(i+1)k. Zero for a batch of one."""
    d = (student - teacher).abs()
    if len(d) < 2:
        return d.sum() * 0
    return (d[:-1] * d[1:]).sum(1).mean()


@LOSSES.register("cc")
class CorrelationCongruence(FeatureObjective):
    """Correlation congruence (Peng et al. ICCV 2019). ``kernel=repdistiller`` (default) is the form RepDistiller
    benchmarks: both embeddings go through learned linear layers to ``embed_dim`` (trained with the student, not
    part of it) and ``repdistiller_correlation`` compares them. ``kernel=gaussian`` is the paper's formula: the mean
    squared difference of the two batch correlation matrices ``gaussian_correlation`` (no learned parts, so the
    embedding sizes may differ). Default taps: each model's embedding."""

    tap_kind = "embedding"

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        cc_weight: Weight | None = None,
        kernel: Kernel = "repdistiller",
        embed_dim: Width = 128,
        rbf_gamma: Annotated[float, Range(gt=0, le=10)] = 0.4,
        rbf_order: Annotated[int, Range(ge=1, le=10)] = 2,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.kernel = kernel
        self.cc_weight = float(DEFAULT_WEIGHT[kernel] if cc_weight is None else cc_weight)
        self.embed_dim, self.rbf_gamma, self.rbf_order = int(embed_dim), float(rbf_gamma), int(rbf_order)
        self.student_embeds, self.teacher_embeds = nn.ModuleList(), nn.ModuleList()

    def weights(self):
        return {"cc": self.cc_weight}

    def build(self, student_shapes, teacher_shapes):
        if self.kernel == "repdistiller":
            self.student_embeds = nn.ModuleList(nn.Linear(math.prod(s[1:]), self.embed_dim) for s in student_shapes)
            self.teacher_embeds = nn.ModuleList(nn.Linear(math.prod(t[1:]), self.embed_dim) for t in teacher_shapes)

    def feature_terms(self, student, teacher):
        if self.kernel == "repdistiller":
            pairs = zip(self.student_embeds, self.teacher_embeds, student, teacher, strict=True)
            losses = [repdistiller_correlation(es(s.flatten(1)), et(t.flatten(1))) for es, et, s, t in pairs]
        else:
            losses = [
                F.mse_loss(self._correlation(s), self._correlation(t)) for s, t in zip(student, teacher, strict=True)
            ]
        return {"cc": torch.stack(losses).sum()}

    def _correlation(self, e: torch.Tensor) -> torch.Tensor:
        return gaussian_correlation(e, self.rbf_gamma, self.rbf_order)
