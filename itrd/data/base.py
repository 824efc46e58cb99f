"""The data types every dataset loader returns: dataset metadata and sets of labelled images."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

Augmentation = Literal["crop_flip", "imagenet"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the augmentation need to know about a dataset.

    `augmentation` selects the training transform: "crop_flip" is the paper's CIFAR recipe (random crop of
    `image_size` after zero-padding by 4, optional horizontal flip); "imagenet" is RandomResizedCrop +
    flip for training and Resize + CenterCrop for evaluation.
    """

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    classes: list[str]
    hflip: bool
    augmentation: Augmentation = "crop_flip"


class ImageSet(abc.ABC):
    """A labelled set of RGB images, indexable by position; `targets` are int64 class ids."""

    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.numel())

    @property
    @abc.abstractmethod
    def in_memory(self) -> bool:
        """Whether all images are held as one uint8 tensor (which enables the on-device batch path)."""

    @abc.abstractmethod
    def pil_image(self, index: int) -> Image.Image:
        """The image at `index` as an RGB PIL image (the input of the per-sample torchvision transforms)."""

    @abc.abstractmethod
    def subset(self, indices: Sequence[int] | Tensor) -> ImageSet:
        """A new set holding only the images at `indices`, in that order."""


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 tensor of shape (N, H, W, 3), with int64 labels of shape (N,)."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        if targets.ndim != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images.contiguous()
        self.targets = targets.to(torch.int64)
        # one device copy per device, channels-first, so every epoch's loader reuses it
        self._device_copies: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def in_memory(self) -> bool:
        """Always true: the images are one tensor."""
        return True

    def pil_image(self, index: int) -> Image.Image:
        """The image at `index` as an RGB PIL image."""
        return Image.fromarray(self.images[index].numpy())

    def subset(self, indices: Sequence[int] | Tensor) -> ArrayImageSet:
        """A new in-memory set holding only the images at `indices`."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayImageSet(self.images[index], self.targets[index])

    def on_device(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The images as uint8 (N, 3, H, W) and the targets, both on `device`; copied once and cached."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # "cuda" and "cuda:0" must share one copy rather than hold two
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._device_copies:
            images = self.images.to(device).permute(0, 3, 1, 2).contiguous()
            self._device_copies[device] = (images, self.targets.to(device))
        return self._device_copies[device]


class FileImageSet(ImageSet):
    """Images stored as files and decoded with PIL only when a sample is requested."""

    def __init__(self, paths: Sequence[Path], targets: Tensor) -> None:
        if targets.ndim != 1 or targets.shape[0] != len(paths):
            raise ValueError(f"targets must have shape ({len(paths)},), got {tuple(targets.shape)}")
        self.paths = list(paths)
        self.targets = targets.to(torch.int64)

    @property
    def in_memory(self) -> bool:
        """Always false: images are read from disk on demand."""
        return False

    def pil_image(self, index: int) -> Image.Image:
        """The image file at `index`, decoded and converted to RGB."""
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def subset(self, indices: Sequence[int] | Tensor) -> FileImageSet:
        """A new file-backed set holding only the files at `indices`."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return FileImageSet([self.paths[i] for i in index.tolist()], self.targets[index])


@dataclass
class LoadedDataset:
    """A dataset's metadata with its training and test splits."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet
