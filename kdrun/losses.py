"""Training objectives. Each maps ``(student_logits, labels, teacher_logits)`` to ``(total, terms)``; the feature
losses (``kdrun.feature_losses``) also take both models' features.

``terms`` holds every named term unweighted (``ce``, ``kd``, ...), so the engine logs each one without
extra code. Convention for the logit-distillation losses:

    L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))

with KL summed over classes and averaged over the batch ("batchmean"): the ``kd`` term is T^2 * KL.
Adding a loss = one class registered here (or a ``_target_``) plus one YAML in ``conf/loss/``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.mixing import hard_labels
from kdrun.registry import Registry

LOSSES = Registry("loss")
Terms = dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class: ``needs_teacher`` says whether the engine must supply teacher logits."""

    needs_teacher = True
    uses_features = False  # True: also gets both models' features at named layers (see kdrun.feature_losses)

    def __init__(self, T: float = 4.0, alpha: float = 0.2):
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    def describe(self) -> str:
        """One line with the formula and both weights spelled out, logged at the start of distillation."""
        return type(self).__name__

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine at the start of every epoch (1-based), for objectives with a warm-up."""

    def forward(
        self, student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Terms]:
        raise NotImplementedError


class _HardSoft(Objective):
    """alpha * CE(y, s) + (1 - alpha) * soft_term(s, t); subclasses define the soft term."""

    formula = ""

    def soft_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        temperature = f" with T={self.T:g}" if "T" in self.formula else ""
        return (
            f"L = {self.alpha:g} * CE(y, s) + {1 - self.alpha:g} * {self.formula}{temperature} "
            f"(CE weight {self.alpha:g}, KD weight {1 - self.alpha:g})"
        )

    def forward(self, student, labels, teacher=None):
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits")
        student, teacher = student.float(), teacher.float()
        ce = F.cross_entropy(student, labels)
        kd = self.soft_term(student, teacher)
        return self.alpha * ce + (1 - self.alpha) * kd, {"ce": ce, "kd": kd}


@LOSSES.register("ce")
class CrossEntropy(Objective):
    """Plain cross-entropy with the labels: no distillation (the teacher and baseline objective)."""

    needs_teacher = False

    def describe(self) -> str:
        return "L = CE(y, s) (no distillation)"

    def forward(self, student, labels, teacher=None):
        ce = F.cross_entropy(student.float(), labels)
        return ce, {"ce": ce}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits minus their mean, divided by their standard deviation (Sun et al., CVPR 2024)."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


@LOSSES.register("kd")
class KD(_HardSoft):
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
        tckd_weight: float = 1.0,
        nckd_weight: float = 8.0,
        warmup_epochs: int = 20,
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

    def forward(self, student, labels, teacher=None):
        if teacher is None:
            raise ValueError("DKD needs teacher logits")
        student, teacher = student.float(), teacher.float()
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


@LOSSES.register("soft_ce")
class SoftCE(_HardSoft):
    """Cross-entropy with the teacher's softened distribution: KD plus the teacher's entropy (a constant)."""

    formula = "T^2 * H(softmax(t/T), softmax(s/T))"

    def soft_term(self, student, teacher):
        T = self.T
        return -(F.softmax(teacher / T, 1) * F.log_softmax(student / T, 1)).sum(1).mean() * (T * T)


@LOSSES.register("mse")
class LogitMSE(_HardSoft):
    """Logit regression (Ba & Caruana 2014): mean squared difference of the raw logits; T is unused."""

    formula = "mean((s - t)^2)"

    def soft_term(self, student, teacher):
        return F.mse_loss(student, teacher)


def build_objective(cfg: Any, T: float, alpha: float) -> Objective:
    """The objective that the ``loss`` config node names, with the run's T and alpha."""
    return LOSSES.build(cfg, "loss", T=T, alpha=alpha)


# Importing it registers the feature losses (fitnet, at, rkd).
from kdrun import feature_losses  # noqa: E402, F401
