"""The CIFAR zoo of RepDistiller's / mdistiller's tables: parameter counts, their teacher files, the feature taps.

The reference is ``tests/unit/published_zoo.py``, their architectures transcribed with their module names: a
state_dict of it is laid out as their training scripts save it.
"""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from kdrun.core.errors import KdrunError
from kdrun.data import DataSpec
from kdrun.models import build_model, catalogue, count_params
from kdrun.models.checkpoint import load_model, load_model_with_meta
from kdrun.models.features import FeatureTap, default_taps
from tests.unit.published_zoo import PUBLISHED, ResNet, WideResNet

CIFAR100 = DataSpec(num_classes=100, in_channels=3, image_size=32)
ZOO = sorted(PUBLISHED)
# Exact counts for 100 classes, 3 channels (equal to the reference's, asserted below), and the rounded figures in
# millions quoted for RepDistiller's models in issue 17.
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8_cifar": 3_965_028, "vgg11_cifar": 9_277_284, "vgg13_cifar": 9_462_180, "vgg16_cifar": 14_774_436,
    "vgg19_cifar": 20_086_692, "mobilenet_v2_half": 812_836, "shufflenet_v1": 949_258,
    "shufflenet_v2_cifar": 1_355_528, "resnet18_cifar": 11_220_132, "resnet50_cifar": 23_705_252,
}  # fmt: skip
TABLES_M = {
    "resnet56": 0.86, "resnet20": 0.28, "resnet8x4": 1.23, "wrn_40_2": 2.26, "vgg13_cifar": 9.46,
    "mobilenet_v2_half": 0.81, "shufflenet_v1": 0.95, "shufflenet_v2_cifar": 1.36,
}  # fmt: skip


def ours(name: str, spec: DataSpec = CIFAR100, **node) -> nn.Module:
    return build_model({**catalogue.load(name), **node}, spec)


def theirs(name: str, seed: int = 0) -> nn.Module:
    """Their architecture with random weights and random BatchNorm statistics (so that no BN is an identity and a
    swapped pair of BNs shows in the logits), in eval mode."""
    torch.manual_seed(seed)
    model = PUBLISHED[name][1]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1000)
    return model.eval()


