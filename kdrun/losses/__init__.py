"""KD methods: one file per method behind one contract (``base.Objective``), each registered by its option
name in ``conf/loss/``."""

from kdrun.losses import (  # noqa: F401 - registers them
    ab,
    at,
    cc,
    ce,
    crd,
    dist,
    dkd,
    fitnet,
    fsp,
    ft,
    kd,
    mse,
    nst,
    pkt,
    reviewkd,
    rkd,
    soft_ce,
    sp,
    vid,
)
from kdrun.losses.base import LOSSES, HardSoft, LossInput, Objective, Terms, build_objective, standardize
from kdrun.losses.ce import CrossEntropy
from kdrun.losses.feature import FeatureObjective

__all__ = [
    "LOSSES",
    "CrossEntropy",
    "FeatureObjective",
    "HardSoft",
    "LossInput",
    "Objective",
    "Terms",
    "build_objective",
    "standardize",
]
