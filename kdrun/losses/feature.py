"""The base of the methods that distil through intermediate features (fitnet, at, rkd, sp, pkt, nst, vid, cc).

Each adds its feature terms to the logit-KD objective, keeping T and alpha's meaning:

    L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + sum_k weight_k * term_k

(``alpha=1`` is the papers' CE + feature form.) The student's and teacher's layers are tapped by name
(``student_layers`` / ``teacher_layers``; null: the model's default taps of the method's kind, see
``kdrun.models.features``) and paired one to one; with default taps of unequal counts the deepest ones pair up.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core.errors import KdrunError
from kdrun.losses.base import LossInput, Objective, Terms
from kdrun.losses.kd import KD
from kdrun.models.features import check_layers, default_taps, feature_shapes

Layers = list[str] | str | None  # layer names; null: the model's default taps for the method


class FeatureObjective(Objective):
    """Base of the feature losses: resolves and checks the taps (``bind``), then adds ``feature_terms``."""

    uses_features = True
    tap_kind = "stages"  # which default taps: "stages", "middle" (one hint) or "embedding"

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha)
        self.logit_kd = KD(T, alpha)
        self.requested = (_layer_list(student_layers, "student_layers"), _layer_list(teacher_layers, "teacher_layers"))
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []

    def weights(self) -> dict[str, float]:
        """Each feature term's weight, by term name."""
        raise NotImplementedError

    def feature_terms(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> Terms:
        """The unweighted feature terms for the paired features (float32)."""
        raise NotImplementedError

    def build(self, student_shapes: list[tuple], teacher_shapes: list[tuple]) -> None:
        """Check the tapped shapes and build any learned parts (adapters); called once by ``bind``."""

    def default_layers(self, model: nn.Module, example: torch.Tensor, role: str) -> list[str]:
        """The layers tapped where ``loss.<role>_layers`` is null: the model's default taps of ``tap_kind``."""
        return default_taps(model, example).of(self.tap_kind)

    def require_maps(self, method: str, student_shapes: list[tuple], teacher_shapes: list[tuple]) -> None:
        """Refuse, in one line, a tapped layer that is not a spatial map (N, C, H, W): ``method`` needs maps."""
        for role, layers, shapes in (
            ("student", self.student_layers, student_shapes),
            ("teacher", self.teacher_layers, teacher_shapes),
        ):
            for layer, shape in zip(layers, shapes, strict=True):
                if len(shape) != 4:
                    raise KdrunError(
                        f"loss={method} needs spatial feature maps, but the {role}'s layer {layer!r} gives shape "
                        f"{list(shape)}; tap convolutional layers (loss.{role}_layers) or use another loss"
                    )

    def bind(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> None:
        """Resolve the layers of both models (defaults where not given), check them, and build the adapters.

        ``example`` is an input batch (any values) of the training shape; both models are probed with it in eval
        mode, without changing them.
        """
        layers = []
        for role, model, requested in (
            ("student", student, self.requested[0]),
            ("teacher", teacher, self.requested[1]),
        ):
            if requested is None:
                layers.append(self.default_layers(model, example, role))
            else:
                check_layers(model, requested, role, f"loss.{role}_layers")
                layers.append(requested)
        student_layers, teacher_layers = layers
        if len(student_layers) != len(teacher_layers):
            k = min(len(student_layers), len(teacher_layers))
            if any(r is not None and len(r) > k for r in self.requested):  # named layers are never dropped
                raise KdrunError(
                    f"the student's layers {student_layers} and the teacher's {teacher_layers} pair one to one: "
                    "give loss.student_layers and loss.teacher_layers with the same number of names"
                )
            student_layers, teacher_layers = student_layers[-k:], teacher_layers[-k:]  # defaults: the deepest pair
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        s_shapes = feature_shapes(student, example, student_layers)
        t_shapes = feature_shapes(teacher, example, teacher_layers)
        self.build([s_shapes[n] for n in student_layers], [t_shapes[n] for n in teacher_layers])

    def describe(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for s, t in zip(self.student_layers, self.teacher_layers, strict=True))
        weighted = " + ".join(f"{w:g} * {name}" for name, w in self.weights().items())
        pairs = pairs or "(chosen when training starts)"
        return f"{self.logit_kd.describe()} + {weighted} on student->teacher layers {pairs}"

    def forward(self, inputs: LossInput):
        if inputs.teacher is None or not inputs.teacher_features:
            raise ValueError(f"{type(self).__name__} needs teacher logits and both models' features")
        total, terms = self.logit_kd(inputs)
        features = self.feature_terms(
            [f.float() for f in inputs.student_features], [f.detach().float() for f in inputs.teacher_features]
        )
        for name, weight in self.weights().items():
            total = total + weight * features[name]
        return total, {**terms, **features}


def common_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature maps at the same spatial size: each average-pooled to the smaller height and width."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size == t_size:
        return student, teacher
    size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


def _layer_list(value, key: str) -> list[str] | None:
    if value is None:
        return None
    layers = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not layers or not all(isinstance(v, str) and v for v in layers):
        raise KdrunError(f"loss.{key}={value!r} is invalid; give a list of layer names, or null for the defaults")
    return layers
