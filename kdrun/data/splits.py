"""Train / val / test splits held as uint8 tensors on the device (or behind a DataLoader for folders), batched by
sample index: every batch is ``(images_uint8, labels, sample_indices)``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdrun.data.transforms import BatchTransform

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
        self._loaders: dict[tuple[int, bool, bool], DataLoader] = {}

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
            loader.batch_sampler.batches = [  # type: ignore[union-attr]  # our _BatchList
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


@dataclass
class Data:
    """The three splits of a run and what models and the engine need to use them."""

    name: str
    spec: DataSpec
    train: Split
    val: Split
    test: Split
    transform: BatchTransform


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


def labels_of(split: Split) -> torch.Tensor:
    """The class index of every sample of ``split``, in split order."""
    if isinstance(split, TensorSplit):
        return split.labels
    return torch.as_tensor([split.dataset.targets[int(i)] for i in split.indices])  # type: ignore[attr-defined]


def with_train_subset(data: Data, n: int | None, seed: int) -> Data:
    """``data`` whose training split keeps at most ``n`` samples (class-stratified, seeded); val/test unchanged."""
    if n is None or n >= len(data.train):
        return data
    labels = labels_of(data.train)
    return replace(data, train=data.train.subset(stratified_subset(labels, n, seed).to(labels.device)))


def with_augment(data: Data, crop_pad: int, flip: bool) -> Data:
    """``data`` whose training batches get this augmentation (random crop after zero padding, random flip)."""
    t = data.transform
    return replace(data, transform=BatchTransform(t.mean, t.std, crop_pad, flip))
