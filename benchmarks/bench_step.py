"""Cost of one distillation training step per method, and of the ITRD loss on its own.

One step = frozen teacher forward (eval, no_grad) + student forward + method loss + backward + SGD
step over the student's and the method's parameters, for resnet32x4 -> resnet8x4 on random
CIFAR-100-shaped batches. Methods run in rounds, one step each per round in a shuffled order, so a
change in machine load hits them all alike and no method always follows the same one. Ratios to KD
are medians of the per-round ratios (each pair timed seconds apart), which shared machines need.

    .venv/bin/python benchmarks/bench_step.py --warmup 3 --iters 10 --threads 2

Prints each method's step time (median and minimum) and its ratio to the KD step, then the ITRD
loss alone (forward + backward) at batch 64, 256 and 1024 and its share of the student's training
step. On a shared machine the minima are the steadier estimate of what a step costs.
Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from itrd.losses import Batch, ITRDLoss, Method, build_method
from itrd.models import create_model

NUM_CLASSES = 100
NUM_SAMPLES = 50_000  # CIFAR-100's training set: sizes CRD's memory banks
METHODS = ("ce", "kd", "itrd", "crd")


def feature_dim(model: nn.Module) -> int:
    """The model's pooled feature size (every zoo model exposes it)."""
    dim: object = model.feature_dim
    assert isinstance(dim, int)
    return dim


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of `fn` takes."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class StepRunner:
    """One method's training step on its own copy of the student and its own optimizer."""

    def __init__(self, name: str, student: nn.Module, teacher: nn.Module, device: torch.device) -> None:
        self.student = copy.deepcopy(student).to(device).train()
        self.teacher = teacher
        targets = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,))
        self.method: Method = build_method(
            name,
            student_dim=feature_dim(self.student),
            teacher_dim=feature_dim(teacher),
            num_classes=NUM_CLASSES,
            num_samples=NUM_SAMPLES,
            train_targets=targets,
        ).to(device)
        self.method.train()
        params = [*self.student.parameters(), *self.method.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> None:
        """One full training step on the batch."""
        teacher_features = teacher_logits = None
        if self.method.needs_teacher:
            # no_grad, not inference_mode: inference tensors cannot enter the student's autograd graph.
            with torch.no_grad():
                teacher_features, teacher_logits = self.teacher(x)
        features, logits = self.student(x)
        batch = Batch(features, logits, y, idx, teacher_features, teacher_logits)
        loss = self.method(batch).total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def bench_steps(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Step seconds per method, one entry per timed round."""
    torch.manual_seed(0)
    teacher = create_model(args.teacher, NUM_CLASSES).to(device).eval()
    teacher.requires_grad_(False)
    student = create_model(args.student, NUM_CLASSES)
    runners = {name: StepRunner(name, student, teacher, device) for name in METHODS}
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    order = random.Random(0)
    for round_ in range(args.warmup + args.iters):
        idx = torch.randint(0, NUM_SAMPLES, (args.batch,), device=device)
        for name in order.sample(METHODS, len(METHODS)):
            seconds = timed(functools.partial(runners[name].step, x, y, idx), device)
            if round_ >= args.warmup:
                times[name].append(seconds)
    return times


def bench_itrd_loss(
    batch: int, dim_s: int, dim_t: int, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """Median and minimum seconds of the ITRD loss forward + backward alone."""
    loss = ITRDLoss(dim_s, dim_t).to(device)
    z_s = torch.randn(batch, dim_s, device=device, requires_grad=True)
    z_t = torch.randn(batch, dim_t, device=device)

    def run() -> None:
        loss(z_s, z_t).total.backward()

    # The loss is cheap, so more repeats than steps keep its figures steady.
    repeats = 5 * (args.warmup + args.iters)
    samples = [timed(run, device) for _ in range(repeats)][5 * args.warmup :]
    return statistics.median(samples), min(samples)


def main() -> None:
    """Parse arguments, run both benchmarks and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (one step per method each)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
        f"{args.iters} timed rounds after {args.warmup} warm-up"
    )

    rounds = bench_steps(args, device)
    best = {name: min(values) for name, values in rounds.items()}
    steps = {name: statistics.median(values) for name, values in rounds.items()}
    print("\nfull training step   median ms  (ratio to kd: median of per-round ratios)   min ms  (ratio of mins)")
    for name, values in rounds.items():
        ratio = statistics.median(t / k for t, k in zip(values, rounds["kd"], strict=True))
        print(
            f"  {name:5s} {steps[name] * 1e3:20.1f}  (x{ratio:.3f}) {best[name] * 1e3:34.1f}  "
            f"(x{best[name] / best['kd']:.3f})"
        )
    itrd_ratio = statistics.median(t / k for t, k in zip(rounds["itrd"], rounds["kd"], strict=True))
    print(
        f"  itrd vs kd: {itrd_ratio - 1:+.1%} by per-round ratios, {best['itrd'] / best['kd'] - 1:+.1%} "
        "by minima (target within 3%)"
    )

    teacher = create_model(args.teacher, NUM_CLASSES)
    student = create_model(args.student, NUM_CLASSES)
    print(f"\nITRD loss alone, forward + backward, d_s={feature_dim(student)}, d_t={feature_dim(teacher)}")
    for batch in (64, 256, 1024):
        median, fastest = bench_itrd_loss(batch, feature_dim(student), feature_dim(teacher), args, device)
        line = f"  batch {batch:5d}: median {median * 1e3:8.3f} ms, min {fastest * 1e3:8.3f} ms"
        if batch == args.batch:
            line += (
                f"   = {median / steps['ce']:.2%} (medians), {fastest / best['ce']:.2%} (minima) of the "
                "student's own step (ce); target < 2%"
            )
            # What the loss can add to a KD-sized step, free of the step-to-step noise above.
            line += f"\n{'':18s}= {fastest / best['kd']:.2%} of the kd step (minima)"
        print(line)


if __name__ == "__main__":
    main()
