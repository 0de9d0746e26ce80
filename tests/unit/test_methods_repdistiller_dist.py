"""SP, PKT, NST, VID, CC (RepDistiller's CIFAR-100 methods) and DIST: each value against its paper's formula written
out here with explicit loops in numpy, the layers each one taps, and where its gradients go."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.losses import LossInput, build_objective
from kdrun.losses.cc import gaussian_correlation, repdistiller_correlation
from kdrun.losses.nst import neuron_selectivity
from kdrun.losses.pkt import probabilistic_transfer
from kdrun.losses.sp import similarity_preserving
from tests.unit.test_feature_losses import SHAPES, example, model, step

RNG = np.random.default_rng(0)


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64)


# --- values by the papers' formulas --------------------------------------------------------------------------------


def sp_by_loops(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """Tung & Mori eq. 2-4: G = A A^T of the flattened activations, each row divided by its L2 norm, and
    ||G_t - G_s||_F^2 / b^2."""
    b = len(f_s)

    def g(f):
        f = rows(f)
        gram = [[sum(f[i, k] * f[j, k] for k in range(f.shape[1])) for j in range(b)] for i in range(b)]
        return [[gram[i][j] / math.sqrt(sum(v * v for v in gram[i])) for j in range(b)] for i in range(b)]

    g_s, g_t = g(f_s), g(f_t)
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_similarity_preserving_by_the_papers_formula():
    f_s, f_t = RNG.normal(size=(3, 2, 2, 2)), RNG.normal(size=(3, 5, 1, 3))  # only the batch sizes agree
    expected = sp_by_loops(f_s, f_t)
    assert similarity_preserving(tensor(f_s), tensor(f_t)).item() == pytest.approx(expected, rel=1e-5)
    # Each row of G is normalised: scaling the student's activations changes nothing.
    assert similarity_preserving(tensor(7 * f_s), tensor(f_t)).item() == pytest.approx(expected, rel=1e-5)
    assert similarity_preserving(tensor(f_t), tensor(f_t)).item() == pytest.approx(0.0, abs=1e-7)


def pkt_by_loops(f_s: np.ndarray, f_t: np.ndarray, eps: float = 1e-7) -> float:
    """Passalis & Tefas eq. 7-10 with the cosine kernel: p(j|i) = K_ij / sum_k K_ik, K = (cos + 1) / 2, and the
    mean over (i, j) of p_t log(p_t / p_s) (the authors' code adds eps to both)."""

    def p(f):
        f = rows(f)
        unit = [f[i] / (math.sqrt(sum(v * v for v in f[i])) + eps) for i in range(len(f))]
        k = [[(float(np.dot(unit[i], unit[j])) + 1) / 2 for j in range(len(f))] for i in range(len(f))]
        return [[k[i][j] / sum(k[i]) for j in range(len(f))] for i in range(len(f))]

    p_s, p_t = p(f_s), p(f_t)
    n = len(f_s)
    terms = [p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)]
    return sum(terms) / n**2


def test_probabilistic_transfer_by_the_papers_formula():
    f_s, f_t = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 6))
    expected = pkt_by_loops(f_s, f_t)
    assert expected > 0
    assert probabilistic_transfer(tensor(f_s), tensor(f_t)).item() == pytest.approx(expected, rel=1e-4)
    assert probabilistic_transfer(tensor(3 * f_t), tensor(f_t)).item() == pytest.approx(0.0, abs=1e-6)


