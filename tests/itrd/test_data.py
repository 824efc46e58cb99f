"""Tests for itrd.data: datasets from disk and built in, augmentation, and the two batch paths."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import cifar as tv_cifar

from itrd.data import (
    ArrayImageSet,
    DatasetInfo,
    DeviceBatchLoader,
    FileImageSet,
    SampleLoader,
    dataset_names,
    load_dataset,
    make_loader,
)
from itrd.data.cifar import read_batch
from itrd.data.digits import stratified_split, upsample_digits
from itrd.data.transforms import crop_flip, normalize

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_info(hflip: bool = True) -> DatasetInfo:
    return DatasetInfo("tiny", 10, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, [str(i) for i in range(10)], hflip)


def random_set(n: int, seed: int = 0) -> ArrayImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    return ArrayImageSet(images, torch.randint(0, 10, (n,), generator=g))


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the authors' rows: all red values, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


# name -> (folder, train files, test file, meta file, label key, meta entries, classes, images per file)
CIFAR_FIXTURES: dict[str, tuple[str, list[str], str, str, str, dict[str, Any], int, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 2, "num_vis": 3072},
        10,
        2,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_labels",
        {
            "fine_label_names": [f"c{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)],
        },
        100,
        7,
    ),
}


def write_cifar(root: Path, name: str, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write a few images in torchvision's CIFAR on-disk format; return train/test images and labels."""
    folder, train_files, test_file, meta_file, label_key, meta, classes, per_file = CIFAR_FIXTURES[name]
    rng = np.random.default_rng(seed)
    directory = root / folder
    directory.mkdir(parents=True)
    written: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for split, file in [("train", f) for f in train_files] + [("test", test_file)]:
        images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, per_file).tolist()
        entry = {
            "batch_label": file,
            label_key: labels,
            "data": cifar_rows(images),
            "filenames": [f"{file}_{k}.png" for k in range(per_file)],
        }
        if name == "cifar100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        (directory / file).write_bytes(pickle.dumps(entry, protocol=2))
        written[split][0].append(images)
        written[split][1].extend(labels)
    (directory / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    train, test = written["train"], written["test"]
    return np.concatenate(train[0]), train[1], np.concatenate(test[0]), test[1]


# ---------------------------------------------------------------- registry


def test_dataset_names_and_unknown_name() -> None:
    assert set(dataset_names()) >= {"digits", "cifar10", "cifar100", "imagefolder"}
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*digits"):
        load_dataset("mnist", None)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def test_digits_shapes_split_and_info(digits) -> None:
    from sklearn.datasets import load_digits

    train, test, info = digits.train, digits.test, digits.info
    assert len(train) + len(test) == 1797
    assert isinstance(train, ArrayImageSet) and train.images.shape == (len(train), 32, 32, 3)
    assert train.images.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert torch.equal(train.images[..., 0], train.images[..., 2])
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert info.num_classes == 10 and info.image_size == 32 and info.hflip is False
    # stratified: every class holds out about 20%
    all_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(test.targets, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 0.5)
    # mean/std come from the training split only
    pixels = train.images.double().div(255)
    assert info.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-9)
    assert info.std[1] == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-9)
    assert info.mean[0] != pytest.approx(test.images.double().div(255).mean().item(), rel=1e-6)


def test_digits_are_deterministic_and_match_sklearn(digits) -> None:
    from sklearn.datasets import load_digits

    again = load_dataset("digits", None)
    assert isinstance(again.train, ArrayImageSet)
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.targets, digits.test.targets)
    bunch = load_digits()
    train_idx, test_idx = stratified_split(bunch.target, 0.2, 0)
    assert sorted([*train_idx, *test_idx]) == list(range(1797))
    expected = upsample_digits(bunch.images)
    assert torch.equal(digits.test.images, expected[torch.from_numpy(test_idx)])
    assert digits.train.targets.tolist() == bunch.target[train_idx].tolist()


def test_upsample_digits_is_bilinear_and_in_range() -> None:
    flat = np.full((1, 8, 8), 16.0)
    assert torch.all(upsample_digits(flat) == 255)
    ramp = np.tile(np.arange(8, dtype=np.float64) * 2, (1, 8, 1))  # 0..14 along the columns
    row = upsample_digits(ramp)[0, 0, :, 0].int()
    # bilinear: monotone, with intermediate values, not 4-pixel blocks as nearest would give
    assert torch.all(row[1:] >= row[:-1]) and len(torch.unique(row)) > 8


