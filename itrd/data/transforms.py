"""Augmentation: torchvision transforms for one sample, and the same crop/flip/normalise for whole batches.

The batch functions reproduce `RandomCrop(size, padding=4)` -> `RandomHorizontalFlip` -> `ToTensor` ->
`Normalize` bit for bit, given the same crop offsets and flip decisions, and draw those from the same
distribution: offsets uniform on 0..2*padding in each axis, each flip with probability 1/2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from itrd.data.base import DatasetInfo

PADDING = 4
# ImageNet evaluation resizes the short side to 256 before the 224 centre crop; kept proportional for
# other sizes
_RESIZE_RATIO = 256 / 224

SampleTransform = Callable[[Image.Image], Tensor]


def train_transform(info: DatasetInfo) -> SampleTransform:
    """The per-sample training transform: the paper's crop+flip recipe, or ImageNet's resized crop+flip."""
    steps: list[Callable] = []
    if info.augmentation == "crop_flip":
        steps.append(T.RandomCrop(info.image_size, padding=PADDING))
    else:
        steps.append(T.RandomResizedCrop(info.image_size))
    if info.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


def eval_transform(info: DatasetInfo) -> SampleTransform:
    """The per-sample evaluation transform: no randomness, just (resize and centre crop and) normalise."""
    steps: list[Callable] = []
    if info.augmentation == "imagenet":
        steps += [T.Resize(round(info.image_size * _RESIZE_RATIO)), T.CenterCrop(info.image_size)]
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


def draw_crop_flip(n: int, padding: int, hflip: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random (top, left) crop offsets (n, 2), uniform on 0..2*padding, and flip flags of shape (n,)."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips if hflip else torch.zeros_like(flips)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int = PADDING) -> Tensor:
    """Zero-pad (B, C, H, W) images by `padding`, crop HxW at each sample's offset, mirror where flagged."""
    b, _, h, w = images.shape
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    padded = F.pad(images, (padding, padding, padding, padding))
    # the crop at left offset 2p - x of the mirrored padded image is the mirror of the crop at x, so crop
    # and flip are one gather of (h, w) windows from [padded; mirrored], with no host sync on a GPU
    windows = torch.cat([padded, padded.flip(3)]).unfold(2, h, 1).unfold(3, w, 1)  # (2B, C, 2p+1, 2p+1, h, w)
    source = torch.arange(b, device=device) + b * flips.long()
    left = torch.where(flips, 2 * padding - offsets[:, 1], offsets[:, 1])
    return windows[source, :, offsets[:, 0], left]


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 in 0..1, standardised per channel, as ToTensor+Normalize do."""
    x = images.to(torch.float32).div_(255)
    return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
