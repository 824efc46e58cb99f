"""`itrd demo`: the product's main job end to end on the embedded defaults.

Starts the API and one worker (SQLite, kombu's filesystem broker, a local artifact folder, all under
one state directory), trains a teacher on the built-in digits, distills a smaller student from it
with ITRD through the HTTP API, downloads the student, checks its sha256, loads it, and prints both
accuracies.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx

DEMO_TEACHER = "resnet20"
DEMO_STUDENT = "resnet8"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_specs(epochs: int, subset: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher-training spec and the distillation spec (its teacher filled in later)."""
    optim = {"epochs": epochs, "batch_size": 64, "lr": 0.1, "lr_decay_epochs": [max(epochs - 1, 1)]}
    dataset = {"name": "digits", "subset": subset}
    teacher = {"kind": "train", "model": DEMO_TEACHER, "dataset": dataset, "optim": optim, "device": "cpu"}
    student = {"kind": "distill", "model": DEMO_STUDENT, "dataset": dataset, "optim": optim,
               "method": {"name": "itrd"}, "device": "cpu"}
    return teacher, student


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Poll /readyz until the service answers 200 (or fail if its process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the service exited early (code {proc.returncode})")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise click.ClickException("the service did not become ready in time")


def follow(client: httpx.Client, job_id: str, label: str, headers: dict[str, str]) -> dict[str, Any]:
    """Poll a job with a progress bar until it ends; returns the final job."""
    with click.progressbar(length=1000, label=label, show_percent=True) as bar:
        done = 0
        while True:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).raise_for_status().json()
            fraction = float((job.get("progress") or {}).get("fraction") or 0.0)
            target = int(1000 * (1.0 if job["status"] == "succeeded" else fraction))
            if target > done:
                bar.update(target - done)
                done = target
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def download(client: httpx.Client, job_id: str, name: str, dest: Path, headers: dict[str, str]) -> str:
    """Download an artifact and check it against the sha256 the service lists for it."""
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).raise_for_status().json()
    items = listing["items"] if isinstance(listing, dict) else listing
    expected = next(a["sha256"] for a in items if a["name"] == name)
    with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers) as r:
        r.raise_for_status()
        h = hashlib.sha256()
        with open(dest, "wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
                h.update(chunk)
    if h.hexdigest() != expected:
        raise click.ClickException(f"{name}: sha256 mismatch after download")
    return expected


@click.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the embedded service keeps everything (default: a fresh temporary folder).")
@click.option("--epochs", default=5, show_default=True, help="Epochs for the teacher and for the student.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("student.safetensors"), show_default=True, help="Where to save the student.")
@click.option("--subset", type=int, default=None, help="Use only N images of each split (a quick check).")
def demo(state_dir: Path | None, epochs: int, out_path: Path, subset: int | None) -> None:
    """Train a teacher and distill a student through the embedded service, then print both accuracies."""
    state = state_dir or Path(tempfile.mkdtemp(prefix="itrd-demo-"))
    port = _free_port()
    env = {**os.environ, "ITRD_STATE_DIR": str(state)}
    for key in ("ITRD_DATABASE_URL", "ITRD_BROKER_URL", "ITRD_ARTIFACT_STORE"):
        env.pop(key, None)  # the demo is the embedded default, whatever this shell has configured
    click.echo(f"starting the embedded service on port {port}, state in {state}")
    proc = subprocess.Popen([sys.executable, "-m", "itrd", "serve", "--port", str(port)], env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            wait_ready(client, proc)
            headers = demo_headers(client, env)
            teacher_spec, student_spec = demo_specs(epochs, subset)
            t = client.post("/v1/jobs", json=teacher_spec, headers=headers).raise_for_status().json()
            student_spec["teacher"] = {"architecture": DEMO_TEACHER, "job": t["id"]}
            s = client.post("/v1/jobs", json=student_spec, headers=headers).raise_for_status().json()
            click.echo(f"submitted teacher job {t['id']} ({DEMO_TEACHER}) and student job {s['id']} "
                       f"({DEMO_STUDENT}, ITRD), which waits for it")
            t = follow(client, t["id"], f"teacher {DEMO_TEACHER:>9s}", headers)
            if t["status"] != "succeeded":
                raise click.ClickException(f"teacher job {t['status']}: {t.get('failure_reason')}")
            s = follow(client, s["id"], f"student {DEMO_STUDENT:>9s}", headers)
            if s["status"] != "succeeded":
                raise click.ClickException(f"student job {s['status']}: {s.get('failure_reason')}")
            digest = download(client, s["id"], "student.safetensors", out_path, headers)
        report(t, s, out_path, digest)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def demo_headers(client: httpx.Client, env: dict[str, str]) -> dict[str, str]:
    """Request headers for the demo's calls: a fresh API key of owner 'demo' in the service's database.

    Made straight in the database the service has migrated (it answered /readyz), as `itrd keys
    create demo` would, and checked against the API before the demo relies on it.
    """
    from service.config import Settings
    from service.db import make_engine, session_scope
    from service.keys import create_key

    # The service's own derivation: the embedded default under its state dir, whatever this shell says.
    settings = Settings(state_dir=Path(env["ITRD_STATE_DIR"]), environment="development", database_url="",
                        broker_url="", artifact_store="")
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            row, key = create_key(session, "demo", name="itrd demo")
    finally:
        engine.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    if client.get("/v1/jobs", params={"limit": 1}, headers=headers).status_code != 200:
        raise click.ClickException("the service refused the demo's new API key")
    click.echo(f"made API key {row.id} for owner 'demo' (the service answers 401 without one)")
    return headers


def report(teacher: dict[str, Any], student: dict[str, Any], weights: Path, digest: str) -> None:
    """Load the downloaded student and print the accuracies of both."""
    from safetensors.torch import load_file

    from itrd.models import create_model

    model = create_model(DEMO_STUDENT, 10)
    model.load_state_dict(load_file(str(weights)), strict=True)
    t, s = teacher["result"], student["result"]
    click.echo("")
    click.echo(f"teacher {DEMO_TEACHER}: test top-1 {t['final_top1']:.2f}%")
    click.echo(f"student {DEMO_STUDENT} (ITRD): test top-1 {s['final_top1']:.2f}% "
               f"(teacher measured at {s['teacher_top1']:.2f}%)")
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"student weights: {weights} ({n:,} parameters, sha256 {digest[:16]}…), loaded and verified")
