"""The dashboard's pages and scripts, its charts (in node and, where installed, in headless chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import api_client, api_settings, sqlite_database
from fastapi.testclient import TestClient
from live_server import LiveServer, running_server

from service.models import JobStatus, utcnow

STATIC = Path(__file__).resolve().parents[2] / "service" / "api" / "static"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """A client of the app on a fresh SQLite database."""
    settings = api_settings(tmp_path / "state", sqlite_database(tmp_path))
    with api_client(settings) as c:
        yield c


def test_pages_and_assets_are_served(client: TestClient) -> None:
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard"
    jobs = client.get("/dashboard")
    assert jobs.status_code == 200 and jobs.headers["content-type"].startswith("text/html")
    assert "ITRD.jobsPage()" in jobs.text and 'id="api-key"' in jobs.text
    job = client.get("/dashboard/jobs/0123abcd")
    assert job.status_code == 200 and "ITRD.jobPage()" in job.text
    assert 'id="loss-chart"' in job.text and 'id="acc-chart"' in job.text
    for name, kind in (("dashboard.js", "text/javascript"), ("charts.js", "text/javascript"),
                       ("dashboard.css", "text/css")):
        asset = client.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.content == (STATIC / name).read_bytes()
    # Every file the pages load is one the API serves, and nothing comes from another host.
    for page in (jobs.text, job.text):
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
            assert ref.startswith("/"), ref
            assert client.get(ref).status_code == 200, ref
    assert client.get("/dashboard/static/..%2Fapp.py").status_code == 404
    assert client.get("/dashboard/static/jobs.html").status_code == 404


CHART_HARNESS = """
const fs = require("fs"), vm = require("vm");
const calls = {arc: 0, lineTo: 0, fillText: []};
const ctx = new Proxy({}, {get: (t, name) => {
  if (name === "measureText") return s => ({width: s.length * 6});
  if (name in t) return t[name];
  return (...args) => { if (name === "arc") calls.arc++; if (name === "lineTo") calls.lineTo++;
                        if (name === "fillText") calls.fillText.push(args[0]); };
}, set: (t, name, v) => { t[name] = v; return true; }});
const canvas = {width: 560, height: 280, clientWidth: 560, clientHeight: 280, dataset: {}, getContext: () => ctx};
const window = {devicePixelRatio: 1};
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), {window, Math, Number, String});
window.ITRDCharts.draw(canvas, JSON.parse(process.argv[3]));
console.log(JSON.stringify({points: canvas.dataset.points, ...calls}));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_chart_plots_every_point(tmp_path: Path) -> None:
    assert NODE is not None
    harness = tmp_path / "harness.js"
    harness.write_text(CHART_HARNESS)
    series = [{"name": "ce", "color": "#000", "points": [[1, 2.0], [2, 1.5], [3, 1.2]]},
              {"name": "corr", "color": "#111", "points": [[1, 0.5], [2, 0.4], [3, 0.35]]},
              {"name": "teacher", "color": "#222", "dashed": True, "points": [[1, 0.9], [3, 0.9]]}]
    run = subprocess.run([NODE, str(harness), str(STATIC / "charts.js"), json.dumps(series)],
                         capture_output=True, text=True, timeout=60, check=True)
    drawn = json.loads(run.stdout)
    assert drawn["points"] == "8"
    assert drawn["arc"] == 6  # a dot per epoch of the solid series; the reference line has none
    assert drawn["lineTo"] >= 2 + 2 + 1
    assert {"ce", "corr", "teacher"} <= set(drawn["fillText"])
    empty = subprocess.run([NODE, str(harness), str(STATIC / "charts.js"), "[]"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(empty.stdout)["points"] == "0"


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_scripts_parse() -> None:
    assert NODE is not None
    for script in ("charts.js", "dashboard.js"):
        subprocess.run([NODE, "--check", str(STATIC / script)], check=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real API process (chromium needs a port to load pages from)."""
    with running_server(tmp_path_factory.mktemp("dashboard")) as live:
        yield live


HARNESS = Path(__file__).with_name("dashboard_harness.js")


def run_page(server: LiveServer, path: str, page: str, key: str | None) -> dict[str, Any]:
    """Run a dashboard page's scripts in node against the live server; what the page ended up showing."""
    assert NODE is not None
    scripts = [str(STATIC / "charts.js"), str(STATIC / "dashboard.js")]
    run = subprocess.run([NODE, str(HARNESS), server.url, path, key or "", page, *scripts],
                         capture_output=True, text=True, timeout=60, check=True)
    shown: dict[str, Any] = json.loads(run.stdout)
    return shown


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_job_page_follows_a_live_job(server: LiveServer) -> None:
    job_id = server.add_job(epoch=2, fraction=0.6)
    for epoch in (1, 2):
        server.add_metrics(job_id, epoch, loss_ce=2.0 / epoch, loss_corr=0.5 / epoch, loss_mi=0.1 / epoch,
                           test_top1=30.0 * epoch, teacher_top1=75.0)

    def finish() -> None:
        time.sleep(1.5)
        server.add_metrics(job_id, 3, loss_ce=0.6, loss_corr=0.15, loss_mi=0.03, test_top1=70.0, teacher_top1=75.0)
        server.add_artifact(job_id, "student.safetensors", b"weights")
        server.update_job(job_id, status=JobStatus.succeeded, epoch=3, fraction=1.0, finished_at=utcnow(),
                          lease_owner=None, lease_expires_at=None)

    threading.Thread(target=finish, daemon=True).start()
    shown = run_page(server, f"/dashboard/jobs/{job_id}", "jobPage", server.api_key)
    assert shown["settled"] and shown["error"] is None
    assert shown["status"] == "succeeded" and shown["progress"] == "epoch 3/3 · 100%"
    assert shown["lossPoints"] == "9"  # ce, corr and mi over three epochs, the third arriving live
    assert shown["accPoints"] == "5"  # three epochs and the teacher's reference line
    assert [row[0] for row in shown["artifacts"]] == ["student.safetensors"]
    assert json.loads(shown["spec"])["model"] == "resnet8"
    assert shown["storedKey"] == server.api_key and shown["hash"] == ""  # the key left the address bar


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_job_page_shows_the_failure_reason(server: LiveServer) -> None:
    job_id = server.add_job(JobStatus.failed, failure_reason="loss is NaN at epoch 1")
    shown = run_page(server, f"/dashboard/jobs/{job_id}", "jobPage", server.api_key)
    assert shown["status"] == "failed" and shown["failure"] == "loss is NaN at epoch 1"
    assert shown["lossPoints"] == "0"
    # Without a key the page says so and stops, rather than retrying for ever.
    anonymous = run_page(server, f"/dashboard/jobs/{job_id}", "jobPage", None)
    assert anonymous["settled"] and "401" in anonymous["error"] and "API key" in anonymous["error"]


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_jobs_page_lists_only_the_callers_jobs(server: LiveServer) -> None:
    mine = server.add_job(JobStatus.queued)
    theirs = server.add_job(JobStatus.queued, owner="someone-else")
    shown = run_page(server, "/dashboard", "jobsPage", server.api_key)
    ids = [row[0] for row in shown["jobs"]]
    assert mine[:12] in ids and theirs[:12] not in ids
    assert f"/dashboard/jobs/{mine}" in shown["links"]
    anonymous = run_page(server, "/dashboard", "jobsPage", None)
    assert anonymous["jobs"] == [] and "401" in anonymous["error"] and "API key" in anonymous["error"]


def chromium(*args: str, profile: Path) -> str:
    """Run headless chromium with a throwaway profile; returns its stdout."""
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--virtual-time-budget=30000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package: chromium)")
def test_the_job_page_draws_a_real_jobs_curves_in_chromium(server: LiveServer, tmp_path: Path) -> None:
    job_id = server.add_job(JobStatus.succeeded, epoch=3, fraction=1.0)
    for epoch, (ce, top1) in enumerate([(2.0, 40.0), (1.4, 55.0), (1.1, 61.5)], start=1):
        server.add_metrics(job_id, epoch, loss_ce=ce, loss_corr=0.5 / epoch, loss_mi=0.1 / epoch,
                           test_top1=top1, teacher_top1=70.0)
    server.add_artifact(job_id, "student.safetensors", b"weights")
    url = f"{server.url}/dashboard/jobs/{job_id}#key={server.api_key}"
    # A cold chromium on a busy 2-core machine can run out of its time budget before the page has
    # followed the job to its end; the page must get there, so a slow first try is given two more.
    for attempt in range(3):
        dom = chromium("--dump-dom", url, profile=tmp_path / f"profile{attempt}")
        if 'data-loaded="done"' in dom:
            break
    assert 'data-loaded="done"' in dom, dom[:3000]
    assert re.search(r'id="loss-chart"[^>]*data-points="9"', dom), dom[:3000]  # 3 terms x 3 epochs
    assert re.search(r'id="acc-chart"[^>]*data-points="5"', dom)  # 3 epochs + the teacher's line
    assert "student.safetensors" in dom and 'class="badge succeeded"' in dom
    shot = tmp_path / "job.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,900", url, profile=tmp_path / "profile2")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
