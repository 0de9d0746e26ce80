"""Datasets -> splits: real torchvision classes, files in their real formats, the batched transform."""

import pickle
import struct

import numpy as np
import pytest
import torch

from kdrun.core.errors import KdrunError
from kdrun.data import DATASETS, TensorSplit, build_data
from kdrun.data.transforms import augment  # the crop/flip function (kdrun.data.augment: the mixing group)


def test_every_registered_dataset_has_a_yaml():
    from importlib.resources import files

    yamls = {p.name[:-5] for p in (files("kdrun.conf") / "dataset").iterdir() if p.name.endswith(".yaml")}
    assert set(DATASETS.names()) == yamls


def test_digits_splits_are_seeded_disjoint_and_complete():
    a = build_data({"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0})
    b = build_data({"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0})
    c = build_data({"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 1})
    assert (len(a.train), len(a.val), len(a.test)) == (1293, 144, 360)
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    rows = torch.cat([a.train.images, a.val.images, a.test.images]).flatten(1)
    assert len(torch.unique(rows, dim=0)) >= 1700  # nothing duplicated across splits (digits has a few twins)
    assert a.spec.num_classes == 10 and a.spec.in_channels == 1 and a.spec.image_size == 8
    assert torch.bincount(a.test.labels).min() >= 34  # stratified


def test_mnist_tensors_equal_torchvision_samples(mnist_root):
    from torchvision.datasets import MNIST
    from torchvision.transforms.functional import pil_to_tensor

    data = build_data({"name": "mnist", "root": str(mnist_root), "download": False, "val_fraction": 0.1})
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    reference = MNIST(str(mnist_root), train=False, download=False)
    for i in (0, 1, 4321, 9999):
        image, label = reference[i]
        assert torch.equal(data.test.images[i], pil_to_tensor(image)) and data.test.labels[i].item() == label
    # the val split is carved from train: its samples are real training images
    train = MNIST(str(mnist_root), train=True, download=False)
    first_val = data.val.images[0, 0]
    assert any(
        torch.equal(first_val, train.data[j]) for j in range(len(train.data)) if train.targets[j] == data.val.labels[0]
    )


def test_batches_cover_the_split_once_with_aligned_labels():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    split = TensorSplit(images, torch.arange(10) * 3)
    seen = []
    for x, y, idx in split.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(x[:, 0, 0, 0].long() * 3, y)  # image i carries label 3i
        assert torch.equal(idx.long() * 3, y)
        seen += idx.tolist()
    assert sorted(seen) == list(range(10))
    assert split.num_batches(4, shuffle=True) == 3


def test_augmentation_keeps_images_and_labels_aligned():
    # image i is constant i inside a zero border: any crop/flip of it still holds only i (and padding zeros)
    n = 64
    images = torch.zeros(n, 1, 12, 12, dtype=torch.uint8)
    for i in range(n):
        images[i, :, 2:10, 2:10] = i + 1
    out = augment(images, crop_pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for i in range(n):
        values = set(out[i].unique().tolist()) - {0}
        assert values == {i + 1}
        assert (out[i] == i + 1).sum() == 64  # the 8x8 block is never cut by a shift of at most 2
    assert not torch.equal(out, images)  # something moved


def test_flip_mirrors_and_crop_shifts():
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    flipped = augment(image, 0, True, torch.Generator().manual_seed(1))
    mirrored = (flipped == image.flip(3)).flatten(1).all(1)
    same = (flipped == image).flatten(1).all(1)
    assert (mirrored | same).all() and 50 < mirrored.sum() < 150
    shifted = augment(image, 1, False, torch.Generator().manual_seed(2))
    assert len({tuple(s.flatten().tolist()) for s in shifted}) == 9  # 3 x 3 offsets


def _write_idx(path, array: np.ndarray) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_kmnist_reads_idx_files_through_torchvision(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    data = build_data({"name": "kmnist", "root": str(tmp_path), "download": False, "val_fraction": 0.2})
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 20)
    assert data.spec.in_channels == 1 and data.spec.image_size == 28


def test_cifar10_reads_python_pickles_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 10).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # can't match real MD5s
    data = build_data(
        {
            "name": "cifar10",
            "root": str(tmp_path),
            "download": False,
            "val_fraction": 0.1,
            "augment": {"crop_pad": 4, "flip": True},
        }
    )
    assert (len(data.train), len(data.val), len(data.test)) == (45, 5, 10)
    assert data.spec == type(data.spec)(10, 3, 32)
    reference = CIFAR10(str(tmp_path), train=False, download=False)
    assert torch.equal(data.test.images[3], torch.from_numpy(reference.data[3]).permute(2, 0, 1))
    x = data.transform(data.train.images[:8], train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_svhn_reads_mat_files_through_torchvision(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    from torchvision.datasets import SVHN

    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("test", 10)):
        labels = rng.integers(1, 11, (n, 1))  # SVHN stores digit 0 as label 10
        scipy_io.savemat(
            tmp_path / f"{part}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels}
        )
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    data = build_data({"name": "svhn", "root": str(tmp_path), "download": False, "val_fraction": 0.1})
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 10)
    assert data.test.labels.max() <= 9 and data.spec.in_channels == 3


def test_fake_data_and_imagefolder(tmp_path):
    from PIL import Image

    fake = build_data(
        {
            "name": "fake",
            "image_size": 16,
            "channels": 3,
            "num_classes": 4,
            "train_size": 40,
            "test_size": 8,
            "val_fraction": 0.25,
        }
    )
    assert (len(fake.train), len(fake.val), len(fake.test)) == (30, 10, 8) and fake.spec.num_classes == 4
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / part / cls / f"{i}.png"
                )
    folder = build_data(
        {
            "name": "imagefolder",
            "root": str(tmp_path),
            "image_size": 16,
            "channels": 1,
            "val_fraction": 0.25,
            "num_workers": 0,
        }
    )
    assert (len(folder.train), len(folder.val), len(folder.test)) == (9, 3, 12)
    x, y, idx = next(folder.train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.uint8 and folder.spec.num_classes == 2


def test_imagefolder_normalisation_is_estimated_across_classes(tmp_path):
    from PIL import Image

    from kdrun.data.datasets import STATS_SAMPLE

    # folder indices run class by class: the first STATS_SAMPLE training images are all of class a (black)
    counts = {"a": STATS_SAMPLE + 100, "b": 200}
    for part, n in (("train", counts), ("test", {"a": 1, "b": 1})):
        for cls, shade in (("a", 0), ("b", 255)):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n[cls]):
                Image.fromarray(np.full((4, 4), shade, dtype=np.uint8)).save(tmp_path / part / cls / f"{i:04}.png")
    options = {"name": "imagefolder", "root": str(tmp_path), "image_size": 4, "channels": 1, "num_workers": 0}
    data = build_data(options)
    white = sum(int(labels.sum()) for _, labels, _ in data.train.batches(256))  # class b has label 1
    true_mean = white / len(data.train)
    mean = float(data.transform.mean.flatten()[0])
    assert abs(mean - true_mean) < 0.06, (mean, true_mean)  # about 0.25; the first 512 images gave 0.0
    assert float(data.transform.std.flatten()[0]) > 0.3
    assert float(build_data(options).transform.mean.flatten()[0]) == mean  # seeded by dataset.split_seed


def test_missing_files_offline_is_one_clear_line(tmp_path):
    with pytest.raises(KdrunError) as err:
        build_data({"name": "mnist", "root": str(tmp_path), "download": False})
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message and "dataset.download=true" in message
    with pytest.raises(KdrunError, match="must hold train/<class>/ and test/<class>/"):
        build_data({"name": "imagefolder", "root": str(tmp_path)})


def test_digits_test_fraction_too_small_for_every_class_is_one_clear_line():
    with pytest.raises(KdrunError, match=r"^dataset.test_fraction=0.004 leaves a split of digits without every class"):
        build_data({"name": "digits", "test_fraction": 0.004})
