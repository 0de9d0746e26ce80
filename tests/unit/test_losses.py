"""The objectives against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses import LOSSES, LossInput, build_objective


def test_kd_matches_hand_computed_value():
    # Two classes, one sample: every quantity can be written out.
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.25
    ps = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax(s / T)
    pt = [ps[1], ps[0]]  # softmax(t / T)
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    total, terms = build_objective({"name": "kd"}, T, alpha)(LossInput(s, y, t))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(T * T * kl, rel=1e-6)  # T^2 scaling
    assert total.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, rel=1e-6)


def test_kd_is_batchmean_summed_over_classes():
    torch.manual_seed(0)
    s, t = torch.randn(8, 100), torch.randn(8, 100)
    y = torch.randint(0, 100, (8,))
    T = 3.0
    _, terms = build_objective({"name": "kd"}, T, 0.5)(LossInput(s, y, t))
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    per_sample = (pt * (pt.log() - ps.log())).sum(1)  # summed over classes
    assert terms["kd"].item() == pytest.approx(T * T * per_sample.mean().item(), rel=1e-5)  # mean over batch only
    # the classic bug (KLDivLoss's default 'mean') divides by the class count as well:
    assert terms["kd"].item() != pytest.approx(T * T * per_sample.mean().item() / 100, rel=1e-2)


def test_kd_is_zero_when_student_equals_teacher():
    logits = torch.randn(16, 10)
    _, terms = build_objective({"name": "kd"}, 4.0, 0.2)(
        LossInput(logits, torch.zeros(16, dtype=torch.long), logits.clone())
    )
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_weights_are_alpha_and_one_minus_alpha(alpha):
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    for name in ("kd", "soft_ce", "mse"):
        total, terms = build_objective({"name": name}, 4.0, alpha)(LossInput(s, y, t))
        assert total.item() == pytest.approx(alpha * terms["ce"].item() + (1 - alpha) * terms["kd"].item(), rel=1e-6)


def test_soft_ce_differs_from_kd_by_teacher_entropy():
    torch.manual_seed(2)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    T = 4.0
    _, kd = build_objective({"name": "kd"}, T, 0.2)(LossInput(s, y, t))
    _, soft = build_objective({"name": "soft_ce"}, T, 0.2)(LossInput(s, y, t))
    pt = F.softmax(t / T, 1)
    entropy = -(pt * pt.log()).sum(1).mean().item()
    assert soft["kd"].item() == pytest.approx(kd["kd"].item() + T * T * entropy, rel=1e-5)


def test_mse_is_mean_squared_logit_difference():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    _, terms = build_objective({"name": "mse"}, 4.0, 0.2)(LossInput(s, torch.tensor([0]), t))
    assert terms["kd"].item() == pytest.approx((4 + 4) / 2)


def test_ce_needs_no_teacher_and_is_cross_entropy():
    s, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    objective = build_objective({"name": "ce"}, 4.0, 0.2)
    assert not objective.needs_teacher
    total, terms = objective(LossInput(s, y))
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item())
    assert set(terms) == {"ce"}


@pytest.mark.parametrize("name", ["kd", "soft_ce", "mse", "dkd", {"name": "kd", "standardize": True}])
def test_gradients_reach_the_student_only(name):
    torch.manual_seed(3)
    student = torch.nn.Linear(4, 10)
    teacher = torch.nn.Linear(4, 10)
    x, y = torch.randn(8, 4), torch.randint(0, 10, (8,))
    with torch.no_grad():
        t = teacher(x)
    loss, _ = build_objective(name if isinstance(name, dict) else {"name": name}, 4.0, 0.2)(LossInput(student(x), y, t))
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None


def test_describe_spells_out_both_weights():
    assert "CE weight 0.2, KD weight 0.8" in build_objective({"name": "kd"}, 4.0, 0.2).describe()


def test_every_registered_loss_has_a_yaml():
    from importlib.resources import files

    from omegaconf import OmegaConf

    folder = files("kdrun.conf") / "loss"
    yamls = {p.name[:-5]: OmegaConf.load(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}
    assert set(LOSSES.names()) <= set(yamls)  # every loss has its YAML ...
    for option, cfg in yamls.items():  # ... and every YAML builds (lskd is kd with standardize=true)
        assert cfg.name in LOSSES, option
        build_objective(cfg, 4.0, 0.2)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_dkd_terms_match_hand_computed_values():
    s, t, y, T = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 0, 2.0
    ps, pt = _softmax([v / T for v in s]), _softmax([v / T for v in t])
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]]) * T * T
    nckd = _kl(_softmax([t[1] / T, t[2] / T]), _softmax([s[1] / T, s[2] / T])) * T * T
    dkd = build_objective({"name": "dkd", "tckd_weight": 1.0, "nckd_weight": 8.0, "warmup_epochs": 0}, T, 0.3)
    total, terms = dkd(LossInput(torch.tensor([s]), torch.tensor([y]), torch.tensor([t])))
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    ce = -math.log(_softmax(s)[0])
    assert total.item() == pytest.approx(0.3 * ce + 0.7 * (tckd + 8 * nckd), rel=1e-5)


def test_dkd_decomposes_kd_as_the_paper_says():
    # Zhao et al., eq. 7: KD = TCKD + (1 - p_t(target)) * NCKD, per sample.
    torch.manual_seed(1)
    for _ in range(5):
        s, t, y = torch.randn(1, 7), torch.randn(1, 7) * 3, torch.randint(0, 7, (1,))
        T = 3.0
        _, kd = build_objective({"name": "kd"}, T, 0.0)(LossInput(s, y, t))
        _, terms = build_objective({"name": "dkd", "warmup_epochs": 0}, T, 0.0)(LossInput(s, y, t))
        p_target = F.softmax(t / T, 1)[0, y].item()
        assert kd["kd"].item() == pytest.approx(terms["tckd"].item() + (1 - p_target) * terms["nckd"].item(), rel=1e-4)


def test_dkd_warms_up_linearly():
    dkd = build_objective({"name": "dkd", "warmup_epochs": 20}, 4.0, 0.0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    dkd.set_epoch(20)
    full, terms = dkd(LossInput(s, y, t))
    dkd.set_epoch(5)
    assert dkd(LossInput(s, y, t))[0].item() == pytest.approx(0.25 * full.item(), rel=1e-6)
    dkd.set_epoch(40)
    assert dkd(LossInput(s, y, t))[0].item() == pytest.approx(full.item(), rel=1e-6)
    assert full.item() == pytest.approx((terms["tckd"] + 8 * terms["nckd"]).item(), rel=1e-6)


def test_logit_standardization_ignores_the_scale_and_shift_of_each_samples_logits():
    torch.manual_seed(2)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    lskd = build_objective({"name": "kd", "standardize": True}, 2.0, 0.0)
    scale, shift = torch.rand(6, 1) * 5 + 0.1, torch.randn(6, 1) * 10
    a, b = lskd(LossInput(s, y, t))[1]["kd"], lskd(LossInput(s * scale + shift, y, t * 2 - 3))[1]["kd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    z = lambda v: (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)  # noqa: E731
    plain = build_objective({"name": "kd"}, 2.0, 0.0)(LossInput(z(s), y, z(t)))[1]["kd"]
    assert a.item() == pytest.approx(plain.item(), rel=1e-5)
    unstandardized = build_objective({"name": "kd"}, 2.0, 0.0)(LossInput(s * scale, y, t))[1]["kd"]
    assert unstandardized.item() != pytest.approx(a.item())
