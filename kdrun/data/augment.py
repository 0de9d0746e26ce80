"""Batch mixing (``augment=mixup|cutmix``): for function matching (Beyer et al. CVPR 2022), teacher and student
see the same mixed images, so the teacher runs online; the labels become the matching class mixtures."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from kdrun.core.registry import Registry, to_dict
from kdrun.core.schema import Range

MIXES = Registry("augment")
MixAlpha = Annotated[float, Range(gt=0, le=1000)]


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """A Beta(alpha, alpha) draw that follows the stage's generator (so a resumed run mixes the same way)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _partners(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(device)


def _soft(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return labels.float() if labels.ndim == 2 else F.one_hot(labels, num_classes).float()


class _Mix:
    """A batch mixing with mixing weights drawn from Beta(alpha, alpha)."""

    def __init__(self, alpha: MixAlpha = 1.0):
        self.alpha = float(alpha)


@MIXES.register("mixup")
class MixUp(_Mix):
    """Zhang et al. 2018: ``lam * x + (1 - lam) * x[perm]``, lam ~ Beta(alpha, alpha), labels mixed alike."""

    def __call__(self, x, labels, num_classes: int, generator=None):
        lam = _beta(self.alpha, generator)
        perm = _partners(len(x), generator, x.device)
        soft = _soft(labels, num_classes)
        return lam * x + (1 - lam) * x[perm], lam * soft + (1 - lam) * soft[perm]


@MIXES.register("cutmix")
class CutMix(_Mix):
    """Yun et al. 2019: a box of the partner image pasted in; labels mixed by the box's share of the area."""

    def __call__(self, x, labels, num_classes: int, generator=None):
        lam = _beta(self.alpha, generator)
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(v) for v in torch.randint(0, 10**9, (2,), generator=generator) % torch.tensor([h, w]))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        perm = _partners(len(x), generator, x.device)
        mixed = x.clone()
        mixed[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
        kept = 1 - (y2 - y1) * (x2 - x1) / (h * w)  # the share of each image that is still its own
        soft = _soft(labels, num_classes)
        return mixed, kept * soft + (1 - kept) * soft[perm]


def build_mix(cfg: Any):
    """The mixing that the ``augment`` node names, or None for ``augment=none``."""
    options = to_dict(cfg)
    if options.get("name", "none") == "none":
        return None
    return MIXES.build(options, "augment")


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices: mixed (soft) labels give their largest share."""
    return labels.argmax(1) if labels.ndim == 2 else labels