def mmd_by_loops(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """Huang & Wang eq. 8 with the polynomial kernel k(x, y) = (x . y)^2: each channel's map, L2-normalised over
    its positions, is one sample; the squared MMD between the two channel sets, averaged over the batch."""

    def channels(f):
        return [c.ravel() / np.linalg.norm(c.ravel()) for c in f]

    def mean_k(a, b):
        return sum(float(np.dot(x, y)) ** 2 for x in a for y in b) / (len(a) * len(b))

    per_sample = []
    for s, t in zip(f_s, f_t, strict=True):
        s, t = channels(s), channels(t)
        per_sample.append(mean_k(s, s) + mean_k(t, t) - 2 * mean_k(s, t))
    return sum(per_sample) / len(per_sample)


def test_neuron_selectivity_by_the_papers_formula():
    f_s, f_t = RNG.normal(size=(2, 2, 4, 4)), RNG.normal(size=(2, 3, 2, 2))  # 2 vs 3 channels, 4x4 vs 2x2 maps
    pooled = f_s.reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # the 4x4 student map averaged over 2x2 blocks
    expected = mmd_by_loops(pooled, f_t)
    assert neuron_selectivity(tensor(f_s), tensor(f_t)).item() == pytest.approx(expected, rel=1e-5)
    scaled = f_t * np.array([2.0, 0.5, 9.0]).reshape(1, 3, 1, 1)  # each channel is normalised: per-channel scale
    assert neuron_selectivity(tensor(scaled), tensor(f_t)).item() == pytest.approx(0.0, abs=1e-6)


def test_vid_by_the_papers_formula():
    # Identity regressor (positive inputs pass the ReLUs), so mu(s) is the student's map pooled to the teacher's.
    objective = build_objective({"name": "vid", "vid_weight": 3.0}, T=2.0, alpha=0.5)
    objective.build([(2, 2, 4, 4)], [(2, 2, 2, 2)])
    q = objective.regressors[0]
    assert q.variance().detach().numpy() == pytest.approx([5.0, 5.0], rel=1e-6)  # the authors' initial variance
    with torch.no_grad():
        for conv in q.mean:
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        q.log_scale.copy_(torch.tensor([0.0, 1.5]))
    f_s, f_t = RNG.uniform(0.1, 2.0, size=(2, 2, 4, 4)), RNG.normal(size=(2, 2, 2, 2))
    mu = f_s.reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))
    var = [math.log(1 + math.exp(0.0)) + 1e-5, math.log(1 + math.exp(1.5)) + 1e-5]  # softplus + eps per channel
    nll = [
        0.5 * ((f_t[n, c, i, j] - mu[n, c, i, j]) ** 2 / var[c] + math.log(var[c]))
        for n in range(2)
        for c in range(2)
        for i in range(2)
        for j in range(2)
    ]
    expected = sum(nll) / len(nll)
    s_logits, t_logits, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([1])
    total, terms = objective(LossInput(s_logits, y, t_logits, [tensor(f_s)], [tensor(f_t)]))
    assert terms["vid"].item() == pytest.approx(expected, rel=1e-5)
    kd_total = build_objective({"name": "kd"}, 2.0, 0.5)(LossInput(s_logits, y, t_logits))[0]
    assert total.item() == pytest.approx(kd_total.item() + 3.0 * expected, rel=1e-5)


def test_vid_takes_a_vector_layer_as_a_one_by_one_map():
    objective = build_objective({"name": "vid"}, 4.0, 0.2)
    objective.build([(3, 8)], [(3, 4, 2, 2)])  # an MLP student's embedding against a teacher's stage
    q = objective.regressors[0]
    assert q.mean[0].in_channels == 8 and q.mean[-1].out_channels == 4
    assert torch.isfinite(q(torch.randn(3, 8), torch.randn(3, 4, 2, 2)))


def test_cc_repdistiller_kernel_by_its_code():
    # RepDistiller's CC.py: d = |e_s - e_t|, mean over i of sum_k d[i, k] * d[i + 1, k].
    e_s, e_t = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    d = np.abs(e_s - e_t)
    expected = sum(sum(d[i, k] * d[i + 1, k] for k in range(3)) for i in range(3)) / 3
    assert repdistiller_correlation(tensor(e_s), tensor(e_t)).item() == pytest.approx(expected, rel=1e-5)
    assert repdistiller_correlation(tensor(e_s[:1]), tensor(e_t[:1])).item() == 0.0  # a last batch of one

    # Through the objective: both embeddings go through their learned linear layers first (here the identity).
    objective = build_objective({"name": "cc", "embed_dim": 3}, T=4.0, alpha=1.0)
    objective.build([(4, 3)], [(4, 3)])
    with torch.no_grad():
        for embed in (objective.student_embeds[0], objective.teacher_embeds[0]):
            embed.weight.copy_(torch.eye(3))
            embed.bias.zero_()
    y, logits = torch.tensor([0, 1, 0, 1]), torch.zeros(4, 2)
    total, terms = objective(LossInput(logits, y, logits, [tensor(e_s)], [tensor(e_t)]))
    assert objective.cc_weight == 0.02  # RepDistiller's -b for CC
    assert terms["cc"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(math.log(2) + 0.02 * expected, rel=1e-5)  # alpha=1: CE + weight * CC


def test_cc_gaussian_kernel_by_the_papers_formula():
    e_s, e_t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 6))
    gamma, order = 0.4, 2

    def correlation(e, order):
        unit = [v / np.linalg.norm(v) for v in e]
        return [
            [
                sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(np.dot(a, b)) ** p
                    for p in range(order + 1)
                )
                for b in unit
            ]
            for a in unit
        ]

    c_s, c_t = correlation(e_s, order), correlation(e_t, order)
    assert gaussian_correlation(tensor(e_s), gamma, order).numpy() == pytest.approx(np.array(c_s), rel=1e-5)
    # The Taylor series converges to the Gaussian RBF exp(-gamma ||x - y||^2) of the unit vectors.
    unit = e_s / np.linalg.norm(e_s, axis=1, keepdims=True)
    rbf = np.exp(-gamma * ((unit[:, None] - unit[None]) ** 2).sum(-1))
    assert gaussian_correlation(tensor(e_s), gamma, 10).numpy() == pytest.approx(rbf, rel=1e-5)

    objective = build_objective({"name": "cc", "kernel": "gaussian"}, T=4.0, alpha=1.0)
    objective.build([(3, 4)], [(3, 6)])
    assert len(list(objective.parameters())) == 0 and objective.cc_weight == 100.0  # no learned parts
    logits, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])
    _, terms = objective(LossInput(logits, y, logits, [tensor(e_s)], [tensor(e_t)]))
    expected = sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert terms["cc"].item() == pytest.approx(expected, rel=1e-5)


