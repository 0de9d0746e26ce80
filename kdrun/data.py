"""Datasets -> train / val / test splits.

Small datasets are held whole as uint8 tensors on the training device and batched by index slices of a
seeded permutation; folder datasets go through a DataLoader. Either way a split yields
``(images_uint8, labels, sample_indices)`` and ``BatchTransform`` normalises (and augments) the batch
on the device, so both paths share one preprocessing.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdrun.errors import KdrunError
from kdrun.registry import Registry, to_dict

DATASETS = Registry("dataset")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images [B,C,H,W], int64 labels, sample indices


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data."""

    num_classes: int
    in_channels: int
    image_size: int


def _num_batches(n: int, batch_size: int, shuffle: bool, world: int = 1) -> int:
    """Batches per pass; a shuffled (training) pass drops a last batch too small to give every rank two samples,
    as ``batch_indices`` does (one sample breaks BatchNorm)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= (2 * world if shuffle else 1) else 0)


def batch_indices(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1)
) -> Iterator[torch.Tensor]:
    """The sample indices of each batch of a pass, in a seeded order when ``shuffle``.

    With ``shard=(rank, world)`` each batch of ``batch_size`` is split between the ranks (every world-th index from
    ``rank``): together they take the same steps over the same samples as one process does.
    """
    rank, world = shard
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if shuffle and len(idx) < 2 * world:
            break
        yield idx[rank::world] if world > 1 else idx


class TensorSplit:
    """A split held whole in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        assert len(images) == len(labels)
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[indices], self.labels[indices])

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels.to(device))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[Batch]:
        for idx in batch_indices(len(self), batch_size, shuffle, generator, shard):
            idx = idx.to(self.images.device)
            yield self.images[idx], self.labels[idx], idx

    def num_batches(self, batch_size: int, shuffle: bool = False, world: int = 1) -> int:
        return _num_batches(len(self), batch_size, shuffle, world)


class _Indexed(Dataset):
    """``dataset[indices[i]]`` returned as ``(image, label, i)``."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[int(self.indices[i])]
        return image, label, i


class LoaderSplit:
    """A split read through a DataLoader (images that do not fit in memory); the dataset yields uint8 tensors."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, num_workers: int, device: torch.device):
        self.dataset, self.indices, self.num_workers, self.device = dataset, indices, num_workers, device
        self._loaders: dict[tuple[int, bool], DataLoader] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: torch.Tensor) -> LoaderSplit:
        return LoaderSplit(self.dataset, self.indices[indices], self.num_workers, self.device)

    def to(self, device: torch.device) -> LoaderSplit:
        return LoaderSplit(self.dataset, self.indices, self.num_workers, device)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[Batch]:
        sharded = shard[1] > 1
        key = (batch_size, shuffle, sharded)
        if key not in self._loaders:  # kept, so that persistent workers survive across epochs
            self._loaders[key] = DataLoader(
                _Indexed(self.dataset, self.indices),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.device.type == "cuda",
                **(
                    {"batch_sampler": _BatchList()}
                    if sharded
                    else {"batch_size": batch_size, "shuffle": shuffle, "generator": generator, "drop_last": False}
                ),
            )
        loader = self._loaders[key]
        if sharded:  # this rank's share of each batch, from the order that every rank draws alike
            loader.batch_sampler.batches = [
                i.tolist() for i in batch_indices(len(self), batch_size, shuffle, generator, shard)
            ]
        for images, labels, idx in loader:
            if shuffle and len(idx) < 2:
                break
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                idx.to(self.device, non_blocking=True),
            )

    def num_batches(self, batch_size: int, shuffle: bool = False, world: int = 1) -> int:
        return _num_batches(len(self), batch_size, shuffle, world)


