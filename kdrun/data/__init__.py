"""Datasets as device tensors: loaders, seeded splits, batch transforms and the ``augment`` group's mixing."""

from kdrun.data.datasets import DATASETS, build_data
from kdrun.data.splits import (
    Data,
    DataSpec,
    LoaderSplit,
    Split,
    TensorSplit,
    labels_of,
    stratified_subset,
    with_augment,
    with_train_subset,
)
from kdrun.data.transforms import BatchTransform

__all__ = [
    "DATASETS",
    "BatchTransform",
    "Data",
    "DataSpec",
    "LoaderSplit",
    "Split",
    "TensorSplit",
    "build_data",
    "labels_of",
    "stratified_subset",
    "with_augment",
    "with_train_subset",
]
