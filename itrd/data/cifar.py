"""CIFAR-10 and CIFAR-100, read from torchvision's on-disk format (the authors' pickled python batches)."""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets as tv_datasets

from itrd.data.base import ArrayImageSet, DatasetInfo, LoadedDataset
from itrd.data.registry import default_data_root, register_dataset


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and which keys hold its labels."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: type[tv_datasets.CIFAR10]


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    torchvision_class=tv_datasets.CIFAR10,
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    torchvision_class=tv_datasets.CIFAR100,
)

# The batches are pickles, and unpickling can run arbitrary code, so only the callables a pickled numpy
# array needs are resolved. They are taken from numpy itself so that numpy 1 and 2 module paths both work.
_PROBE = np.zeros(1, dtype=np.uint8)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE_GLOBALS[(_module, "_reconstruct")] = _PROBE.__reduce__()[0]
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _SAFE_GLOBALS[(_module, "_frombuffer")] = _PROBE.__reduce_ex__(5)[0]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return found


def read_batch(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR batch or meta file (written by Python 2, hence latin1 for its byte strings)."""
    with path.open("rb") as f:
        entry = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR batch: expected a pickled dict, got {type(entry).__name__}")
    return entry


def read_split(directory: Path, files: tuple[str, ...], label_key: str) -> ArrayImageSet:
    """Read and concatenate batches into uint8 (N, 32, 32, 3) images with their labels."""
    arrays, labels = [], []
    for name in files:
        entry = read_batch(directory / name)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            batch_labels = list(entry[label_key])
        except KeyError as missing:
            raise ValueError(f"{directory / name} has no {missing} entry; is it a CIFAR batch?") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(batch_labels):
            raise ValueError(
                f"{directory / name}: expected data of shape (n, 3072) and n labels, "
                f"got {data.shape} and {len(batch_labels)} labels"
            )
        arrays.append(data)
        labels.extend(batch_labels)
    # rows are stored channel-planar (1024 red, 1024 green, 1024 blue values), row-major within a plane
    images = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayImageSet(
        torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(labels, dtype=torch.int64)
    )


def load_cifar(layout: CifarLayout, root: Path | None, download: bool) -> LoadedDataset:
    """Load a CIFAR variant from `root`/`layout.folder`, downloading it through torchvision if asked."""
    root = root if root is not None else default_data_root()
    directory = root / layout.folder
    if download:
        # torchvision downloads, verifies checksums and extracts; it skips files that are already intact
        layout.torchvision_class(str(root), train=True, download=True)
    expected = [*layout.train_files, *layout.test_files, layout.meta_file]
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{layout.name} not found: expected torchvision's on-disk format in {directory}/ "
            f"(files {', '.join(expected)}; missing {', '.join(missing)}). "
            f"Set `download: true` in the job spec (download=True) to fetch it, "
            f"or point root at the directory that contains {layout.folder}/."
        )
    meta = read_batch(directory / layout.meta_file)
    classes = [str(c) for c in meta.get(layout.names_key, [])]
    train = read_split(directory, layout.train_files, layout.label_key)
    test = read_split(directory, layout.test_files, layout.label_key)
    num_classes = len(classes)
    for split in (train, test):
        if len(split) and not 0 <= int(split.targets.min()) <= int(split.targets.max()) < num_classes:
            raise ValueError(
                f"{directory}: labels outside 0..{num_classes - 1} for {num_classes} class names"
            )
    info = DatasetInfo(
        name=layout.name,
        num_classes=num_classes,
        mean=layout.mean,
        std=layout.std,
        image_size=32,
        classes=classes,
        hflip=True,
    )
    return LoadedDataset(info=info, train=train, test=test)


@register_dataset("cifar10")
def load_cifar10(root: Path | None, download: bool) -> LoadedDataset:
    """CIFAR-10 (10 classes, 50000 train / 10000 test images) from `root`/cifar-10-batches-py."""
    return load_cifar(CIFAR10, root, download)


@register_dataset("cifar100")
def load_cifar100(root: Path | None, download: bool) -> LoadedDataset:
    """CIFAR-100 (100 fine classes, 50000 train / 10000 test images) from `root`/cifar-100-python."""
    return load_cifar(CIFAR100, root, download)
