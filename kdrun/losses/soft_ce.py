"""Cross-entropy with the teacher's softened distribution (KD plus the teacher's entropy)."""

from __future__ import annotations

import torch.nn.functional as F

from kdrun.losses.base import LOSSES, HardSoft


@LOSSES.register("soft_ce")
class SoftCE(HardSoft):
    """Cross-entropy with the teacher's softened distribution: KD plus the teacher's entropy (a constant)."""

    formula = "T^2 * H(softmax(t/T), softmax(s/T))"

    def soft_term(self, student, teacher):
        T = self.T
        return -(F.softmax(teacher / T, 1) * F.log_softmax(student / T, 1)).sum(1).mean() * (T * T)
