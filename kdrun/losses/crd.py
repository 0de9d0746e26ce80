"""Contrastive Representation Distillation (Tian et al. ICLR 2020): NCE between the two models' embeddings, with
negatives drawn from a memory bank of every training sample.

Checked against RepDistiller (HobbitLong/RepDistiller: crd/criterion.py, crd/memory.py, dataset/cifar100.py's
``CIFAR100InstanceSample``, train_student.py's defaults) and mdistiller's copy (mdistiller/distillers/CRD.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.core import distributed
from kdrun.core.errors import KdrunError
from kdrun.core.schema import Range, Weight, Width
from kdrun.losses.base import LOSSES, LossInput
from kdrun.losses.feature import FeatureObjective, Layers

Negatives = Annotated[int, Range(ge=1, le=1_000_000)]
NceTemperature = Annotated[float, Range(gt=0, le=100)]
Momentum = Annotated[float, Range(ge=0, lt=1)]
EPS = 1e-7  # RepDistiller's, in the NCE loss's denominators


class Embed(nn.Module):
    """A linear map of the (flattened) feature to ``dim``, L2-normalised (RepDistiller's ``Embed``)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of Tian et al. (eq. 18; RepDistiller's ``ContrastLoss``), summed over the pairs, averaged over
    the anchors. ``p`` [B, 1 + K]: each anchor's estimated P(sample | anchor) (``exp(v . m / tau) / Z``) for its
    positive (column 0) and its K negatives; the noise distribution is uniform over the ``n_data`` samples:

        -1/B sum_b [ log(p_b+ / (p_b+ + K/N)) + sum_k log((K/N) / (p_bk + K/N)) ]
    """
    noise = (p.shape[1] - 1) / n_data  # K * Pn
    positive, negatives = p[:, 0], p[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + EPS))
    log_d0 = torch.log(noise / (negatives + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


class ContrastMemory(nn.Module):
    """The memory bank: one embedding per training sample for each model, updated with momentum, and the draw of
    negatives (RepDistiller's ``ContrastMemory`` and the ``exact`` mode of its CIFAR-100 sampler).

    Buffers (saved with the training state): both banks, the normalisation constants Z (estimated once, on the first
    batch, as the mean of ``exp(score / tau)`` times the number of samples, then fixed). The extra state holds the
    negative sampler's generator, so that a resumed run draws the same negatives as an uninterrupted one.
    """

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor

    def __init__(self, labels: torch.Tensor, dim: int, negatives: int, temperature: float, momentum: float):
        super().__init__()
        labels = labels.detach().long().flatten().cpu()
        n = len(labels)
        classes = torch.bincount(labels)
        classes = classes[classes > 0]
        if len(classes) < 2:
            raise KdrunError(f"loss=crd draws negatives from other classes, but the training split has {len(classes)}")
        self.k, self.temperature, self.momentum = int(negatives), float(temperature), float(momentum)
        # Without replacement where every class has K samples of other classes (RepDistiller decides per class).
        self.replace = self.k > int(n - classes.max())
        stdv = 1.0 / math.sqrt(dim / 3)  # RepDistiller's initial bank: uniform in [-stdv, stdv]
        self.register_buffer("memory_s", torch.rand(n, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z for the student's and the teacher's anchors
        self.register_buffer("labels", labels, persistent=False)
        order = torch.argsort(labels, stable=True)  # sample indices grouped by class, for draws with replacement
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.seed = int(torch.randint(0, 2**62, ()).item())
        self.sampler: torch.Generator | None = None
        self.pending: torch.Tensor | None = None  # a loaded sampler state, applied when the sampler is made

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "sampler": None if self.sampler is None else self.sampler.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed, self.pending, self.sampler = int(state["seed"]), state["sampler"], None

    def generator(self, device: torch.device) -> torch.Generator:
        """The negatives' own random stream, on ``device`` (made at the first draw, from a loaded state if any)."""
        if self.sampler is None or self.sampler.device != device:
            self.sampler = torch.Generator(device=device)
            self.sampler.manual_seed(self.seed)
            if self.pending is not None:
                self.sampler.set_state(self.pending)
                self.pending = None
        return self.sampler

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """[B, K] indices of samples of another class than each anchor's, uniform; without replacement unless some
        class has fewer than K samples of other classes."""
        g, device = self.generator(index.device), index.device
        anchor = self.labels[index]
        if not self.replace:  # the K smallest of uniform keys, same-class samples excluded: a uniform K-subset
            keys = torch.rand(len(index), len(self.labels), generator=g, device=device)
            keys.masked_fill_(self.labels.unsqueeze(0) == anchor.unsqueeze(1), 2.0)
            return keys.topk(self.k, dim=1, largest=False).indices
        # With replacement: a position among the other classes' samples (the class-sorted order minus the anchor's
        # block), mapped back to a sample index.
        count, start = self.counts[anchor].unsqueeze(1), self.starts[anchor].unsqueeze(1)
        u = torch.rand(len(index), self.k, generator=g, device=device)
        pos = (u * (len(self.labels) - count)).long().clamp_max(len(self.labels) - count - 1)
        return self.order[pos + count * (pos >= start)]

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NCE losses with the student's embeddings as anchors (against the teacher's bank) and with the
        teacher's (against the student's bank); then both banks take the batch's embeddings."""
        n = len(self.labels)
        idx = torch.cat([index.unsqueeze(1), self.negatives(index)], 1)  # column 0: the positive, the sample itself
        # One product with the whole bank, then the drawn columns: cheaper than gathering [B, 1 + K, dim] rows.
        p_s = torch.exp(torch.gather(v_s @ self.memory_t.t(), 1, idx) / self.temperature)
        p_t = torch.exp(torch.gather(v_t @ self.memory_s.t(), 1, idx) / self.temperature)
        estimate = torch.stack([p_s.detach().mean(), p_t.detach().mean()]) * n
        self.z.copy_(torch.where((self.z < 0) & torch.isfinite(estimate), estimate, self.z))
        losses = nce_loss(p_s / self.z[0], n), nce_loss(p_t / self.z[1], n)
        self.update(index, v_s.detach(), v_t.detach())
        return losses

    @torch.no_grad()
    def update(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Each sample's bank entry <- normalise(momentum * entry + (1 - momentum) * embedding). Out of place: this
        step's backward still needs the bank it was scored against. Non-finite embeddings leave their rows alone."""
        for name, v in (("memory_s", v_s), ("memory_t", v_t)):
            bank = getattr(self, name)
            old = bank[index]
            new = F.normalize(old * self.momentum + v * (1 - self.momentum), dim=1)
            new = torch.where(torch.isfinite(new).all(1, keepdim=True), new, old)
            setattr(self, name, bank.index_copy(0, index, new))


@LOSSES.register("crd")
class CRD(FeatureObjective):
    """Contrastive Representation Distillation (Tian et al. ICLR 2020): both models' embeddings are mapped by learned
    heads to ``feat_dim`` unit vectors, and an NCE loss tells each sample's teacher embedding from ``nce_k``
    samples of other classes (in the memory bank), in both directions:

        L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(...) + crd_weight * (NCE_student_anchors + NCE_teacher_anchors)

    Default taps: each model's embedding. The heads train with the student; the bank is saved with the training
    state. The paper's CIFAR-100 defaults are in conf/loss/crd.yaml.
    """

    tap_kind = "embedding"
    uses_index = True

    def __init__(  # noqa: PLR0913 - the method's own options, each a config key
        self,
        T: float = 4.0,
        alpha: float = 0.2,
        crd_weight: Weight = 0.8,
        feat_dim: Width = 128,
        nce_k: Negatives = 16384,
        nce_t: NceTemperature = 0.07,
        nce_m: Momentum = 0.5,
        student_layers: Layers = None,
        teacher_layers: Layers = None,
    ):
        super().__init__(T, alpha, student_layers, teacher_layers)
        self.crd_weight, self.feat_dim = float(crd_weight), int(feat_dim)
        self.nce_k, self.nce_t, self.nce_m = int(nce_k), float(nce_t), float(nce_m)
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.memory: ContrastMemory | None = None

    def weights(self):
        return {"crd": self.crd_weight}

    def build(self, student_shapes, teacher_shapes):
        if distributed.world_size() > 1:  # checked here too, so that preflight refuses it before any training
            raise KdrunError(
                "loss=crd keeps its memory bank on one process; run it without torchrun (one process, one device)"
            )
        if len(student_shapes) != 1:
            raise KdrunError(
                f"loss=crd contrasts one embedding per model, not {len(student_shapes)} layers: give one name in "
                "loss.student_layers and loss.teacher_layers (or null for the embeddings)"
            )
        if self.embed_s is None:  # a second bind (after an init phase) keeps the trained heads
            self.embed_s = Embed(math.prod(student_shapes[0][1:]), self.feat_dim)
            self.embed_t = Embed(math.prod(teacher_shapes[0][1:]), self.feat_dim)

    def bind_data(self, labels: torch.Tensor) -> None:
        if self.memory is None or not torch.equal(self.memory.labels.cpu(), labels.detach().long().cpu()):
            self.memory = ContrastMemory(labels, self.feat_dim, self.nce_k, self.nce_t, self.nce_m)

    def describe(self) -> str:
        return (
            f"{super().describe()}; NCE with {self.nce_k} negatives of other classes, tau={self.nce_t:g}, "
            f"{self.feat_dim}-d embeddings, bank momentum {self.nce_m:g}"
        )

    def forward(self, inputs: LossInput):
        if inputs.teacher is None or not inputs.teacher_features:
            raise ValueError("CRD needs teacher logits and both models' features")
        if inputs.index is None or self.memory is None or self.embed_s is None or self.embed_t is None:
            raise ValueError("CRD needs bind() and bind_data() before training, and each sample's index")
        total, terms = self.logit_kd(inputs)
        v_s = self.embed_s(inputs.student_features[0].float())
        v_t = self.embed_t(inputs.teacher_features[0].detach().float())
        loss_s, loss_t = self.memory(v_s, v_t, inputs.index)
        crd = loss_s + loss_t
        return total + self.crd_weight * crd, {**terms, "crd": crd}
