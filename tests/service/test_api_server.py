"""The API as deployed: a uvicorn process on a real port, configured only by environment variables."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_support import TRAIN_SPEC

from service.db import get_engine, migrate_to_head, session_scope
from service.models import record_artifact
from service.storage import LocalArtifactStore

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # importing torch on a busy 2-core machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A uvicorn process serving the app factory over a migrated SQLite state dir: (base url, state dir)."""
    state = tmp_path / "state"
    migrate_to_head(f"sqlite:///{state / 'itrd.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRD_")}
    env.update(ITRD_STATE_DIR=str(state), ITRD_REAP_SECONDS="0.5")
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not answer in time"
            time.sleep(0.2)
        yield base, state
        proc.terminate()
        # A clean exit: the lifespan stopped the reaper thread and uvicorn shut down gracefully.
        # (uvicorn re-raises the signal once it has shut down, so -SIGTERM is a clean exit too.)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "uvicorn.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_submit_get_and_resume_a_download_over_http(server: tuple[str, Path]) -> None:
    base, state = server
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/readyz").status_code == 200
        created = http.post("/v1/jobs", json=TRAIN_SPEC)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["status"] == "queued" and job["dispatched_at"] is not None
        # At least one: the reaper may also send a job it sees between the commit and the API's own send
        # (a duplicate is harmless: a worker must claim the job's lease first).
        messages = list((state / "broker" / "queue").glob("*.msg"))
        assert messages and all(job["id"] in m.read_text() for m in messages)
        assert http.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]

        # A worker would upload this; here it goes straight into the store and onto the record.
        payload = bytes(range(256)) * 40
        source = state / "best.pt"
        source.write_bytes(payload)
        size, digest = LocalArtifactStore(state / "artifacts").put_file(job["id"], "best.pt", source)
        with session_scope(get_engine(f"sqlite:///{state / 'itrd.db'}")) as session:
            record_artifact(session, job["id"], "best.pt", size, digest)
        url = f"/v1/jobs/{job['id']}/artifacts/best.pt"
        head = http.get(url, headers={"Range": "bytes=0-999"})
        assert head.status_code == 206 and head.content == payload[:1000]
        rest = http.get(url, headers={"Range": "bytes=1000-", "If-Range": head.headers["etag"]})
        assert rest.status_code == 206 and rest.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
        assert head.content + rest.content == payload
        assert_problem_json = http.get(url, headers={"Range": f"bytes={size}-"})
        assert assert_problem_json.status_code == 416
        assert assert_problem_json.headers["content-type"] == "application/problem+json"