# ---------------------------------------------------------------- CIFAR on disk


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_fixture_loads_through_real_reader(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_images, train_labels, test_images, test_labels = write_cifar(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert isinstance(data.train, ArrayImageSet) and data.train.in_memory
    assert np.array_equal(data.train.images.numpy(), train_images)
    assert data.train.targets.tolist() == train_labels
    assert isinstance(data.test, ArrayImageSet)
    assert np.array_equal(data.test.images.numpy(), test_images)
    assert data.test.targets.tolist() == test_labels
    info = data.info
    assert info.hflip and info.image_size == 32
    # torchvision's own reader (checksums off: the fixture is not the real file) sees the same data
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    reference = (tv_cifar.CIFAR10 if name == "cifar10" else tv_cifar.CIFAR100)(str(tmp_path), train=True)
    assert np.array_equal(reference.data, train_images) and reference.targets == train_labels
    assert reference.classes == info.classes
    if name == "cifar10":
        assert info.classes == CIFAR10_NAMES and info.mean == (0.4914, 0.4822, 0.4465)
    else:
        assert info.num_classes == 100 and info.std == (0.2673, 0.2564, 0.2762)


def test_cifar_missing_files_explain_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar100", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message and "download: true" in message


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeTorchvisionCifar:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            write_cifar(Path(root), "cifar10")

    from itrd.data import cifar

    monkeypatch.setattr(
        cifar,
        "CIFAR10",
        cifar.CifarLayout(**{**cifar.CIFAR10.__dict__, "torchvision_class": FakeTorchvisionCifar}),
    )
    assert len(load_dataset("cifar10", tmp_path, download=True).train) == 10
    assert calls == [(str(tmp_path), True, True)]


def test_cifar_reader_refuses_pickled_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.getcwd"):
        read_batch(path)


# ---------------------------------------------------------------- ImageFolder


def write_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (30 + 5 * k, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{k}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_loads_lazily_with_imagenet_transforms(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.classes == ["cat", "dog"] and data.info.image_size == 224
    assert isinstance(data.train, FileImageSet) and not data.train.in_memory
    assert len(data.train) == 6 and data.test.targets.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="in memory"):
        make_loader(data.train, data.info, batch_size=2, train=True, device="cpu", seed=0, epoch=0, fast=True)

    train = make_loader(data.train, data.info, batch_size=4, train=True, device="cpu", seed=0, epoch=0)
    assert isinstance(train, SampleLoader)
    batches = collect(train)
    assert [x.shape for x, _, _ in batches] == [(4, 3, 224, 224)]  # 6 samples, last partial batch dropped

    evaluation = collect(
        make_loader(data.test, data.info, batch_size=3, train=False, device="cpu", seed=0, epoch=0)
    )
    x = torch.cat([b[0] for b in evaluation])
    assert isinstance(data.test, FileImageSet)
    with Image.open(data.test.paths[2]) as img:
        resized = TF.center_crop(TF.resize(img.convert("RGB"), 256), 224)
    expected = TF.normalize(TF.to_tensor(resized), data.info.mean, data.info.std)
    assert torch.equal(x[2], expected)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_dataset("imagefolder", tmp_path, download=True)
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird"):
        load_dataset("imagefolder", tmp_path)


# ---------------------------------------------------------------- augmentation: exactness and distribution


def reference_augment(
    image: torch.Tensor, info: DatasetInfo, top: int, left: int, flip: bool
) -> torch.Tensor:
    """What torchvision's RandomCrop(32, padding=4) -> flip -> ToTensor -> Normalize gives for one draw."""
    pil = Image.fromarray(image.numpy())
    out = TF.crop(TF.pad(pil, [4]), top, left, 32, 32)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), info.mean, info.std)


def test_batch_crop_flip_matches_torchvision_exactly() -> None:
    info = tiny_info()
    image = random_set(1).images[0]
    params = [(t, lft, f) for t in range(9) for lft in range(9) for f in (False, True)]
    offsets = torch.tensor([[t, lft] for t, lft, _ in params])
    flips = torch.tensor([f for _, _, f in params])
    batch = image.permute(2, 0, 1)[None].expand(len(params), -1, -1, -1)
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    ours = normalize(crop_flip(batch, offsets, flips), mean, std)
    for k, (top, left, flip) in enumerate(params):
        assert torch.equal(ours[k], reference_augment(image, info, top, left, flip)), (top, left, flip)


def identify_params(xs: torch.Tensor, image: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """For each augmented image, the (top, left, flip) that produced it; fails unless one matches exactly."""
    params = torch.tensor([(t, lft, f) for t in range(9) for lft in range(9) for f in (0, 1)])
    candidates = torch.stack(
        [reference_augment(image, info, int(t), int(lft), bool(f)) for t, lft, f in params]
    )
    distances = torch.cdist(xs.flatten(1).double(), candidates.flatten(1).double())
    best = distances.argmin(1)
    assert torch.equal(xs, candidates[best]), "an augmented image is not any torchvision crop/flip"
    return params[best]


def chi2_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("hflip", [True, False])
def test_both_paths_draw_the_same_augmentation_distribution(hflip: bool) -> None:
    info = tiny_info(hflip)
    image = random_set(1, seed=3).images[0]
    n = 1200
    repeated = ArrayImageSet(image[None].expand(n, -1, -1, -1).clone(), torch.zeros(n, dtype=torch.int64))
    drawn = {}
    for fast in (True, False):
        loader = make_loader(
            repeated, info, batch_size=100, train=True, device="cpu", seed=5, epoch=2, fast=fast
        )
        xs = torch.cat([x for x, _, _ in loader])
        drawn[fast] = identify_params(xs, image, info)
    for params in drawn.values():
        for axis in (0, 1):
            # df = 8; 26.1 is the 0.999 quantile. Deterministic given the seed, so this never flakes.
            assert chi2_uniform(torch.bincount(params[:, axis], minlength=9).double()) < 26.1
        flip_rate = params[:, 2].double().mean().item()
        assert (abs(flip_rate - 0.5) < 0.06) if hflip else flip_rate == 0.0
    # and the two paths agree with each other (two-sample chi-square over the 9 top offsets)
    a, b = (torch.bincount(drawn[f][:, 0], minlength=9).double() for f in (True, False))
    assert float(((a - b) ** 2 / (a + b)).sum()) < 26.1


# ---------------------------------------------------------------- order, determinism, batch sizes


@pytest.mark.parametrize("fast", [True, False])
def test_order_and_augmentation_are_a_function_of_seed_and_epoch(fast: bool) -> None:
    data, info = random_set(50), tiny_info()

    def run(seed: int, epoch: int, **kw):
        return collect(
            make_loader(
                data, info, batch_size=16, train=True, device="cpu", seed=seed, epoch=epoch, fast=fast, **kw
            )
        )

    first = run(7, 3)
    loader = make_loader(data, info, batch_size=16, train=True, device="cpu", seed=7, epoch=3, fast=fast)
    for again in (run(7, 3), collect(loader), collect(loader)):
        assert all(
            torch.equal(a, b)
            for ba, bb in zip(first, again, strict=True)
            for a, b in zip(ba, bb, strict=True)
        )
    other_epoch, other_seed = run(7, 4), run(8, 3)
    assert not torch.equal(first[0][2], other_epoch[0][2])
    assert not torch.equal(first[0][2], other_seed[0][2])
    for x, y, idx in first:
        assert torch.equal(y, data.targets[idx]) and x.dtype == torch.float32
    assert sorted(torch.cat([b[2] for b in first]).tolist()) != list(range(48))  # shuffled, 2 dropped


def test_paths_share_the_order_and_workers_do_not_change_results() -> None:
    data, info = random_set(40), tiny_info()
    kw: dict[str, Any] = dict(batch_size=8, train=True, device="cpu", seed=1, epoch=0)
    fast = collect(make_loader(data, info, fast=True, **kw))
    slow = collect(make_loader(data, info, fast=False, **kw))
    workers = collect(make_loader(data, info, fast=False, num_workers=2, **kw))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(fast, slow, strict=True))
    assert all(
        torch.equal(a, b) for ba, bb in zip(slow, workers, strict=True) for a, b in zip(ba, bb, strict=True)
    )


def test_per_sample_path_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    collect(
        make_loader(
            random_set(10), tiny_info(), batch_size=5, train=True, device="cpu", seed=0, epoch=0, fast=False
        )
    )
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fast", [True, False])
def test_eval_is_ordered_unaugmented_and_keeps_the_tail(fast: bool) -> None:
    data, info = random_set(21), tiny_info()
    batches = collect(
        make_loader(data, info, batch_size=10, train=False, device="cpu", seed=0, epoch=0, fast=fast)
    )
    assert [len(b[2]) for b in batches] == [10, 10, 1]
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(21))
    expected = normalize(data.images.permute(0, 3, 1, 2), torch.tensor(info.mean), torch.tensor(info.std))
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)


