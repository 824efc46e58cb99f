"""The API as deployed: a uvicorn process on a real port, configured only by environment variables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_support import TRAIN_SPEC, bearer, make_key, uvicorn_server

from service.db import get_engine, migrate_to_head, session_scope
from service.models import record_artifact
from service.storage import LocalArtifactStore


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A uvicorn process serving the app factory over a migrated SQLite state dir: (base url, state dir)."""
    state = tmp_path / "state"
    migrate_to_head(f"sqlite:///{state / 'itrd.db'}")
    env = {"ITRD_STATE_DIR": str(state), "ITRD_REAP_SECONDS": "0.5"}
    with uvicorn_server(env, tmp_path / "uvicorn.log") as base:
        yield base, state


def test_submit_get_and_resume_a_download_over_http(server: tuple[str, Path]) -> None:
    base, state = server
    key = make_key(f"sqlite:///{state / 'itrd.db'}")
    with httpx.Client(base_url=base, timeout=30, headers=bearer(key)) as http:
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
