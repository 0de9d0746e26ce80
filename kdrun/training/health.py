"""Did a stage train? A stage whose loss ran away is *diverged*; one whose training cross-entropy ends above 90% of a
constant prediction's is *collapsed*: stuck on one class or a few (typically after a first-epoch blow-up), whether or
not its validation accuracy is exactly chance. (A stage of one epoch is judged by its validation CE instead: the mean
training CE of its only epoch still carries its first steps.) Either flag is written in the stage's metrics.json entry
and in one warning line, never left as a silent number."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

NOT_FALLEN = 0.9  # the training CE still above this share of a constant prediction's CE
RAN_AWAY = 2.0  # the last epoch's training loss is more than this multiple of the stage's lowest ...
GAVE_BACK = 0.25  # ... and it gave back more than this share of its fall from the first epoch (not noise near 0)


@dataclass(frozen=True)
class Chance:
    """What predicting the class prior scores on the validation split: accuracy (the largest class's share) and
    cross-entropy (the prior's entropy), over ``n`` images."""

    acc: float
    ce: float
    n: int

    @classmethod
    def of(cls, val_labels: torch.Tensor, num_classes: int) -> Chance:
        if len(val_labels) == 0:
            return cls(1.0 / num_classes, math.log(num_classes), 0)
        prior = torch.bincount(val_labels.cpu(), minlength=num_classes).double() / len(val_labels)
        entropy = float(-(prior[prior > 0] * prior[prior > 0].log()).sum())
        return cls(float(prior.max()), entropy, len(val_labels))

    def matched_by(self, acc: float) -> bool:
        """``acc`` is no better than chance beyond three binomial standard errors (+1 point)."""
        return acc <= self.acc + 3 * math.sqrt(self.acc * (1 - self.acc) / max(self.n, 1)) + 0.01


def assess(history: list[dict[str, float]], nonfinite_steps: int, chance: Chance) -> dict[str, Any]:
    """The flags of a finished stage from its per-epoch ``history``: ``{}`` when it trained, else ``{"diverged":
    True}`` or ``{"collapsed": True}``, with a ``flag_reason``."""
    if not history:
        return {}
    losses = [row["train/loss"] for row in history]
    first, last, lowest = losses[0], losses[-1], min(losses)
    ce = history[-1].get("train/ce", last)  # a KD stage's hard-label term; the loss itself for CE stages
    val = history[-1]["val/acc"]
    at_chance = chance.matched_by(val)
    level = f"validation accuracy {100 * val:.1f}% is chance level ({100 * chance.acc:.1f}%)"
    ran_away = last > RAN_AWAY * lowest and last - lowest > GAVE_BACK * (first - lowest)
    if not math.isfinite(last) or ran_away or (nonfinite_steps and at_chance):
        skipped = f", {nonfinite_steps} step(s) skipped for a non-finite loss" if nonfinite_steps else ""
        trend = f"training loss {first:.3g} first epoch, {lowest:.3g} lowest, {last:.3g} last"
        reason = f"the loss diverged ({trend}{skipped})" + (f"; {level}" if at_chance else "")
        return {"diverged": True, "flag_reason": reason}
    # The validation CE only for one epoch: an MNIST student stuck on two classes (20%) over 30 epochs had training
    # CE 2.11 but validation CE 2.05 against ln 10 = 2.30, and only the training CE says that it never learnt.
    split, ce = ("validation", history[-1].get("val/loss", ce)) if len(history) == 1 else ("training", ce)
    if ce >= NOT_FALLEN * chance.ce:  # it never learnt its own training set, whatever validation accuracy shows
        where = level if at_chance else f"validation accuracy {100 * val:.1f}%"
        floor = f"90% of a constant prediction's ({chance.ce:.3g})"
        reason = f"the {split} CE {ce:.3g} did not fall below {floor}; {where}"
        return {"collapsed": True, "flag_reason": reason}
    return {}


def advice(stage: str) -> str:
    """What to change for a flagged stage, in its recipe's keys."""
    recipe = "teacher" if stage.startswith("teacher") else "student"
    return f"lower train.{recipe}.lr, lengthen sched.warmup_epochs or set train.{recipe}.clip_grad_norm (e.g. 1.0)"
