"""Training objectives. Each maps ``(student_logits, labels, teacher_logits)`` to ``(total, terms)``.

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

from kdrun.registry import Registry

LOSSES = Registry("loss")
Terms = dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class: ``needs_teacher`` says whether the engine must supply teacher logits."""

    needs_teacher = True

    def __init__(self, T: float = 4.0, alpha: float = 0.2):
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    def describe(self) -> str:
        """One line with the formula and both weights spelled out, logged at the start of distillation."""
        return type(self).__name__

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


@LOSSES.register("kd")
class KD(_HardSoft):
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean."""

    formula = "T^2 * KL(softmax(t/T) || softmax(s/T))"

    def soft_term(self, student, teacher):
        T = self.T
        return F.kl_div(
            F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean", log_target=True
        ) * (T * T)


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
