"""Distillation throughput: the engine's fast path vs its per-sample path vs a reference-style loop.

The reference-style loop is written here from the structure of the authors' released training loop
(RepDistiller's `train_distill`): a per-sample torchvision DataLoader, the teacher run as trained
(batch norm unfolded, default memory format) under `no_grad`, and meters that read `loss.item()` and
the batch accuracy back to the host every step. Same models, same ITRD loss, same batch size.

    .venv/bin/python benchmarks/bench_train.py --images 1024 --workers 1

Prints images/s for each and the ratio to the reference. The engine runs with the settings that
`auto` picks on this machine (bf16 autocast where the CPU or GPU multiplies bf16 natively,
channels_last) and, where that is not float32, once more in float32 so both figures are on record.
Not a test: figures depend on the machine.
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


def engine_images_per_second(data: LoadedDataset, teacher: Path, args: argparse.Namespace, out: Path, *,
                             fast: bool, precision: str = "auto", compile: bool = False) -> tuple[float, str]:
    """Steady-state images/s of the engine (its second epoch) and the settings `auto` resolved to."""
    spec = JobSpec.model_validate({
        "model": args.student, "teacher": {"architecture": args.teacher, "path": str(teacher)},
        "optim": {"epochs": 2, "batch_size": args.batch, "lr_decay_epochs": []}, "device": args.device,
        "fast_data": fast, "num_workers": 0 if fast else args.workers, "precision": precision, "compile": compile,
    })
    trainer = Trainer(spec, out, data=data)
    trainer.run()
    settings = trainer.execution.precision + (", channels_last" if trainer.execution.channels_last else "")
    return float(trainer.progress.history[-1]["images_per_second"]), settings


def reference_images_per_second(data: LoadedDataset, args: argparse.Namespace) -> float:
    """The reference-style loop, two epochs; the second is timed (as for the engine)."""
    device = torch.device(args.device if args.device != "auto" else "cpu")
    student = create_model(args.student, 100).to(device)
    teacher = create_model(args.teacher, 100).to(device).eval()
    crit = ITRDLoss(student.feature_dim, teacher.feature_dim).to(device)  # type: ignore[arg-type]
    opt = torch.optim.SGD([*student.parameters(), *crit.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    student.train()
    rate = 0.0
    for epoch in range(2):
        loader = make_loader(data.train, data.info, batch_size=args.batch, train=True, device=device, seed=0,
                             epoch=epoch, fast=False, num_workers=args.workers)
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
        rate = seen / (time.perf_counter() - start)
    return rate


def main() -> None:
    """Run the loops on the same synthetic data and print images/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024, help="training images per measured epoch")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the per-sample paths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = synthetic(args.images)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = teacher_file(root, args.teacher)
        reference = reference_images_per_second(data, args)
        rows.append((f"reference-style loop (fp32, per-sample loader, {args.workers} workers)", reference))
        rate, auto = engine_images_per_second(data, teacher, args, root / "sample", fast=False)
        rows.append((f"engine, per-sample loader, auto = {auto}", rate))
        rate, auto = engine_images_per_second(data, teacher, args, root / "fast", fast=True)
        rows.append((f"engine, fast path, auto = {auto}", rate))
        if not auto.startswith("fp32"):
            rate, settings = engine_images_per_second(data, teacher, args, root / "fp32", fast=True,
                                                      precision="fp32")
            rows.append((f"engine, fast path, {settings}", rate))
        if args.compile:
            rate, settings = engine_images_per_second(data, teacher, args, root / "compiled", fast=True,
                                                      compile=True)
            rows.append((f"engine, fast path, {settings}, compiled", rate))
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.images} images, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("second-epoch images/s (the first epoch warms up kernels and compilation):")
    for label, rate in rows:
        print(f"  {label:<66} {rate:8.1f} img/s  {rate / reference:5.2f}x reference")
    per_sample, fast = rows[1][1], rows[2][1]
    print(f"fast path / per-sample path (same settings) = {fast / per_sample:.2f}x")


if __name__ == "__main__":
    main()
