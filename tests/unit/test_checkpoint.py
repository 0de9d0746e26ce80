"""Model files: atomic, safe to load, and checked against the run's model and data."""

import os
import pickle

import pytest
import torch

from kdrun.core.errors import KdrunError
from kdrun.core.io import atomic_save
from kdrun.data import DataSpec
from kdrun.models import build_model
from kdrun.models.checkpoint import load_model, read_checkpoint, save_model

SPEC = DataSpec(num_classes=10, in_channels=1, image_size=8)
CNN = {"name": "small_cnn", "channels": [16, 32], "hidden": 128, "dropout": 0.1}


def test_round_trip_restores_the_same_outputs(tmp_path):
    model = build_model(CNN, SPEC).eval()
    save_model(tmp_path / "m.pt", model, {**CNN, "checkpoint": None}, SPEC, epoch=3)
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["model_cfg"] == CNN and ckpt["num_classes"] == 10 and ckpt["in_channels"] == 1 and ckpt["epoch"] == 3
    loaded = load_model(tmp_path / "m.pt", CNN, SPEC).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_plain_state_dict_is_accepted(tmp_path):
    model = build_model(CNN, SPEC)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    load_model(tmp_path / "sd.pt", CNN, SPEC)


def test_other_architecture_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m.pt", build_model({"name": "mlp"}, SPEC), {"name": "mlp"}, SPEC)
    with pytest.raises(KdrunError, match=r"holds a mlp but the run's model is small_cnn"):
        load_model(tmp_path / "m.pt", CNN, SPEC)
    torch.save(build_model({"name": "mlp"}, SPEC).state_dict(), tmp_path / "sd.pt")  # no metadata to compare
    with pytest.raises(KdrunError, match=r"does not fit small_cnn .*missing keys"):
        load_model(tmp_path / "sd.pt", CNN, SPEC)


def test_other_class_or_channel_count_is_a_clear_error(tmp_path):
    save_model(tmp_path / "c.pt", build_model(CNN, DataSpec(100, 1, 8)), CNN, DataSpec(100, 1, 8))
    with pytest.raises(KdrunError, match="num_classes=100 but the dataset has num_classes=10"):
        load_model(tmp_path / "c.pt", CNN, SPEC)
    save_model(tmp_path / "ch.pt", build_model(CNN, DataSpec(10, 3, 8)), CNN, DataSpec(10, 3, 8))
    with pytest.raises(KdrunError, match="in_channels=3 but the dataset has in_channels=1"):
        load_model(tmp_path / "ch.pt", CNN, SPEC)


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file when unpickled


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"state_dict": {}, "x": _Payload(str(marker))}, f)
    assert not marker.exists()
    with pytest.raises(KdrunError, match="refused by torch.load\\(weights_only=True\\)"):
        read_checkpoint(tmp_path / "evil.pt", "teacher.checkpoint")
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:  # a bare pickle, not even a torch zip file
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(KdrunError, match="teacher.checkpoint="):
        read_checkpoint(tmp_path / "raw.pkl", "teacher.checkpoint")
    assert not marker.exists()


def test_truncated_or_missing_file_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m.pt", build_model(CNN, SPEC), CNN, SPEC)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdrunError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(KdrunError, match="no such file"):
        read_checkpoint(tmp_path / "absent.pt")


def test_failed_write_leaves_the_previous_file_intact(tmp_path):
    atomic_save({"v": torch.tensor(1)}, tmp_path / "a.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": Unpicklable()}, tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["v"].item() == 1
    assert os.listdir(tmp_path) == ["a.pt"]
