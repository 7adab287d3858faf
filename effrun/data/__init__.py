"""Datasets as in-memory uint8 tensors, batched and augmented on the device."""

from effrun.data.augment import Augmentation
from effrun.data.cifar import CIFAR10Data, CIFAR100Data
from effrun.data.imagefolder import ImageFolderData
from effrun.data.loader import BatchLoader
from effrun.data.splits import DatasetBase, DataSplits, sample_indices
from effrun.data.synthetic import SyntheticData

__all__ = [
    "Augmentation",
    "BatchLoader",
    "CIFAR10Data",
    "CIFAR100Data",
    "DataSplits",
    "DatasetBase",
    "ImageFolderData",
    "SyntheticData",
    "sample_indices",
]
