"""The built-in demo dataset: scikit-learn's 8x8 handwritten digits, brought to 32x32 RGB.

This is the UCI "optical recognition of handwritten digits" test set that scikit-learn ships inside its
package (1797 images, 10 classes, 8x8 pixels with intensities 0..16), so it needs no download. It is tiny
and easy: good for demos, smoke runs and tests, and says nothing about CIFAR or ImageNet accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from itrd.data.base import ArrayImageSet, DatasetInfo, LoadedDataset
from itrd.data.registry import register_dataset

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def upsample_digits(images: np.ndarray) -> Tensor:
    """Map (N, 8, 8) intensities in 0..16 to uint8 (N, 32, 32, 3) images.

    Intensities are scaled to 0..255, upsampled with bilinear interpolation (align_corners=False), so strokes
    are smooth rather than 4x4 blocks, rounded, and the grey channel is replicated to RGB.
    """
    grey = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] * (255.0 / 16.0)
    # bilinear weights are convex, so the output stays within 0..255 and the clamp only guards rounding
    big = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    big = big.round().clamp(0, 255).to(torch.uint8)
    return big.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays holding `test_fraction` of every class out for testing."""
    rng = np.random.default_rng(seed)
    test_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[: round(len(members) * test_fraction)])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


@register_dataset("digits")
def load_digits(root: Path | None, download: bool) -> LoadedDataset:
    """Load the digits (root and download are ignored: the data ships with scikit-learn).

    The split is stratified, 20% test, seed 0, so it is the same on every machine. Mean and std are
    computed from the training split; flipping is off because digits are not mirror-symmetric.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    images = upsample_digits(bunch.images)
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    full = ArrayImageSet(images, torch.from_numpy(labels))
    train = full.subset(torch.from_numpy(train_idx))
    test = full.subset(torch.from_numpy(test_idx))

    pixels = train.images.to(torch.float64).div(255).reshape(-1, 3)
    mean = pixels.mean(dim=0).tolist()
    std = pixels.std(dim=0, unbiased=False).tolist()
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        image_size=IMAGE_SIZE,
        classes=[str(d) for d in range(10)],
        hflip=False,
    )
    return LoadedDataset(info=info, train=train, test=test)