def repdistiller_file(path, model: nn.Module, **extra) -> None:
    """What RepDistiller's train_teacher.py saves (``ckpt_epoch_240.pth``; mdistiller ships these as its teachers)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(72.3), **extra}
    torch.save({**state, "optimizer": optimizer.state_dict()}, path)


# --- parameter counts ---------------------------------------------------------------------------------------------


def test_the_zoo_is_in_the_catalogue():
    assert set(ZOO) <= set(catalogue.names())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_are_theirs(name):
    n = count_params(ours(name))
    assert n == count_params(PUBLISHED[name][1]()) == PARAMS[name]
    if name in TABLES_M:
        assert round(n / 1e6, 2) == TABLES_M[name]


# --- their files load and give their logits and features ----------------------------------------------------------


def expected_taps(name: str, feats: list[torch.Tensor], preact: list[torch.Tensor]):
    """The reference's stage outputs, pre-activations and embedding, as kdrun's default taps give them."""
    stages, pre = feats[1:-1], preact[1:-1]
    if name.startswith("wrn_"):  # kdrun's last WRN stage is the activated one: relu(bn1(block3)) (documented)
        stages = [*stages[:-1], torch.relu(pre[-1])]
    return stages, pre, feats[-1]


@pytest.mark.parametrize("name", ZOO)
def test_a_repdistiller_file_gives_their_logits_and_features(name, tmp_path):
    reference = theirs(name)
    repdistiller_file(tmp_path / "ckpt_epoch_240.pth", reference)
    model, meta = load_model_with_meta(tmp_path / "ckpt_epoch_240.pth", catalogue.load(name), CIFAR100, fmt="auto")
    assert meta["checkpoint_format"] == "repdistiller"
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats, preact = reference(x)
        taps = default_taps(model, x)
        tapped = FeatureTap(model, [*taps.stages, *taps.preact, taps.embedding])(x)
    torch.testing.assert_close(tapped[0], logits, rtol=1e-4, atol=1e-4)
    stages, pre, embedding = expected_taps(name, feats, preact)
    got = tapped[1]
    assert len(got) == len(stages) + len(pre) + 1
    for i, want in enumerate([*stages, *pre, embedding]):
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"tap {i}: {m}")


@pytest.mark.parametrize("fmt", ["auto", "mdistiller"])
def test_mdistiller_student_files_and_data_parallel_prefixes_load(fmt, tmp_path):
    reference = theirs("wrn_16_1")
    x = torch.randn(2, 3, 32, 32)
    # mdistiller's trainer: {"model": distiller.module.student.state_dict()}; here saved from a DataParallel model
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "student_best")
    model, meta = load_model_with_meta(tmp_path / "student_best", {"name": "wrn_16_1"}, CIFAR100, fmt=fmt)
    assert meta["checkpoint_format"] == ("repdistiller" if fmt == "auto" else "mdistiller")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x)[0], rtol=1e-4, atol=1e-4)


def test_their_last_file_with_its_argparse_options_loads_as_data(tmp_path):
    reference = theirs("resnet20")
    opt = argparse.Namespace(model="resnet20", learning_rate=0.05, lr_decay_epochs=[150, 180, 210])
    repdistiller_file(tmp_path / "resnet20_last.pth", reference, opt=opt)
    model = load_model(tmp_path / "resnet20_last.pth", {"name": "resnet20"}, CIFAR100, fmt="repdistiller")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x)[0], rtol=1e-4, atol=1e-4)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file when unpickled


def test_a_foreign_file_with_code_in_it_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": theirs("resnet8").state_dict(), "opt": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(KdrunError, match=r"refused by torch.load\(weights_only=True\)"):
        load_model(tmp_path / "evil.pth", {"name": "resnet8"}, CIFAR100, fmt="repdistiller")
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(KdrunError, match="teacher.checkpoint="):
        load_model(tmp_path / "raw.pkl", {"name": "resnet8"}, CIFAR100, fmt="auto")
    assert not marker.exists()


def test_a_plain_state_dict_in_their_names_is_recognised(tmp_path):
    reference = theirs("wrn_40_1")
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}  # torch 0.4.0
    torch.save(state, tmp_path / "wrn.pth")
    model, meta = load_model_with_meta(tmp_path / "wrn.pth", {"name": "wrn_40_1"}, CIFAR100, fmt="auto")
    assert meta["checkpoint_format"] == "repdistiller"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(
        KdrunError, match=r"does not fit wrn_40_1 .*missing keys \(block1\.0\.bn1.*\(read as a kdrun file\)$"
    ):
        load_model(tmp_path / "wrn.pth", {"name": "wrn_40_1"}, CIFAR100, fmt="kdrun")


# --- mismatches are one line naming the format and the first keys -------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_another_architecture_names_the_format_and_the_first_keys(tmp_path):
    repdistiller_file(tmp_path / "r56.pth", ResNet(56, [16, 16, 32, 64]))
    with pytest.raises(KdrunError) as e:
        load_model(tmp_path / "r56.pth", {"name": "resnet20"}, CIFAR100, fmt="auto")
    assert one_line(e).startswith(
        f"teacher.checkpoint={tmp_path / 'r56.pth'} does not fit resnet20 for this dataset"
    ) and str(e.value).endswith("(read as a repdistiller file)")
    assert "unexpected keys (layer1.3.conv1.weight, layer1.3.bn1.weight, layer1.3.bn1.bias, ...)" in str(e.value)
    repdistiller_file(tmp_path / "wrn.pth", WideResNet(40, 2))
    with pytest.raises(
        KdrunError, match=r"does not fit resnet8x4 .*missing keys \(layer1\.0\.conv1.*\(read as a repdistiller file\)$"
    ):
        load_model(tmp_path / "wrn.pth", {"name": "resnet8x4"}, CIFAR100, fmt="auto")


def test_another_class_count_is_a_shape_mismatch_in_their_names(tmp_path):
    repdistiller_file(tmp_path / "r8.pth", ResNet(8, [16, 16, 32, 64], num_classes=100))
    with pytest.raises(KdrunError) as e:
        load_model(tmp_path / "r8.pth", {"name": "resnet8"}, DataSpec(10, 3, 32), fmt="auto")
    assert "shape mismatch (checkpoint vs model): fc.weight (100, 64) vs fc.weight (10, 64)" in one_line(e)


def test_a_named_format_that_does_not_match_the_file_is_one_line(tmp_path):
    repdistiller_file(tmp_path / "r8.pth", ResNet(8, [16, 16, 32, 64]))
    with pytest.raises(KdrunError, match=r"values that are not tensors; it looks like a RepDistiller/mdistiller file"):
        load_model(tmp_path / "r8.pth", {"name": "resnet8"}, CIFAR100, fmt="kdrun")
    torch.save({"weights": [1, 2], "epoch": 3}, tmp_path / "odd.pth")
    with pytest.raises(KdrunError, match=r"is not a mdistiller file: it has no 'model' state_dict .*keys: weights, ep"):
        load_model(tmp_path / "odd.pth", {"name": "resnet8"}, CIFAR100, fmt="mdistiller")
    with pytest.raises(
        KdrunError, match=r"^teacher.checkpoint_format='pickle' is invalid: .*auto, kdrun, repdistiller, mdistiller$"
    ):
        load_model(tmp_path / "r8.pth", {"name": "resnet8"}, CIFAR100, fmt="pickle")


def test_a_whole_mdistiller_distiller_is_refused_with_the_file_to_give(tmp_path):
    student, teacher = theirs("resnet8"), theirs("resnet32")
    state = {f"module.student.{k}": v for k, v in student.state_dict().items()}
    state |= {f"module.teacher.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "best_acc": 73.1}, tmp_path / "best")
    with pytest.raises(KdrunError) as e:
        load_model(tmp_path / "best", {"name": "resnet8"}, CIFAR100, fmt="auto")
    assert "(mdistiller format) holds a whole mdistiller distiller" in one_line(e) and "student_best" in str(e.value)


# --- taps ---------------------------------------------------------------------------------------------------------


def test_preact_taps_are_named_by_the_zoo_and_refused_for_other_models():
    x = torch.randn(2, 3, 32, 32)
    assert default_taps(ours("resnet56"), x).of("preact") == ["layer1.8.add", "layer2.8.add", "layer3.8.add"]
    assert default_taps(ours("shufflenet_v2_cifar"), x).of("preact") == ["layer1.3.cat", "layer2.7.cat", "layer3.3.cat"]
    with pytest.raises(KdrunError, match="names no pre-activation taps"):
        default_taps(ours("resnet18"), x).of("preact")  # torchvision's: only the graph's stages


@pytest.mark.parametrize("name", ["vgg13_cifar", "shufflenet_v1", "mobilenet_v2_half"])
def test_zoo_models_build_for_other_images_and_keep_their_taps(name):
    spec = DataSpec(10, 1, 28)
    model = ours(name, spec).eval()
    x = torch.randn(2, 1, 28, 28)
    taps = default_taps(model, x)
    logits, feats = FeatureTap(model, [*taps.stages, *taps.preact, taps.embedding])(x)
    assert logits.shape == (2, 10) and all(f.dim() == 4 for f in feats[:-1]) and feats[-1].dim() == 2


def test_vgg_pools_its_fourth_block_only_for_64_px_as_theirs():
    pooled = ours("vgg8_cifar", DataSpec(10, 3, 64)).eval()
    taps = default_taps(pooled, torch.randn(1, 3, 64, 64))
    shapes = [f.shape[-1] for f in FeatureTap(pooled, taps.stages)(torch.randn(1, 3, 64, 64))[1]]
    assert shapes == [32, 16, 8, 4]  # 32 px: [16, 8, 4, 4]


# --- through a real run -------------------------------------------------------------------------------------------


def test_a_run_distils_from_a_repdistiller_teacher_file(tmp_path):
    import json

    from kdrun.pipeline.run import run

    repdistiller_file(tmp_path / "ckpt_epoch_240.pth", ResNet(8, [16, 16, 32, 64], num_classes=10))
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["dataset=fake", "teacher=resnet8", f"teacher.checkpoint={tmp_path / 'ckpt_epoch_240.pth'}"]
            + ["teacher.checkpoint_format=repdistiller", "student=resnet8", "loss=at", "baseline=false"]
            + ["train.student.epochs=1", "report.enabled=false", "cache=off", "train.progress=false"],
        )
    run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    teacher = metrics["teacher"]
    assert teacher["source"] == "checkpoint" and teacher["checkpoint_format"] == "repdistiller"
    assert teacher["params"] == count_params(ResNet(8, [16, 16, 32, 64], num_classes=10))
    run(cfg, tmp_path / "run")  # resumed: the run dir's own teacher.safetensors is kdrun's, whatever the file was
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher"] == teacher
