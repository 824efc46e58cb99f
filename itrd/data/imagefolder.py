"""Image directories in the ImageNet layout: root/train/<class>/<image> and root/val/<class>/<image>."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from itrd.data.base import DatasetInfo, FileImageSet, LoadedDataset
from itrd.data.registry import register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224


def _image_files(directory: Path) -> list[Path]:
    """Image files under `directory` (recursively), sorted so the index of a file is stable."""
    files: list[Path] = []
    # os.walk reads entry types from the directory listing, so ImageNet's million files cost no stat each
    for dirpath, _, names in os.walk(directory, followlinks=True):
        files.extend(Path(dirpath, n) for n in names if os.path.splitext(n)[1].lower() in IMG_EXTENSIONS)
    return sorted(files)


def scan_split(split_dir: Path, class_to_idx: dict[str, int]) -> FileImageSet:
    """List the images of one split; a class directory absent from `class_to_idx` is an error."""
    unknown = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in class_to_idx)
    if unknown:
        raise ValueError(f"{split_dir} has class directories that train/ lacks: {', '.join(unknown[:5])}")
    paths: list[Path] = []
    labels: list[int] = []
    for name, label in class_to_idx.items():
        files = _image_files(split_dir / name) if (split_dir / name).is_dir() else []
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}/<class>/")
    return FileImageSet(paths, torch.tensor(labels, dtype=torch.int64))


@register_dataset("imagefolder")
def load_imagefolder(root: Path | None, download: bool) -> LoadedDataset:
    """Index root/train and root/val (decoded lazily); the classes are train's subdirectories, sorted."""
    if download:
        raise ValueError(
            "imagefolder datasets cannot be downloaded; prepare root/train and root/val yourself"
        )
    if root is None:
        raise ValueError("imagefolder needs a root directory holding train/<class>/ and val/<class>/")
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"imagefolder: expected the directory {split_dir}/ (layout root/train/<class>/*.jpg and "
                f"root/val/<class>/*.jpg); it does not exist"
            )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class directories in {train_dir}/")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=IMAGE_SIZE,
        classes=classes,
        hflip=True,
        augmentation="imagenet",
    )
    return LoadedDataset(
        info=info, train=scan_split(train_dir, class_to_idx), test=scan_split(val_dir, class_to_idx)
    )
