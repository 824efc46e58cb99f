"""Distillation throughput: the engine's fast path vs its per-sample path vs a reference-style loop.

The reference-style loop is written here from the structure of the authors' released training loop
(RepDistiller's `train_distill`): a per-sample torchvision DataLoader, the teacher run as trained
(batch norm unfolded, default memory format) under `no_grad`, and meters that read `loss.item()` and
the batch accuracy back to the host every step. Same models, same ITRD loss, same batch size.

    .venv/bin/python benchmarks/bench_train.py --images 1024 --workers 1

Prints images/s for each and the ratios. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from itrd.data import ArrayImageSet, DatasetInfo, LoadedDataset, make_loader
from itrd.engine import Trainer
from itrd.losses import ITRDLoss
from itrd.models import create_model
from itrd.spec import JobSpec

CIFAR100 = DatasetInfo(name="cifar100", num_classes=100, mean=(0.5071, 0.4865, 0.4409),
                       std=(0.2673, 0.2564, 0.2762), image_size=32, classes=[str(i) for i in range(100)],
                       hflip=True)


def synthetic(n: int) -> LoadedDataset:
    """CIFAR-shaped uint8 images with random labels: throughput does not depend on the content."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    test = ArrayImageSet(images[:64].clone(), labels[:64].clone())
    return LoadedDataset(info=CIFAR100, train=ArrayImageSet(images, labels), test=test)


def teacher_file(directory: Path, arch: str) -> Path:
    from safetensors.torch import save_file

    model = create_model(arch, 100)
    path = directory / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def engine_images_per_second(data: LoadedDataset, teacher: Path, args: argparse.Namespace, fast: bool,
                             out: Path) -> float:
    spec = JobSpec.model_validate({
        "model": args.student, "teacher": {"architecture": args.teacher, "path": str(teacher)},
        "optim": {"epochs": 1, "batch_size": args.batch, "lr_decay_epochs": []}, "device": args.device,
        "fast_data": fast, "num_workers": 0 if fast else args.workers,
    })
    trainer = Trainer(spec, out, data=data)
    trainer.run()
    return float(trainer.progress.history[-1]["images_per_second"])


def reference_images_per_second(data: LoadedDataset, args: argparse.Namespace) -> float:
    device = torch.device(args.device if args.device != "auto" else "cpu")
    student = create_model(args.student, 100).to(device)
    teacher = create_model(args.teacher, 100).to(device).eval()
    crit = ITRDLoss(student.feature_dim, teacher.feature_dim).to(device)  # type: ignore[arg-type]
    opt = torch.optim.SGD([*student.parameters(), *crit.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(data.train, data.info, batch_size=args.batch, train=True, device=device, seed=0,
                         epoch=0, fast=False, num_workers=args.workers)
    student.train()
    seen, loss_sum, correct = 0, 0.0, 0.0
    start = time.perf_counter()
    for x, y, _ in loader:
        x, y = x.float().to(device), y.to(device)
        with torch.no_grad():
            t_feat, _ = teacher(x)
        s_feat, logits = student(x)
        out = crit(s_feat, t_feat)
        loss = F.cross_entropy(logits, y) + out.total
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * x.size(0)  # the reference meters sync every step
        correct += (logits.argmax(1) == y).float().sum().item()
        seen += x.size(0)
    return seen / (time.perf_counter() - start)


def main() -> None:
    """Run the three loops on the same synthetic data and print images/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024, help="training images per measured epoch")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the per-sample paths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = synthetic(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_file(root, args.teacher)
        reference = reference_images_per_second(data, args)
        per_sample = engine_images_per_second(data, teacher, args, fast=False, out=root / "sample")
        fast = engine_images_per_second(data, teacher, args, fast=True, out=root / "fast")
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.images} images, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  reference-style loop (per-sample loader, {args.workers} workers): {reference:8.1f} img/s")
    print(f"  engine, per-sample DataLoader path ({args.workers} workers):    {per_sample:8.1f} img/s")
    print(f"  engine, fast on-device path:                             {fast:8.1f} img/s")
    print(f"  fast / per-sample = {fast / per_sample:.2f}x   fast / reference = {fast / reference:.2f}x")


if __name__ == "__main__":
    main()