@pytest.mark.parametrize("fast", [True, False])
def test_train_batch_sizes(fast: bool) -> None:
    info = tiny_info()

    def sizes(n: int, **kw) -> list[int]:
        loader = make_loader(
            random_set(n), info, batch_size=8, train=True, device="cpu", seed=0, epoch=0, fast=fast, **kw
        )
        return [len(b[2]) for b in loader]

    assert sizes(21) == [8, 8]  # drop_last defaults to True in training
    assert sizes(19, drop_last=False) == [8, 8, 3]
    assert sizes(17, drop_last=False) == [8, 8]  # a lone trailing sample is never a batch
    with pytest.raises(ValueError, match="batch_size >= 2"):
        make_loader(random_set(4), info, batch_size=1, train=True, device="cpu", seed=0, epoch=0)
    with pytest.raises(ValueError, match="no training batches"):
        make_loader(random_set(4), info, batch_size=8, train=True, device="cpu", seed=0, epoch=0)


def test_fast_is_the_default_for_in_memory_sets_and_subset_works(digits) -> None:
    small = digits.train.subset(range(64))
    assert torch.equal(small.images, digits.train.images[:64])
    loader = make_loader(small, digits.info, batch_size=32, train=True, device="cpu", seed=0, epoch=0)
    assert isinstance(loader, DeviceBatchLoader) and len(loader) == 2


def test_image_set_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageSet(torch.zeros(2, 32, 32, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets"):
        ArrayImageSet(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