def test_dist_by_the_papers_formula():
    z_s, z_t = RNG.normal(size=(5, 4)) * 3, RNG.normal(size=(5, 4)) * 3
    T = 4.0

    def softmax(z):
        e = np.exp(z / T - (z / T).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_s, p_t = softmax(z_s), softmax(z_t)
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(4)])
    objective = build_objective({"name": "dist", "inter_weight": 1.5, "intra_weight": 0.5}, T=T, alpha=0.3)
    s, t, y = tensor(z_s), tensor(z_t), torch.tensor([0, 1, 2, 3, 0])
    total, terms = objective(LossInput(s, y, t))
    assert terms["dist_inter"].item() == pytest.approx(T * T * inter, rel=1e-4)
    assert terms["dist_intra"].item() == pytest.approx(T * T * intra, rel=1e-4)
    kd_total = build_objective({"name": "kd"}, T, 0.3)(LossInput(s, y, t))[0]
    expected = kd_total.item() + 1.5 * T * T * inter + 0.5 * T * T * intra
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # Only the relations count: a per-sample shift of the logits leaves the probabilities, hence both terms, alone.
    _, same = objective(LossInput(t + torch.arange(5.0).view(5, 1), y, t))
    assert same["dist_inter"].item() == pytest.approx(0.0, abs=1e-5)
    assert same["dist_intra"].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="DIST needs teacher logits"):
        objective(LossInput(s, y))


# --- taps and gradients --------------------------------------------------------------------------------------------


def test_default_taps_follow_repdistiller():
    spec = SHAPES["3ch_32px"]
    student, teacher, x = model("resnet20", spec), model("resnet8", spec), example(spec)
    expected = {  # RepDistiller: SP feat[-2], PKT and CC feat[-1], NST and VID feat[1:-1]
        "sp": ["layer3"],
        "pkt": ["flatten"],
        "cc": ["flatten"],
        "nst": ["layer1", "layer2", "layer3"],
        "vid": ["layer1", "layer2", "layer3"],
    }
    for name, layers in expected.items():
        objective = build_objective({"name": name}, 4.0, 0.2)
        objective.bind(student, teacher, x)
        assert (objective.student_layers, objective.teacher_layers) == (layers, layers), name
    named = {"name": "sp", "student_layers": ["layer2", "layer3"], "teacher_layers": ["layer2", "layer3"]}
    objective = build_objective(named, 4.0, 0.2)
    objective.bind(student, teacher, x)
    assert objective.student_layers == ["layer2", "layer3"]  # named layers are all kept


def test_nst_refuses_layers_without_spatial_maps():
    spec = SHAPES["1ch_28px"]
    objective = build_objective({"name": "nst"}, 4.0, 0.2)
    with pytest.raises(KdrunError, match="loss=nst needs spatial feature maps, but the student's layer 'net.6'"):
        objective.bind(model("mlp", spec), model("resnet8", spec), example(spec))


@pytest.mark.parametrize("loss, learned", [("sp", False), ("pkt", False), ("nst", False), ("vid", True), ("cc", True)])
def test_feature_terms_reach_the_student_and_learned_parts_never_the_teacher(loss, learned):
    torch.manual_seed(0)
    spec = SHAPES["1ch_28px"]
    student, teacher = model("small_cnn", spec), model("resnet8", spec)
    x, y = example(spec, 8), torch.randint(0, 10, (8,))
    objective = build_objective({"name": loss}, 4.0, 0.2)
    _, terms = step(student, teacher, objective, x, y)
    terms[loss].backward()  # the feature term alone
    first_conv = student.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    parameters = list(objective.parameters())  # VID's regressors and variances, CC's two embeddings
    assert (len(parameters) > 0) == learned
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
