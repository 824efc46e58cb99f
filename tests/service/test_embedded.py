"""The embedded default end to end: `itrd demo` brings up API + worker on SQLite and the file broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from itrd.models import create_model

pytestmark = pytest.mark.slow


def test_demo_trains_a_teacher_and_distills_a_student(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRD_")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "student.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "itrd", "demo", "--epochs", "2", "--subset", "384",
         "--state-dir", str(tmp_path / "state"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    teacher = re.search(r"teacher resnet20: test top-1 ([\d.]+)%", result.stdout)
    student = re.search(r"student resnet8 \(ITRD\): test top-1 ([\d.]+)%", result.stdout)
    assert teacher and student, result.stdout
    assert 0.0 <= float(student.group(1)) <= 100.0
    # Everything lives under the one state directory: SQLite file, broker folders, artifacts.
    state = tmp_path / "state"
    assert (state / "itrd.db").exists() and (state / "broker").is_dir() and (state / "artifacts").is_dir()
    model = create_model("resnet8", 10)
    model.load_state_dict(load_file(str(out)), strict=True)
