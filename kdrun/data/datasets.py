"""Dataset loaders (one registered function each) and ``build_data``: official splits -> train / val / test.

Small datasets are held whole as uint8 tensors on the training device and batched by index slices of a
seeded permutation; folder datasets go through a DataLoader. Either way a split yields
``(images_uint8, labels, sample_indices)`` and ``BatchTransform`` normalises (and augments) the batch
on the device, so both paths share one preprocessing.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from kdrun.core.errors import KdrunError
from kdrun.core.registry import Registry, to_dict
from kdrun.core.schema import Epochs, OpenFraction, PositiveInt, Range, Seed, Size, takes
from kdrun.data.splits import Data, DataSpec, LoaderSplit, Split, TensorSplit
from kdrun.data.transforms import BatchTransform, channel_stats

DATASETS = Registry("dataset")
ImageSize = Annotated[int, Range(ge=1, le=4096)]
STATS_SAMPLE = 512  # folder datasets: images read to estimate the normalisation (reading them all would be slow)
# The keys every dataset option has (a loader declares its own with ``takes``). batch_size, epochs and
# student_max_samples are the defaults of the train.<stage> recipes.
COMMON_DATASET_KEYS: dict[str, Any] = {
    "name": str,
    "root": str | None,
    "download": bool,
    "val_fraction": OpenFraction,
    "split_seed": Seed,
    "augment": {"crop_pad": Annotated[int, Range(ge=0, le=64)], "flip": bool},
    "batch_size": Size,
    "student_max_samples": PositiveInt | None,
    "epochs": {"teacher": Epochs, "student": Epochs},
}


@dataclass
class Source:
    """What a dataset loader returns: its official train and test splits."""

    train: Any  # a TensorSplit, or a map-style Dataset of (uint8 image tensor, label) for folders
    test: Any
    num_classes: int
    in_channels: int
    image_size: int


def build_data(cfg: Any, device: torch.device | str = "cpu") -> Data:
    """Load ``cfg`` (the dataset node), carve the seeded validation split, move in-memory splits to ``device``."""
    options = to_dict(cfg)
    name = options["name"]
    device = torch.device(device)
    source: Source = DATASETS.get(name, "dataset")(options)
    n_train = len(source.train)
    n_val = int(round(n_train * float(options.get("val_fraction", 0.1))))
    if not 0 < n_val < n_train:
        raise KdrunError(
            f"dataset.val_fraction={options.get('val_fraction')} leaves no training or no validation "
            f"samples out of {n_train}"
        )
    split_seed = int(options.get("split_seed", 0))
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train: Split
    val: Split
    test: Split
    if isinstance(source.train, TensorSplit):
        train, val = source.train.subset(train_idx), source.train.subset(val_idx)
        test = source.test
        mean, std = channel_stats(train.images)
    else:
        workers = int(options.get("num_workers", 0))
        full = LoaderSplit(source.train, torch.arange(n_train), workers, device)
        train, val = full.subset(train_idx), full.subset(val_idx)
        test = LoaderSplit(source.test, torch.arange(len(source.test)), workers, device)
        mean, std = _sampled_stats(source.train, train_idx, split_seed)
    augment_cfg = options.get("augment") or {}
    transform = BatchTransform(mean, std, augment_cfg.get("crop_pad", 0), augment_cfg.get("flip", False))
    spec = DataSpec(source.num_classes, source.in_channels, source.image_size)
    return Data(name, spec, train.to(device), val.to(device), test.to(device), transform.to(device))


def _sampled_stats(dataset: Any, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``channel_stats`` of a seeded random sample of ``indices`` (at most ``STATS_SAMPLE``): drawn across the whole
    split, since a folder dataset's indices run class by class and their first ones may all be of one class."""
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    sample = indices[pick].sort().values  # read in file order
    return channel_stats(torch.stack([dataset[int(i)][0] for i in sample]))


# ---- dataset loaders: one registered function per dataset, each returning its official splits ----


@DATASETS.register("digits")
@takes(test_fraction=OpenFraction)
def load_digits(options: dict) -> Source:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    fraction = float(options.get("test_fraction", 0.2))
    try:
        train_idx, test_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=fraction,
            stratify=labels.numpy(),
            random_state=int(options.get("split_seed", 0)),
        )
    except ValueError as e:  # a split too small to hold every class once
        raise KdrunError(f"dataset.test_fraction={fraction} leaves a split of digits without every class ({e})") from e
    train_idx, test_idx = torch.from_numpy(train_idx).sort().values, torch.from_numpy(test_idx).sort().values
    return Source(
        TensorSplit(images[train_idx], labels[train_idx]), TensorSplit(images[test_idx], labels[test_idx]), 10, 1, 8
    )


