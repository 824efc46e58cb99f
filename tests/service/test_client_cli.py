"""The client commands of the `itrd` CLI against a real server: output for people and scripts, exit codes."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_support import TRAIN_SPEC, free_port
from click.testing import CliRunner, Result
from live_server import LiveServer, running_server

from itrd.cli.jobs import EXIT_AUTH, EXIT_JOB_FAILED, EXIT_NOT_FOUND, EXIT_SERVER, EXIT_USAGE, follow, register
from itrd.cli.main import cli
from itrd.client import Client, Event, ServiceUnreachable
from service.models import JobStatus, utcnow

register(cli)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One API process for the module."""
    with running_server(tmp_path_factory.mktemp("cli")) as live:
        yield live


@pytest.fixture
def itrd(server: LiveServer, tmp_path: Path) -> Any:
    """Run `itrd ARGS` with the server's URL and key in the environment and no config file."""

    def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
        base: dict[str, str | None] = {"ITRD_URL": server.url, "ITRD_API_KEY": server.api_key,
                                       "ITRD_CLIENT_CONFIG": str(tmp_path / "absent.toml")}
        return CliRunner().invoke(cli, list(args), env={**base, **(env or {})}, catch_exceptions=False)

    return run


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """A teacher-training spec as YAML."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN_SPEC))
    return path


def test_submit_jobs_status_and_cancel(itrd: Any, spec_file: Path) -> None:
    submitted = itrd("submit", str(spec_file), "--json")
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(submitted.stdout)
    assert job["status"] == "queued" and job["spec"]["model"] == "resnet8"

    human = itrd("submit", str(spec_file))
    assert human.exit_code == 0 and human.stdout.startswith("submitted job ")

    listed = itrd("jobs", "--json", "--status", "queued")
    assert job["id"] in [j["id"] for j in json.loads(listed.stdout)]
    table = itrd("jobs").stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "MODEL", "METHOD", "STATUS", "PROGRESS", "EPOCH", "TOP1", "CREATED"]
    assert any(line.startswith(job["id"]) and "queued" in line for line in table[1:])

    status = itrd("status", job["id"])
    assert status.exit_code == 0 and f"job      {job['id']}" in status.stdout and "queued" in status.stdout
    cancelled = itrd("cancel", job["id"], "--json")
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    again = itrd("cancel", job["id"])
    assert again.exit_code == EXIT_USAGE and "already" in again.stderr


def test_status_shows_how_the_callback_delivery_stands(itrd: Any, tmp_path: Path) -> None:
    spec = tmp_path / "hook.yaml"
    spec.write_text(yaml.safe_dump({**TRAIN_SPEC, "callback_url": "http://127.0.0.1:9/nobody-listens"}))
    job = json.loads(itrd("submit", str(spec), "--json").stdout)
    assert "callback" not in itrd("status", job["id"]).stdout
    assert itrd("cancel", job["id"]).exit_code == 0
    deadline = time.monotonic() + 15
    while "callback pending after 1 attempt(s), last error: ConnectError" not in itrd("status", job["id"]).stdout:
        assert time.monotonic() < deadline, itrd("status", job["id"]).stdout
        time.sleep(0.1)


def test_exit_codes(itrd: Any, spec_file: Path, tmp_path: Path) -> None:
    assert itrd("status", "0" * 32).exit_code == EXIT_NOT_FOUND
    assert itrd("status", "0" * 32, env={"ITRD_API_KEY": "itrd_000000000000_nope"}).exit_code == EXIT_AUTH
    assert itrd("jobs", env={"ITRD_API_KEY": None}).exit_code == EXIT_AUTH
    assert itrd("jobs", env={"ITRD_URL": f"http://127.0.0.1:{free_port()}"}).exit_code == EXIT_SERVER
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TRAIN_SPEC, "optim": {"epochs": -1}}))
    invalid = itrd("submit", str(bad))
    assert invalid.exit_code == EXIT_USAGE and "optim.epochs" in invalid.stderr
    bad.write_text("- a list, not a spec\n")
    assert itrd("submit", str(bad)).exit_code == EXIT_USAGE
    assert itrd("status").exit_code == EXIT_USAGE  # click's own usage error


def test_config_file_gives_url_and_key(server: LiveServer, tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'url = "{server.url}"\napi_key = "{server.api_key}"\n')
    env = {"ITRD_URL": None, "ITRD_API_KEY": None, "ITRD_CLIENT_CONFIG": str(config)}
    result = CliRunner().invoke(cli, ["jobs", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), list)
    # A flag beats the file.
    result = CliRunner().invoke(cli, ["jobs", "--api-key", "itrd_000000000000_nope"], env=env)
    assert result.exit_code == EXIT_AUTH
    # XDG_CONFIG_HOME/itrd/client.toml is the default place.
    (tmp_path / "xdg" / "itrd").mkdir(parents=True)
    (tmp_path / "xdg" / "itrd" / "client.toml").write_text(config.read_text())
    env = {"ITRD_URL": None, "ITRD_API_KEY": None, "ITRD_CLIENT_CONFIG": None, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert CliRunner().invoke(cli, ["jobs"], env=env).exit_code == 0


def test_watch_follows_the_job_to_its_end(itrd: Any, server: LiveServer) -> None:
    job_id = server.add_job(epoch=1, fraction=0.3)
    server.add_metrics(job_id, 1, loss_ce=1.25, loss_corr=0.5, loss_mi=0.125, test_top1=40.0, teacher_top1=90.0)

    def finish() -> None:
        time.sleep(1.0)
        server.add_metrics(job_id, 2, loss_ce=1.0, loss_corr=0.25, loss_mi=0.0625, test_top1=55.5)
        server.update_job(job_id, status=JobStatus.succeeded, epoch=3, fraction=1.0, finished_at=utcnow(),
                          lease_owner=None, lease_expires_at=None)

    threading.Thread(target=finish, daemon=True).start()
    watched = itrd("watch", job_id)
    assert watched.exit_code == 0, watched.output
    out = watched.stdout
    assert "epoch 1/3 loss_ce=1.2500" not in out  # names are shortened
    assert "epoch 1/3 ce=1.2500 corr=0.5000 mi=0.1250 top1=40.00%" in out
    assert "epoch 2/3 ce=1.0000 corr=0.2500 mi=0.0625 top1=55.50%" in out
    assert "status: succeeded" in out

    as_json = itrd("watch", job_id, "--json")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["data"]["epoch"] for e in events if e["event"] == "metrics"] == [1, 2]
    assert events[-1]["event"] == "state" and events[-1]["data"]["status"] == "succeeded"


def test_watch_and_submit_wait_exit_1_on_failure(itrd: Any, server: LiveServer, spec_file: Path) -> None:
    failed = server.add_job(JobStatus.failed, failure_reason="out of memory")
    result = itrd("watch", failed)
    assert result.exit_code == EXIT_JOB_FAILED and "out of memory" in result.stderr
    cancelled = server.add_job(JobStatus.cancelled)
    assert itrd("watch", cancelled).exit_code == EXIT_JOB_FAILED

    def cancel_soon() -> None:
        time.sleep(1.0)
        queued = [j for j in json.loads(itrd("jobs", "--json", "--status", "queued").stdout)
                  if j["spec"].get("seed") == 7]
        itrd("cancel", queued[0]["id"])

    spec_file.write_text(yaml.safe_dump({**TRAIN_SPEC, "seed": 7}))
    threading.Thread(target=cancel_soon, daemon=True).start()
    waited = itrd("submit", str(spec_file), "--wait", "--json")
    assert waited.exit_code == EXIT_JOB_FAILED
    assert json.loads(waited.stdout)["status"] == "cancelled"  # the JSON is the final job


def test_download_verifies_and_upload_teacher(itrd: Any, server: LiveServer, tmp_path: Path) -> None:
    payload = os.urandom(50_000)
    job_id = server.add_job(JobStatus.succeeded)
    digest = server.add_artifact(job_id, "student.safetensors", payload)
    out = tmp_path / "models" / "s.safetensors"
    result = itrd("download", job_id, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"path": str(out), "name": "student.safetensors", "size": len(payload),
                                         "sha256": digest}
    assert out.read_bytes() == payload
    assert itrd("download", job_id, "--artifact", "missing.pt", "-o", str(out)).exit_code == EXIT_NOT_FOUND

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not weights")
    refused = itrd("upload-teacher", str(junk), "--arch", "resnet8", "--classes", "10")
    assert refused.exit_code == EXIT_USAGE


class BreakingClient:
    """Stands in for itrd.client.Client: its first event stream breaks after epoch 1."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.asked_from: list[str | None] = []

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """Epoch 1 then a broken connection; on reconnection, what follows `last_event_id`."""
        self.asked_from.append(last_event_id)
        if last_event_id is None:
            yield Event("state", {**self.job, "status": "running"})
            yield Event("metrics", {"epoch": 1, "loss_ce": 1.0}, "1")
            raise ServiceUnreachable("connection reset")
        yield Event("metrics", {"epoch": 2, "loss_ce": 0.5}, "2")
        yield Event("state", {**self.job, "status": "succeeded"})


def test_follow_reconnects_from_the_last_epoch_it_saw(server: LiveServer) -> None:
    with Client(server.url, api_key=server.api_key) as client:
        job = client.submit(TRAIN_SPEC).model_dump(mode="json")
    fake = BreakingClient(job)
    final = follow(fake, job["id"], as_json=False, quiet=True)  # type: ignore[arg-type]
    assert final.status == "succeeded"
    assert fake.asked_from == [None, "1"]
