"""The contract every KD method follows, and the helpers that several share.

A method is a ``nn.Module`` subclass of ``Objective`` registered in ``LOSSES`` under its option name, in a
file of its own in this package, with a YAML in ``conf/loss/``. The training loop calls it with one
``LossInput`` per step and gets ``(total, terms)``: ``terms`` holds every named term unweighted (``ce``,
``kd``, ...), so each one is logged without extra code. Convention for the logit-distillation losses:

    L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))

with KL summed over classes and averaged over the batch ("batchmean"): the ``kd`` term is T^2 * KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.registry import Registry
from kdrun.core.schema import LearningRate, Range

LOSSES = Registry("loss")
Terms = dict[str, torch.Tensor]
InitEpochs = Annotated[int, Range(ge=0, le=100_000)]  # an init phase's length (0: none)
InitLr = LearningRate | None  # its constant learning rate (null: the student's)


@dataclass
class LossInput:
    """What one training step gives a method: both models' logits (and features at the named layers), the
    labels (class indices, or a mixed distribution over classes) and each sample's index in the training split
    (for methods with a per-sample memory, e.g. CRD)."""

    student: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor | None = None
    student_features: list[torch.Tensor] = field(default_factory=list)
    teacher_features: list[torch.Tensor] = field(default_factory=list)
    index: torch.Tensor | None = None


class Objective(nn.Module):
    """Base class of every method.

    ``needs_teacher``: the loop must supply teacher logits; ``uses_features``: also both models' features at
    ``student_layers`` / ``teacher_layers``, resolved by ``bind`` before training. Learnable parts (FitNet's
    adapters) are submodules: they train with the student, and their state is saved with the training state.
    """

    needs_teacher = True
    uses_features = False
    uses_index = False  # reads ``LossInput.index``: ``bind_data`` is called with the training split's labels first
    student_layers: list[str] = []
    teacher_layers: list[str] = []
    # A phase of the method's own before distillation (RepDistiller's ``init``, e.g. AB, FT, FSP): the student stage
    # first trains for ``init_epochs`` epochs on ``init_loss`` (see ``InitPhase``); 0: none.
    init_epochs = 0
    init_lr: float | None = None  # that phase's constant learning rate; None: the student's
    init_trains_student = True  # False: the student's weights (BatchNorm statistics too) are left as they were

    def __init__(self, T: float = 4.0, alpha: float = 0.2):
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    def describe(self) -> str:
        """One line with the formula and both weights spelled out, logged at the start of distillation."""
        return type(self).__name__

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at the start of every epoch (1-based), for methods with a warm-up."""

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        """Resolve anything that depends on the two models (layers, adapter shapes) before training.

        It may be called again on the same models (after an init phase): what it built is then kept."""

    def bind_data(self, labels: torch.Tensor) -> None:
        """For methods with ``uses_index``: the class of every training sample, indexed as ``LossInput.index``;
        called before training (before the training state is built or resumed), e.g. to size a memory bank."""

    def init_loss(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        """The loss of the method's init phase (``init_epochs`` > 0), with its terms unweighted."""
        raise NotImplementedError

    def describe_init(self) -> str:
        """One line on what the init phase trains and on which loss."""
        return f"{type(self).__name__} init phase"

    def init_phase(self) -> Objective:
        """The init phase as an objective of its own, trained by the same loop as distillation."""
        return InitPhase(self)

    def forward(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        raise NotImplementedError


class InitPhase(Objective):
    """A method's init phase: ``method.init_loss`` with the method as a submodule, so that the parts it trains (a
    paraphraser, connectors) are the method's own, kept for distillation and saved with the phase's training state.
    The student's parameters train only where that loss reaches them."""

    def __init__(self, method: Objective):
        super().__init__(method.T, method.alpha)
        self.method = method
        self.needs_teacher, self.uses_features = method.needs_teacher, method.uses_features
        self.uses_index = method.uses_index

    def bind_data(self, labels: torch.Tensor) -> None:
        self.method.bind_data(labels)

    def describe(self) -> str:
        return self.method.describe_init()

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        self.method.bind(student, teacher, example)
        self.student_layers, self.teacher_layers = self.method.student_layers, self.method.teacher_layers

    def forward(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        return self.method.init_loss(inputs)


class HardSoft(Objective):
    """alpha * CE(y, s) + (1 - alpha) * soft_term(s, t); subclasses define the soft term and its formula."""

    formula = ""

    def soft_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        temperature = f" with T={self.T:g}" if "T" in self.formula else ""
        return (
            f"L = {self.alpha:g} * CE(y, s) + {1 - self.alpha:g} * {self.formula}{temperature} "
            f"(CE weight {self.alpha:g}, KD weight {1 - self.alpha:g})"
        )

    def forward(self, inputs: LossInput) -> tuple[torch.Tensor, Terms]:
        if inputs.teacher is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits")
        student, teacher = inputs.student.float(), inputs.teacher.float()
        ce = F.cross_entropy(student, inputs.labels)
        kd = self.soft_term(student, teacher)
        return self.alpha * ce + (1 - self.alpha) * kd, {"ce": ce, "kd": kd}


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits minus their mean, divided by their standard deviation (Sun et al., CVPR 2024)."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + eps)


def build_objective(cfg: Any, T: float, alpha: float) -> Objective:
    """The method that the ``loss`` config node names, with the run's T and alpha."""
    return LOSSES.build(cfg, "loss", T=T, alpha=alpha)
