"""Where a step's teacher outputs come from, decided once per stage before the loop: no teacher, logits cached
for the whole split and looked up by sample index, or the frozen teacher run on each batch (with its features
at the method's layers when the method taps them)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kdrun.data import Data
from kdrun.losses import Objective
from kdrun.models.features import FeatureTap
from kdrun.training.runtime import Runtime

log = logging.getLogger(__name__)

TeacherOut = tuple[torch.Tensor | None, list[torch.Tensor]]


class TeacherSource:
    """No teacher: the objective gets labels only (the teacher's and the baseline's stages)."""

    def attach(self, student: nn.Module, objective: Objective, data: Data, runtime: Runtime, mixes: bool) -> nn.Module:
        """Check that this source suits the objective and the recipe; return the student as the step runs it:
        the model itself, or a ``FeatureTap`` of it when the objective takes features."""
        if objective.needs_teacher:
            raise ValueError(f"{type(objective).__name__} needs a teacher")
        return student

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> TeacherOut:
        return None, []


class CachedLogits(TeacherSource):
    """The teacher's logits for every training sample, in split order, computed once: a step looks its batch's rows
    up by sample index, never by batch position. Only valid when the student's inputs are the same every epoch."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def attach(self, student, objective, data, runtime, mixes):
        if mixes:
            raise ValueError("mixed batches need the teacher online, not cached logits")
        if objective.uses_features:
            raise ValueError("a feature loss needs the teacher online, not cached logits")
        if self.logits.shape[0] != len(data.train):
            raise ValueError(f"{len(self.logits)} teacher logits for {len(data.train)} samples")
        self.logits = self.logits.to(runtime.device)
        return student

    def __call__(self, x, index):
        return self.logits[index], []


class OnlineTeacher(TeacherSource):
    """The frozen teacher run on each batch in inference mode, after the student, on the same (mixed) inputs; with
    its features at the objective's layers when the objective taps them."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.forward: nn.Module = teacher
        self.runtime: Runtime | None = None

    def attach(self, student, objective, data, runtime, mixes):
        self.runtime = runtime
        runtime.prepare(self.teacher).eval().requires_grad_(False)
        if not objective.uses_features:
            return student
        spec = data.spec
        example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, device=runtime.device)
        objective.bind(student, self.teacher, runtime.inputs(example))  # resolves the layers, builds any adapter
        log.info("%s", objective.describe())
        self.forward = FeatureTap(self.teacher, objective.teacher_layers).eval()
        return FeatureTap(student, objective.student_layers)

    def __call__(self, x, index):
        assert self.runtime is not None, "attach() first"
        with torch.inference_mode(), self.runtime.autocast():
            out = self.runtime.forward(self.forward)(x)
        # Normal tensors again: inference tensors cannot take part in the student's backward.
        if isinstance(out, tuple):
            logits, features = out
            return logits.float().clone(), [f.clone() for f in features]
        return out.float().clone(), []
