"""docker-compose.yml and the Dockerfile cannot run here (no engine); check what can be checked."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from itrd.cli import cli
from service.cli import register
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
register(cli)


def check_itrd_command(argv: list[str]) -> None:
    """The argv parses as an `itrd` command line: the subcommand and every option exist."""
    assert argv[0] == "itrd", argv
    group: click.Group = cli
    name, *rest = argv[1:]
    assert name in group.commands, f"`itrd {name}` does not exist; commands: {sorted(group.commands)}"
    command = group.commands[name]
    with command.make_context(name, list(rest), resilient_parsing=False) as ctx:
        assert ctx.params is not None


def test_compose_has_the_reference_services() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "api", "worker"}
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in SERVICES[name], f"{name} has no health check"
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_workers_reserve_a_gpu_each_and_get_time_to_checkpoint() -> None:
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["command"][:2] == ["itrd", "worker"] and "cuda" in worker["command"]
    assert int(worker["stop_grace_period"].rstrip("s")) >= 60


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_every_compose_command_exists_in_the_package(service: str) -> None:
    check_itrd_command(SERVICES[service]["command"])


def test_compose_environment_names_real_settings() -> None:
    env = COMPOSE["x-itrd-env"]
    fields = {f"ITRD_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert env["ITRD_ENVIRONMENT"] == "production"
    assert env["ITRD_DATABASE_URL"].startswith("postgresql://") and env["ITRD_BROKER_URL"].startswith("redis://")


def test_dockerfile_copies_what_exists_and_runs_a_real_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    cmd = re.search(r"^CMD (\[.+\])$", text, flags=re.M)
    assert cmd is not None
    check_itrd_command(yaml.safe_load(cmd.group(1)))
    assert "python:3.11" in text  # the Python the project pins


def test_health_endpoints_used_by_the_checks_exist(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = Settings(state_dir=tmp_path, reaper_in_api=False)
    probes = [p for text in ((ROOT / "Dockerfile").read_text(), yaml.safe_dump(SERVICES["api"]["healthcheck"]))
              for p in re.findall(r"127\.0\.0\.1:8000(/\w+)", text)]
    assert set(probes) == {"/healthz", "/readyz"}
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        # Not migrated here: /readyz must answer (503 and why), never 404.
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "migrations" in ready.text


def test_worker_health_check_names_the_node_the_worker_takes() -> None:
    from service.cli import worker_argv

    argv = worker_argv("cuda", None)
    node = argv[argv.index("--hostname") + 1].replace("%h", "$$HOSTNAME")
    assert node in " ".join(SERVICES["worker"]["healthcheck"]["test"])


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(shlex.split("docker-compose -f docker-compose.yml config -q"), cwd=ROOT,
                            env={"ITRD_SECRET_KEY": "test", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
