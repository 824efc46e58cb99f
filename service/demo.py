"""`itrd demo`: the product's main job end to end on the embedded defaults.

Starts the API and one worker (SQLite, kombu's filesystem broker, a local artifact folder, all under
one state directory), trains a teacher on the built-in digits, distills a smaller student from it
with ITRD through the HTTP API, downloads the student, checks its sha256, loads it, and prints both
accuracies.
"""

from __future__ import annotations

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

from itrd.client import Client, ClientError

DEMO_TEACHER = "resnet20"  # the demo-digits preset's pair
DEMO_STUDENT = "resnet8"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_specs(epochs: int, subset: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo preset's teacher-training spec and distillation spec (its teacher filled in later)."""
    from itrd.spec import preset_spec

    specs = []
    for kind in ("train", "distill"):
        spec = preset_spec("demo-digits", kind=kind).model_dump(mode="json", exclude_none=True)
        spec["optim"].update(epochs=epochs, lr_decay_epochs=[max(epochs - 1, 1)])
        spec["dataset"]["subset"] = subset
        spec["device"] = "cpu"
        spec.pop("teacher", None)
        specs.append(spec)
    return specs[0], specs[1]


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
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30.0) as probe:
            wait_ready(probe, proc)
            key = demo_key(probe, env)
        with Client(url, api_key=key) as client:
            teacher_spec, student_spec = demo_specs(epochs, subset)
            t = client.submit(teacher_spec)
            student_spec["teacher"] = {"architecture": DEMO_TEACHER, "job": t.id}
            s = client.submit(student_spec)
            click.echo(f"submitted teacher job {t.id} ({DEMO_TEACHER}) and student job {s.id} "
                       f"({DEMO_STUDENT}, ITRD), which waits for it")
            try:
                t = client.wait(t.id)
                s = client.wait(s.id)
            except ClientError as exc:
                raise click.ClickException(str(exc)) from exc
            client.download(s.id, "student.safetensors", out_path)  # resumable, sha256-checked
            digest = next(a.sha256 for a in client.artifacts(s.id) if a.name == "student.safetensors")
        report(t.result or {}, s.result or {}, out_path, digest)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def demo_key(client: httpx.Client, env: dict[str, str]) -> str:
    """A fresh API key of owner 'demo' in the service's database, for the demo's calls.

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
    return key


def report(t: dict[str, Any], s: dict[str, Any], weights: Path, digest: str) -> None:
    """Load the downloaded student and print the accuracies of both (from the jobs' run summaries)."""
    from safetensors.torch import load_file

    from itrd.models import create_model

    model = create_model(DEMO_STUDENT, 10)
    model.load_state_dict(load_file(str(weights)), strict=True)
    click.echo("")
    click.echo(f"teacher {DEMO_TEACHER}: test top-1 {t['final_top1']:.2f}%")
    click.echo(f"student {DEMO_STUDENT} (ITRD): test top-1 {s['final_top1']:.2f}% "
               f"(teacher measured at {s['teacher_top1']:.2f}%)")
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"student weights: {weights} ({n:,} parameters, sha256 {digest[:16]}…), loaded and verified")