def _open_torchvision(name: str, options: dict, expected: str, build):
    """Run ``build(root, download)`` and turn missing files or a failed download into one clear line."""
    root = os.path.expanduser(str(options.get("root") or "data"))
    download = bool(options.get("download", True))
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):  # torchvision prints each failed mirror
            return build(root, download)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        how = f"the download failed ({reason})" if download else "dataset.download=false"
        raise KdrunError(
            f"dataset={name}: files not found under {os.path.join(root, expected)} and {how}; "
            f"run once with dataset.download=true where there is a network, or copy the files there "
            f"(dataset.root={root})"
        ) from e


def _register_mnist_like(name: str, class_name: str) -> None:
    @DATASETS.register(name)
    @takes()
    def load(options: dict) -> Source:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)

        def split(train: bool) -> TensorSplit:
            ds = _open_torchvision(
                name, options, f"{class_name}/raw", lambda root, download: cls(root, train=train, download=download)
            )
            return TensorSplit(ds.data.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets))

        return Source(split(True), split(False), 10, 1, 28)


_register_mnist_like("mnist", "MNIST")
_register_mnist_like("fashion_mnist", "FashionMNIST")
_register_mnist_like("kmnist", "KMNIST")


def _register_cifar(name: str, class_name: str, folder: str, num_classes: int) -> None:
    @DATASETS.register(name)
    @takes()
    def load(options: dict) -> Source:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)

        def split(train: bool) -> TensorSplit:
            ds = _open_torchvision(
                name, options, folder, lambda root, download: cls(root, train=train, download=download)
            )
            return TensorSplit(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets))

        return Source(split(True), split(False), num_classes, 3, 32)


_register_cifar("cifar10", "CIFAR10", "cifar-10-batches-py", 10)
_register_cifar("cifar100", "CIFAR100", "cifar-100-python", 100)


@DATASETS.register("svhn")
@takes()
def load_svhn(options: dict) -> Source:
    from torchvision.datasets import SVHN

    def split(part: str) -> TensorSplit:
        ds = _open_torchvision(
            "svhn", options, f"{part}_32x32.mat", lambda root, download: SVHN(root, split=part, download=download)
        )
        return TensorSplit(torch.from_numpy(ds.data).contiguous(), torch.as_tensor(ds.labels))

    return Source(split("train"), split("test"), 10, 3, 32)


@DATASETS.register("fake")
@takes(
    image_size=ImageSize,
    channels=Literal[1, 3],
    num_classes=Annotated[int, Range(ge=2, le=100_000)],
    train_size=Annotated[int, Range(ge=2, le=1_000_000)],
    test_size=Annotated[int, Range(ge=1, le=1_000_000)],
)
def load_fake(options: dict) -> Source:
    from torchvision.datasets import FakeData
    from torchvision.transforms import PILToTensor

    channels, size, classes = (
        int(options.get("channels", 3)),
        int(options.get("image_size", 32)),
        int(options.get("num_classes", 10)),
    )
    train_size, test_size = int(options.get("train_size", 512)), int(options.get("test_size", 128))

    def split(n: int, offset: int) -> TensorSplit:
        ds = FakeData(n, (channels, size, size), classes, transform=PILToTensor(), random_offset=offset)
        images, labels = zip(*(ds[i] for i in range(n)), strict=True)
        return TensorSplit(torch.stack(images), torch.as_tensor(labels))

    return Source(split(train_size, 0), split(test_size, train_size), classes, channels, size)


@DATASETS.register("imagefolder")
@takes(image_size=ImageSize, channels=Literal[1, 3], num_workers=Annotated[int, Range(ge=0, le=256)])
def load_imagefolder(options: dict) -> Source:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root = os.path.expanduser(str(options.get("root")))
    size, channels = int(options.get("image_size", 64)), int(options.get("channels", 3))
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        raise KdrunError(f"dataset.root={root} must hold train/<class>/ and test/<class>/ (or val/<class>/) folders")
    steps = [T.Grayscale(1)] if channels == 1 else []
    transform = T.Compose([*steps, T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    try:
        train, test = ImageFolder(os.path.join(root, "train"), transform), ImageFolder(test_dir, transform)
    except (FileNotFoundError, OSError) as e:
        raise KdrunError(f"dataset.root={root}: {e}") from e
    if train.classes != test.classes:
        raise KdrunError(
            f"dataset.root={root}: train/ has classes {train.classes} but {os.path.basename(test_dir)}/ "
            f"has {test.classes}"
        )
    return Source(train, test, len(train.classes), channels, size)
