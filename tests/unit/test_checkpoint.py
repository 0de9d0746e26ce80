"""Model files: safetensors without pickle, atomic, safe to load, checked against the run's model and data; the
``torch.save`` files of earlier kdrun versions and plain state_dicts still load."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdrun import __version__
from kdrun.core.errors import KdrunError
from kdrun.core.io import atomic_save
from kdrun.data import DataSpec
from kdrun.models import build_model
from kdrun.models.checkpoint import (
    find_model_file,
    load_model,
    read_checkpoint,
    save_model,
    weights_size,
    write_checkpoint,
)

SPEC = DataSpec(num_classes=10, in_channels=1, image_size=8)
CNN = {"name": "small_cnn", "channels": [16, 32], "hidden": 128, "dropout": 0.1}


HISTORY = [
    {"epoch": 1, "lr": 0.1, "train/loss": 2.25, "val/acc": 0.5},
    {"epoch": 2, "lr": 0.05, "val/acc": float("nan")},
]


def test_round_trip_restores_the_same_outputs(tmp_path):
    model = build_model(CNN, SPEC).eval()
    save_model(tmp_path / "m.safetensors", model, {**CNN, "checkpoint": None}, SPEC, epoch=3)
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    assert ckpt["model_cfg"] == CNN and ckpt["num_classes"] == 10 and ckpt["in_channels"] == 1 and ckpt["epoch"] == 3
    loaded = load_model(tmp_path / "m.safetensors", CNN, SPEC).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_model_file_is_safetensors_alone_with_its_metadata_in_the_header(tmp_path):
    model = build_model(CNN, SPEC)
    path = tmp_path / "m.safetensors"
    save_model(path, model, CNN, SPEC, epoch=2, history=HISTORY, source="here")
    with safe_open(path, framework="pt") as f:  # the safetensors library alone reads it back
        meta = json.loads(f.metadata()["kdrun"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["model_cfg"] == CNN and meta["kdrun_version"] == __version__ and meta["source"] == "here"
    assert (meta["num_classes"], meta["in_channels"], meta["image_size"], meta["epoch"]) == (10, 1, 8, 2)
    assert meta["history"][0] == HISTORY[0] and meta["history"][1]["val/acc"] != meta["history"][1]["val/acc"]  # NaN
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    # No pickle anywhere: every byte is the 8-byte length, the JSON header or a tensor's data span.
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert 8 + size + spans[-1][1] == len(data)
    assert not data.startswith((b"PK", b"\x80"))  # neither a torch.save zip nor a bare pickle


def test_the_same_model_and_metadata_give_the_same_bytes(tmp_path):
    # a resumed stage's history rows are half read back from its training state: other string objects, same text
    model = build_model(CNN, SPEC)
    rows = [{"epoch": e, "".join(["train/", "loss"]): 0.5, "lr": 0.1} for e in (1, 2, 3)]
    save_model(tmp_path / "a.safetensors", model, CNN, SPEC, history=[{**r} for r in rows])
    save_model(tmp_path / "b.safetensors", model, CNN, SPEC, history=json.loads(json.dumps(rows)))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_the_weights_size_is_the_tensor_data_whatever_the_metadata(tmp_path):
    model = build_model(CNN, SPEC)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_model(tmp_path / "short.safetensors", model, CNN, SPEC, history=[{"epoch": 1, "img_per_s": 1.5}])
    save_model(tmp_path / "long.safetensors", model, CNN, SPEC, history=[{"epoch": 1, "img_per_s": 1234.56789}])
    sizes = [os.path.getsize(tmp_path / f"{n}.safetensors") for n in ("short", "long")]
    assert sizes[0] != sizes[1]  # a timing in the history: the header's length varies from run to run
    assert weights_size(tmp_path / "short.safetensors") == weights_size(tmp_path / "long.safetensors") == nbytes
    torch.save({"state_dict": model.state_dict()}, tmp_path / "old.pt")
    assert weights_size(tmp_path / "old.pt") == os.path.getsize(tmp_path / "old.pt")


def test_earlier_kdrun_files_and_plain_state_dicts_still_load(tmp_path):
    model = build_model(CNN, SPEC).eval()
    x = torch.randn(2, 1, 8, 8)
    old = {"state_dict": model.state_dict(), "model_cfg": CNN, "num_classes": 10, "in_channels": 1, "image_size": 8,
           "kdrun_version": "0.1.0", "epoch": 4, "history": HISTORY[:1]}  # fmt: skip
    torch.save(old, tmp_path / "teacher.pt")  # what save_model wrote before model files were safetensors
    ckpt = read_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["epoch"] == 4 and ckpt["history"] == HISTORY[:1]
    assert torch.equal(load_model(tmp_path / "teacher.pt", CNN, SPEC).eval()(x), model(x))
    assert find_model_file(tmp_path, "teacher") == tmp_path / "teacher.pt"  # a run dir of an earlier kdrun
    write_checkpoint(tmp_path / "teacher.safetensors", ckpt)  # converted, with every entry
    assert find_model_file(tmp_path, "teacher") == tmp_path / "teacher.safetensors"
    assert read_checkpoint(tmp_path / "teacher.safetensors").keys() == ckpt.keys()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_file(model.state_dict(), tmp_path / "sd.safetensors")  # without kdrun's header
    named_oddly = tmp_path / "weights.bin"
    named_oddly.write_bytes((tmp_path / "sd.safetensors").read_bytes())  # the format is read from the bytes
    for plain in ("sd.pt", "sd.safetensors", "weights.bin"):
        assert torch.equal(load_model(tmp_path / plain, CNN, SPEC).eval()(x), model(x)), plain


def test_other_architecture_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m.safetensors", build_model({"name": "mlp"}, SPEC), {"name": "mlp"}, SPEC)
    with pytest.raises(KdrunError, match=r"holds a mlp but the run's model is small_cnn"):
        load_model(tmp_path / "m.safetensors", CNN, SPEC)
    torch.save(build_model({"name": "mlp"}, SPEC).state_dict(), tmp_path / "sd.pt")  # no metadata to compare
    with pytest.raises(KdrunError, match=r"does not fit small_cnn .*missing keys"):
        load_model(tmp_path / "sd.pt", CNN, SPEC)


def test_other_class_or_channel_count_is_a_clear_error(tmp_path):
    save_model(tmp_path / "c.safetensors", build_model(CNN, DataSpec(100, 1, 8)), CNN, DataSpec(100, 1, 8))
    with pytest.raises(KdrunError, match="num_classes=100 but the dataset has num_classes=10"):
        load_model(tmp_path / "c.safetensors", CNN, SPEC)
    save_model(tmp_path / "ch.safetensors", build_model(CNN, DataSpec(10, 3, 8)), CNN, DataSpec(10, 3, 8))
    with pytest.raises(KdrunError, match="in_channels=3 but the dataset has in_channels=1"):
        load_model(tmp_path / "ch.safetensors", CNN, SPEC)


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
    save_model(tmp_path / "m.safetensors", build_model(CNN, SPEC), CNN, SPEC)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdrunError, match=r"cut.safetensors is not a readable safetensors file \(truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "stub.safetensors").write_bytes(data[:20])  # even the header cut: the name says what it was
    with pytest.raises(KdrunError, match=r"stub.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "stub.safetensors")
    torch.save({"state_dict": build_model(CNN, SPEC).state_dict()}, tmp_path / "old.pt")
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(KdrunError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(KdrunError, match="no such file"):
        read_checkpoint(tmp_path / "absent.safetensors")


def test_a_header_that_is_not_kdrun_json_is_a_clear_error(tmp_path):
    tensors = build_model(CNN, SPEC).state_dict()
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"kdrun": "{not json"})
    with pytest.raises(KdrunError, match="bad.safetensors has a kdrun header that is not JSON"):
        read_checkpoint(tmp_path / "bad.safetensors", "teacher.checkpoint")
    save_file(tensors, tmp_path / "list.safetensors", metadata={"kdrun": "[1, 2]"})
    with pytest.raises(KdrunError, match="list.safetensors has a kdrun header that is not a JSON object"):
        read_checkpoint(tmp_path / "list.safetensors")


def test_failed_write_leaves_the_previous_file_intact(tmp_path):
    atomic_save({"v": torch.tensor(1)}, tmp_path / "a.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"v": Unpicklable()}, tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["v"].item() == 1
    assert os.listdir(tmp_path) == ["a.pt"]
