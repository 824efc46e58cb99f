"""Datasets by name, their augmentation, and per-epoch batch loaders (on-device or per-sample)."""

from itrd.data import cifar, digits, imagefolder  # noqa: F401  (importing registers the datasets)
from itrd.data.base import ArrayImageSet, DatasetInfo, FileImageSet, ImageSet, LoadedDataset
from itrd.data.loader import DeviceBatchLoader, SampleLoader, make_loader
from itrd.data.registry import dataset_names, default_data_root, load_dataset, register_dataset

__all__ = [
    "ArrayImageSet",
    "DatasetInfo",
    "DeviceBatchLoader",
    "FileImageSet",
    "ImageSet",
    "LoadedDataset",
    "SampleLoader",
    "dataset_names",
    "default_data_root",
    "load_dataset",
    "make_loader",
    "register_dataset",
]
