"""Batches for one epoch: an on-device batch path and the per-sample torchvision DataLoader path.

Both paths visit samples in the same order and are pure functions of (seed, epoch): the order comes from
a generator seeded with (seed, epoch), and so does every augmentation decision. Iterating a loader twice
gives the same batches, and a run resumed at epoch e sees exactly what an uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from itrd.data.base import ArrayImageSet, DatasetInfo, ImageSet
from itrd.data.transforms import (
    PADDING,
    SampleTransform,
    crop_flip,
    draw_crop_flip,
    eval_transform,
    normalize,
    train_transform,
)

Batch = tuple[Tensor, Tensor, Tensor]

_MASK64 = (1 << 64) - 1
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, so nearby inputs such as (0, 1) and (1, 0) stay unrelated."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (part & _MASK64))
    return state >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def _batch_bounds(n: int, batch_size: int, drop_last: bool, train: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch; a short last batch is dropped if asked, or in training if of size 1."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if bounds:
        last = bounds[-1][1] - bounds[-1][0]
        # batch norm cannot normalise over one sample, and the ITRD loss refuses a batch of one
        if last < batch_size and (drop_last or (train and last == 1)):
            bounds.pop()
    return bounds


class _EpochLoader:
    """Shared bookkeeping: the epoch's sample order and its batch boundaries."""

    def __init__(
        self, images: ImageSet, batch_size: int, train: bool, drop_last: bool, seed: int, epoch: int
    ) -> None:
        n = len(images)
        if train:
            self.order = torch.randperm(n, generator=_generator(seed, epoch, _ORDER_STREAM))
        else:
            self.order = torch.arange(n)
        self.bounds = _batch_bounds(n, batch_size, drop_last, train)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.bounds)


class DeviceBatchLoader(_EpochLoader):
    """Keeps uint8 images on the device and crops, flips and normalises whole batches there."""

    def __init__(
        self,
        images: ArrayImageSet,
        info: DatasetInfo,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        seed: int,
        epoch: int,
        drop_last: bool,
    ) -> None:
        super().__init__(images, batch_size, train, drop_last, seed, epoch)
        self.images, self.targets = images.on_device(device)
        self.train = train
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=device)
        self.order = self.order.to(device)
        # drawn on the CPU for the whole epoch at once, so they do not depend on the device's generator
        offsets, flips = draw_crop_flip(
            len(images), PADDING, info.hflip, _generator(seed, epoch, _AUGMENT_STREAM)
        )
        self.offsets, self.flips = offsets.to(device), flips.to(device)

    def __iter__(self) -> Iterator[Batch]:
        for start, stop in self.bounds:
            idx = self.order[start:stop]
            x = self.images[idx]
            if self.train:
                x = crop_flip(x, self.offsets[start:stop], self.flips[start:stop])
            yield normalize(x, self.mean, self.std), self.targets[idx], idx


class TransformedImages(Dataset[tuple[Tensor, int, int]]):
    """A torch Dataset applying a torchvision transform to each image, yielding (x, label, index).

    With `seed` set, the transform's randomness for sample i is seeded from (seed, i), so the result does not
    depend on the number of workers or the order in which samples are fetched.
    """

    def __init__(self, images: ImageSet, transform: SampleTransform, seed: int | None) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.labels = images.targets.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = self.images.pil_image(index)
        if self.seed is None:
            return self.transform(image), self.labels[index], index
        # torchvision's random transforms draw from torch's global CPU generator: seed it for this sample
        # only and restore it afterwards, so the caller's random stream is left untouched
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, index))
            return self.transform(image), self.labels[index], index


class SampleLoader(_EpochLoader):
    """The baseline path: per-sample torchvision transforms in a DataLoader, batches moved to the device."""

    def __init__(
        self,
        images: ImageSet,
        info: DatasetInfo,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        seed: int,
        epoch: int,
        drop_last: bool,
        num_workers: int,
    ) -> None:
        super().__init__(images, batch_size, train, drop_last, seed, epoch)
        self.device = device
        order = self.order.tolist()
        batches = [order[start:stop] for start, stop in self.bounds]
        if train:
            dataset = TransformedImages(images, train_transform(info), mix_seed(seed, epoch, _AUGMENT_STREAM))
        else:
            dataset = TransformedImages(images, eval_transform(info), None)
        extra: dict[str, Any] = {"persistent_workers": False} if num_workers > 0 else {}
        self.loader: DataLoader[tuple[Tensor, int, int]] = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=_generator(seed, epoch, _ORDER_STREAM),
            **extra,
        )

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        for x, y, idx in self.loader:
            yield (
                x.to(self.device, non_blocking=non_blocking),
                y.to(self.device, non_blocking=non_blocking),
                idx.to(self.device, non_blocking=non_blocking),
            )


def make_loader(
    images: ImageSet,
    info: DatasetInfo,
    *,
    batch_size: int,
    train: bool,
    device: torch.device | str,
    seed: int,
    epoch: int,
    fast: bool | None = None,
    num_workers: int = 0,
    drop_last: bool | None = None,
) -> DeviceBatchLoader | SampleLoader:
    """Batches (x float32 NCHW normalised, y int64, idx int64) on `device` for one epoch.

    train=True shuffles and augments; train=False keeps the stored order and only normalises (and resizes
    for ImageNet-style sets). fast=None uses the on-device batch path when the images are in memory and the
    augmentation is crop+flip; fast=False forces the per-sample DataLoader path. drop_last defaults to True
    for training and False for evaluation; a trailing training batch of one sample is always dropped.
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if train and batch_size < 2:
        raise ValueError(
            "training needs batch_size >= 2: batch norm and the ITRD loss need more than one sample"
        )
    drop_last = train if drop_last is None else drop_last
    batchable = (
        isinstance(images, ArrayImageSet)
        and info.augmentation == "crop_flip"
        and images.images.shape[1:3] == (info.image_size, info.image_size)
    )
    if fast and not batchable:
        raise ValueError(
            f"the on-device batch path needs {info.image_size}x{info.image_size} images held in memory and "
            f"crop+flip augmentation; {info.name} has {'in-memory' if images.in_memory else 'file-backed'} "
            f"images and {info.augmentation!r} augmentation (use fast=False or fast=None)"
        )
    if fast is None:
        fast = batchable
    loader: DeviceBatchLoader | SampleLoader
    if fast and isinstance(images, ArrayImageSet):
        loader = DeviceBatchLoader(
            images,
            info,
            batch_size=batch_size,
            train=train,
            device=device,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
        )
    else:
        loader = SampleLoader(
            images,
            info,
            batch_size=batch_size,
            train=train,
            device=device,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
            num_workers=num_workers,
        )
    if train and len(loader) == 0:
        raise ValueError(
            f"no training batches: {len(images)} samples, batch_size {batch_size}, drop_last={drop_last}"
        )
    return loader
