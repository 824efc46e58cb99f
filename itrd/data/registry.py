"""Datasets by name: a registry from a name to the function that loads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from itrd.data.base import LoadedDataset

DatasetLoader = Callable[[Path | None, bool], LoadedDataset]

_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register `loader(root, download) -> LoadedDataset` under `name`."""

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in _LOADERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return decorate


def dataset_names() -> list[str]:
    """The names `load_dataset` accepts, sorted."""
    return sorted(_LOADERS)


def load_dataset(name: str, root: Path | str | None = None, *, download: bool = False) -> LoadedDataset:
    """Load the dataset called `name` from `root`, fetching it first only when `download` is true."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return loader(Path(root).expanduser() if root is not None else None, download)


def default_data_root() -> Path:
    """Where file-backed datasets live when no root is given: ~/.cache/itrd/data."""
    return Path("~/.cache/itrd/data").expanduser()
