"""A multi-teacher ensemble: the members' softened outputs averaged, as one teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.errors import KdrunError
from kdrun.core.schema import Temperature
from kdrun.data import DataSpec
from kdrun.models.registry import MODELS, build_model


@MODELS.register("ensemble")
class Ensemble(nn.Module):
    """Returns ``T * log(mean_i softmax(m_i(x) / T))``: its softmax at temperature T is exactly the members'
    averaged softened distribution, so every logit-based loss distils from the average (Hinton et al. 2015)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        members: list[Any],
        temperature: Temperature = 1.0,
    ):
        super().__init__()  # check_model_cfg has checked the members (build_model runs it first)
        spec = DataSpec(num_classes, in_channels, image_size)
        self.members = nn.ModuleList(build_model(m, spec, key=f"teacher.members[{i}]") for i, m in enumerate(members))
        self.temperature = float(temperature)

    def default_taps(self, example: torch.Tensor):
        """None to choose from (see ``kdrun.models.features``): the members' layers are not one network's stages."""
        raise KdrunError(
            "teacher=ensemble has no default feature taps: name one member's layers with loss.teacher_layers, "
            "e.g. loss.teacher_layers=[members.0.layer3]"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        probs = torch.stack([F.softmax(member(x).float() / T, 1) for member in self.members]).mean(0)
        return T * probs.clamp_min(1e-12).log()
