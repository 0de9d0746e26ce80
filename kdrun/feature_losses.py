"""Distillation through intermediate features: FitNet hints, attention transfer, relational KD.

Each adds its feature terms to the logit-KD objective, keeping T and alpha's meaning:

    L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + sum_k weight_k * term_k

(``alpha=1`` is the papers' CE + feature form.) The student's and teacher's layers are tapped by name
(``student_layers`` / ``teacher_layers``; null: the model's default taps of the method's kind, see
``kdrun.features``) and paired one to one; with default taps of unequal counts the deepest ones pair up.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import KdrunError
from kdrun.features import check_layers, default_taps, feature_shapes
from kdrun.losses import KD, LOSSES, Objective, Terms


class FeatureObjective(Objective):
    """Base of the feature losses: resolves and checks the taps (``bind``), then adds ``feature_terms``."""

    uses_features = True
    tap_kind = "stages"  # which default taps: "stages", "middle" (one hint) or "embedding"

    def __init__(
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        student_layers: list[str] | None = None,
        teacher_layers: list[str] | None = None,
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
                layers.append(default_taps(model, example).of(self.tap_kind))
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

    def forward(self, student, labels, teacher=None, student_features=None, teacher_features=None):
        if teacher is None or student_features is None or teacher_features is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits and both models' features")
        total, terms = self.logit_kd(student, labels, teacher)
        features = self.feature_terms(
            [f.float() for f in student_features], [f.detach().float() for f in teacher_features]
        )
        for name, weight in self.weights().items():
            total = total + weight * features[name]
        return total, {**terms, **features}


def _layer_list(value, key: str) -> list[str] | None:
    if value is None:
        return None
    layers = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not layers or not all(isinstance(v, str) and v for v in layers):
        raise KdrunError(f"loss.{key}={value!r} is invalid; give a list of layer names, or null for the defaults")
    return layers


class HintAdapter(nn.Module):
    """Maps a student feature to its teacher feature's shape (FitNet's regressor).

    Maps: 1x1 conv + BatchNorm to the teacher's channels, then average-pooled (or bilinearly upsampled) to its
    size. Vectors: a linear layer. A map against a vector is average-pooled to a vector first.
    """

    def __init__(self, student_shape: tuple, teacher_shape: tuple):
        super().__init__()
        s_channels, t_channels = student_shape[1], teacher_shape[1]
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        if len(student_shape) == 4 and self.size is not None:
            self.proj = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))
        else:
            self.proj = nn.Linear(s_channels, t_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Linear):
            return self.proj(x.mean((2, 3)) if x.ndim == 4 else x.flatten(1))
        x = self.proj(x)
        if tuple(x.shape[2:]) == self.size:
            return x
        if x.shape[2] >= self.size[0] and x.shape[3] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def hint_loss(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the adapted student feature against the teacher's (pooled to a vector if needed)."""
    if teacher.ndim == 4 and adapted.ndim == 2:
        teacher = teacher.mean((2, 3))
    return F.mse_loss(adapted, teacher)


@LOSSES.register("fitnet")
class FitNet(FeatureObjective):
    """FitNets (Romero et al. 2015): regress the teacher's hint layer from the student's guided layer through a
    learned adapter (``HintAdapter``), trained with the student and not part of it. Default taps: the middle
    stage of each model."""

    tap_kind = "middle"

    def __init__(self, T=4.0, alpha=0.2, hint_weight: float = 100.0, student_layers=None, teacher_layers=None):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.hint_weight = float(hint_weight)
        self.adapters = nn.ModuleList()

    def weights(self):
        return {"hint": self.hint_weight}

    def build(self, student_shapes, teacher_shapes):
        self.adapters = nn.ModuleList(HintAdapter(s, t) for s, t in zip(student_shapes, teacher_shapes, strict=True))

    def feature_terms(self, student, teacher):
        losses = [hint_loss(a(s), t) for a, s, t in zip(self.adapters, student, teacher, strict=True)]
        return {"hint": torch.stack(losses).sum()}


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |f|^p, flattened and L2-normalised."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps; the larger map is average-pooled to the smaller's size."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size != t_size:
        size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
        student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@LOSSES.register("at")
class AttentionTransfer(FeatureObjective):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match the spatial attention maps of paired stage
    outputs, summed over the pairs. Default taps: every stage (the deepest ones pair up)."""

    def __init__(
        self, T=4.0, alpha=0.2, at_weight: float = 1000.0, p: float = 2.0, student_layers=None, teacher_layers=None
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.at_weight, self.p = float(at_weight), float(p)

    def weights(self):
        return {"at": self.at_weight}

    def build(self, student_shapes, teacher_shapes):
        for role, layers, shapes in (
            ("student", self.student_layers, student_shapes),
            ("teacher", self.teacher_layers, teacher_shapes),
        ):
            for layer, shape in zip(layers, shapes, strict=True):
                if len(shape) != 4:
                    raise KdrunError(
                        f"loss=at needs spatial feature maps, but the {role}'s layer {layer!r} gives shape "
                        f"{list(shape)}; tap convolutional layers (loss.{role}_layers) or use another loss"
                    )

    def feature_terms(self, student, teacher):
        losses = [attention_transfer(s, t, self.p) for s, t in zip(student, teacher, strict=True)]
        return {"at": torch.stack(losses).sum()}


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e``, with an exact zero diagonal."""
    squared = e.pow(2).sum(1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * e @ e.t()).clamp_min(eps)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: smooth-L1 between the batch's pairwise distances, each normalised by its mean non-zero distance."""

    def normalised(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e.flatten(1))
        return d / d[d > 0].mean().clamp_min(1e-12)

    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: smooth-L1 between the cosines of the angles that every triplet of the batch forms."""

    def cosines(e: torch.Tensor) -> torch.Tensor:
        e = e.flatten(1)
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # unit[a, b] = n(e_b - e_a)
        return torch.bmm(unit, unit.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(cosines(student), cosines(teacher))


@LOSSES.register("rkd")
class RelationalKD(FeatureObjective):
    """Relational KD (Park et al. CVPR 2019): match the distances and angles among the batch's embeddings, so the
    student's and teacher's embedding sizes may differ. Default taps: each model's embedding."""

    tap_kind = "embedding"

    def __init__(
        self,
        T=4.0,
        alpha=0.2,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_layers=None,
        teacher_layers=None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def weights(self):
        return {"rkd_distance": self.distance_weight, "rkd_angle": self.angle_weight}

    def feature_terms(self, student, teacher):
        pairs = list(zip(student, teacher, strict=True))
        return {
            "rkd_distance": torch.stack([rkd_distance(s, t) for s, t in pairs]).sum(),
            "rkd_angle": torch.stack([rkd_angle(s, t) for s, t in pairs]).sum(),
        }
