"""Does bf16 autocast cost accuracy? Teacher training and ITRD distillation on the built-in digits.

Two experiments with the `demo-digits` recipe (ResNet-20 teacher, ResNet-8 student, 5 epochs):
1. teachers trained from scratch in float32 and under bf16 autocast, one per seed;
2. students distilled with ITRD from one float32 teacher (so only the student's precision differs),
   one per seed and precision.
Prints every run's test top-1, the mean and standard deviation per precision, and the time per run,
so the speed and the accuracy of `precision: auto` are on record side by side. Losses are float32
under autocast, as the engine always computes them. The digits test split has 359 images: one image
is 0.28 points, so differences under about a point are noise at these seed counts.

    .venv/bin/python benchmarks/compare_precision.py --teacher-seeds 3 --student-seeds 8

Not a test: it takes minutes, and what it measures is a property of the method, not of our code.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from itrd.engine import train
from itrd.spec import JobSpec, preset_spec

PRECISIONS = ("fp32", "bf16")


def run(spec: JobSpec, out: Path, **over: Any) -> tuple[float, float]:
    """Final test top-1 and wall seconds of `spec` with `over` applied."""
    data = spec.model_dump()
    data.update(device="cpu", **over)
    start = time.perf_counter()
    summary = train(JobSpec.model_validate(data), out)
    return float(summary["final_top1"]), time.perf_counter() - start


def report(title: str, results: dict[str, list[tuple[float, float]]]) -> None:
    print(title)
    for precision, rows in results.items():
        top1 = [r[0] for r in rows]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        wall = statistics.mean(r[1] for r in rows)
        print(f"  {precision}: top-1 {statistics.mean(top1):6.2f}% ± {spread:4.2f} over {len(rows)} seeds, "
              f"{wall:5.1f} s per run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-seeds", type=int, default=3)
    parser.add_argument("--student-seeds", type=int, default=8)
    args = parser.parse_args()
    teachers: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    students: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_spec = preset_spec("demo-digits", kind="train")
        for seed in range(args.teacher_seeds):
            for precision in PRECISIONS:
                top1, wall = run(teacher_spec, root / f"teacher-{precision}-{seed}", seed=seed, precision=precision)
                teachers[precision].append((top1, wall))
                print(f"teacher seed {seed} {precision}: {top1:6.2f}% ({wall:4.1f} s)", flush=True)
        weights = root / "teacher-fp32-0" / "student.safetensors"
        student_spec = preset_spec("demo-digits", teacher_path=str(weights))
        for seed in range(args.student_seeds):
            for precision in PRECISIONS:
                top1, wall = run(student_spec, root / f"student-{precision}-{seed}", seed=seed, precision=precision)
                students[precision].append((top1, wall))
                print(f"student seed {seed} {precision}: {top1:6.2f}% ({wall:4.1f} s)", flush=True)
    report("teachers (resnet20, cross-entropy, digits test split):", teachers)
    report(f"ITRD students (resnet8) of the fp32 teacher of seed 0 ({teachers['fp32'][0][0]:.2f}%):", students)


if __name__ == "__main__":
    main()