class _BatchList(Sampler):
    """Yields the index batches set before each pass (``batches``), in the main process."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


Split = TensorSplit | LoaderSplit


class BatchTransform:
    """uint8 batch -> normalised float batch, with random crop (zero padding) and flips when training."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, crop_pad: int = 0, flip: bool = False):
        self.mean = mean.view(1, -1, 1, 1).float()
        self.std = std.view(1, -1, 1, 1).float()
        self.crop_pad, self.flip = int(crop_pad), bool(flip)

    @property
    def augments(self) -> bool:
        return self.crop_pad > 0 or self.flip

    def to(self, device: torch.device) -> BatchTransform:
        return BatchTransform(self.mean.to(device), self.std.to(device), self.crop_pad, self.flip)

    def __call__(
        self, images: torch.Tensor, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if train and self.augments:
            images = augment(images, self.crop_pad, self.flip, generator)
        return (images.float().div_(255) - self.mean) / self.std


def augment(images: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop after zero padding by ``crop_pad`` and random horizontal flip, per sample."""
    n, _, h, w = images.shape
    dev = images.device
    if crop_pad > 0:
        padded = torch.nn.functional.pad(images, (crop_pad,) * 4)
        dy = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(dev)
        dx = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator).to(dev)
        rows = (torch.arange(h, device=dev) + dy)[:, None, :, None].expand(n, images.shape[1], h, w + 2 * crop_pad)
        images = padded.gather(2, rows)
        cols = (torch.arange(w, device=dev) + dx)[:, None, None, :].expand(n, images.shape[1], h, w)
        images = images.gather(3, cols)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


@dataclass
class Data:
    """The three splits of a run and what models and the engine need to use them."""

    name: str
    spec: DataSpec
    train: Split
    val: Split
    test: Split
    transform: BatchTransform


@dataclass
class Source:
    """What a dataset loader returns: its official train and test splits."""

    train: TensorSplit | Dataset
    test: TensorSplit | Dataset
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
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(options.get("split_seed", 0))))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    if isinstance(source.train, TensorSplit):
        train, val = source.train.subset(train_idx), source.train.subset(val_idx)
        test = source.test
        mean, std = channel_stats(train.images)
    else:
        workers = int(options.get("num_workers", 0))
        full = LoaderSplit(source.train, torch.arange(n_train), workers, device)
        train, val = full.subset(train_idx), full.subset(val_idx)
        test = LoaderSplit(source.test, torch.arange(len(source.test)), workers, device)
        mean, std = channel_stats(torch.stack([source.train[int(i)][0] for i in train_idx[:512]]))
    augment_cfg = options.get("augment") or {}
    transform = BatchTransform(mean, std, augment_cfg.get("crop_pad", 0), augment_cfg.get("flip", False))
    spec = DataSpec(source.num_classes, source.in_channels, source.image_size)
    return Data(name, spec, train.to(device), val.to(device), test.to(device), transform.to(device))


# Dataset keys that say how long or how much to train, or where the files are, not which images: they are left
# out of the data's identity (the cache key), except ``root`` for datasets whose root *is* the data.
NOT_IDENTITY_KEYS = ("root", "download", "num_workers", "epochs", "batch_size", "student_max_samples")
ROOT_IS_THE_DATA = {"imagefolder"}


def dataset_identity(cfg: Any) -> dict[str, Any]:
    """The dataset config reduced to what determines the images and splits a model is trained and tested on."""
    options = to_dict(cfg)
    identity = {k: v for k, v in options.items() if k not in NOT_IDENTITY_KEYS}
    if options.get("name") in ROOT_IS_THE_DATA and options.get("root"):
        identity["root"] = os.path.abspath(os.path.expanduser(str(options["root"])))
    return identity


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` samples, as evenly spread over the classes as their counts allow (seeded)."""
    labels = labels.cpu()
    if n >= len(labels):
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # rank of each sample within its class, in the seeded order: take the lowest ranks first
    rank = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = order[labels[order] == c]
        rank[members] = torch.arange(len(members))
    chosen = order[torch.argsort(rank[order], stable=True)[:n]]
    return chosen.sort().values


def with_train_subset(data: Data, n: int | None, seed: int) -> Data:
    """``data`` whose training split keeps at most ``n`` samples (class-stratified, seeded); val/test unchanged."""
    if n is None or n >= len(data.train):
        return data
    labels = (
        data.train.labels
        if isinstance(data.train, TensorSplit)
        else torch.as_tensor([data.train.dataset.targets[int(i)] for i in data.train.indices])
    )
    return replace(data, train=data.train.subset(stratified_subset(labels, n, seed).to(labels.device)))


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1), x.std(1).clamp_min(1e-3)


# ---- dataset loaders: one registered function per dataset, each returning its official splits ----


@DATASETS.register("digits")
def load_digits(options: dict) -> Source:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    fraction = float(options.get("test_fraction", 0.2))
    if not 0 < fraction < 1:
        raise KdrunError(f"dataset.test_fraction={fraction} is invalid: must be in (0, 1)")
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=fraction,
        stratify=labels.numpy(),
        random_state=int(options.get("split_seed", 0)),
    )
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
def load_svhn(options: dict) -> Source:
    from torchvision.datasets import SVHN

    def split(part: str) -> TensorSplit:
        ds = _open_torchvision(
            "svhn", options, f"{part}_32x32.mat", lambda root, download: SVHN(root, split=part, download=download)
        )
        return TensorSplit(torch.from_numpy(ds.data).contiguous(), torch.as_tensor(ds.labels))

    return Source(split("train"), split("test"), 10, 3, 32)


@DATASETS.register("fake")
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
def load_imagefolder(options: dict) -> Source:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root = os.path.expanduser(str(options.get("root")))
    size, channels = int(options.get("image_size", 64)), int(options.get("channels", 3))
    if channels not in (1, 3):
        raise KdrunError(f"dataset.channels={channels} is invalid; choose one of: 1, 3")
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
