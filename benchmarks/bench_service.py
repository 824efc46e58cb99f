"""Service throughput on loopback, against real processes: API (uvicorn), one Celery worker, PostgreSQL, Redis.

Phases, each printed:
1. submit -> running: the delay from the POST's answer to the job being claimed by an idle worker.
2. status polls: C concurrent clients poll GET /v1/jobs/{id} for S seconds: polls/s, p50/p99 latency.
3. mixed load: C clients submit, poll and download for S seconds: requests/s, p50/p99, errors (must be
   0), and a check that every job submitted is accounted for by the API at the end.

    .venv/bin/python benchmarks/bench_service.py --clients 8 --seconds 10

Not a test: the figures depend on the machine. Needs the PostgreSQL and Redis of the build machine.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy import make_url

PG_ADMIN = os.environ.get("ITRD_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TINY = {"kind": "train", "model": "resnet8", "device": "cpu",
        "dataset": {"name": "digits", "subset": 64}, "optim": {"epochs": 1, "lr_decay_epochs": []}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Service:
    """A throwaway deployment: fresh database, Redis db, state dir, API and one worker process."""

    def __init__(self, root: Path) -> None:
        self.db_name = f"itrd_bench_{secrets.token_hex(4)}"
        self.admin = psycopg.connect(PG_ADMIN, autocommit=True)
        self.admin.execute(f'CREATE DATABASE "{self.db_name}"')
        db_url = make_url(PG_ADMIN).set(database=self.db_name).render_as_string(hide_password=False)
        self.broker = "redis://127.0.0.1:6379/15"
        redis.Redis.from_url(self.broker).flushdb()
        self.port = free_port()
        self.env = {**os.environ, "ITRD_DATABASE_URL": db_url, "ITRD_BROKER_URL": self.broker,
                    "ITRD_STATE_DIR": str(root / "state"), "ITRD_SUBMIT_RATE_PER_MINUTE": "100000",
                    "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "itrd", "migrate"], env=self.env, check=True, capture_output=True)
        self.key = self._create_key()
        logs = root / "logs"
        logs.mkdir()
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "itrd", "api", "--port", str(self.port), "--no-migrate"],
                             env=self.env, stdout=open(logs / "api.log", "wb"), stderr=subprocess.STDOUT),  # noqa: SIM115
            subprocess.Popen([sys.executable, "-m", "itrd", "worker", "--device", "cpu"], env=self.env,
                             stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT),  # noqa: SIM115
        ]
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _create_key(self) -> str | None:
        result = subprocess.run([sys.executable, "-m", "itrd", "keys", "create", "bench"], env=self.env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            return None  # a service without API keys
        return result.stdout.strip().split()[-1]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the API did not become ready")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.Redis.from_url(self.broker).flushdb()
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


def submit_to_running(svc: Service, client: httpx.Client, jobs: int) -> list[float]:
    delays = []
    for _ in range(jobs):
        job = client.post("/v1/jobs", json=TINY).raise_for_status().json()
        t0 = time.perf_counter()
        while True:
            status = client.get(f"/v1/jobs/{job['id']}").json()["status"]
            if status != "queued":
                delays.append(time.perf_counter() - t0)
                break
            time.sleep(0.01)
        while client.get(f"/v1/jobs/{job['id']}").json()["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
    return delays


def hammer(svc: Service, clients: int, seconds: float, action: Any) -> tuple[int, list[float], int]:
    """Run `action(client, rng)` in `clients` threads for `seconds`; returns (requests, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as client:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                ok = action(client, rng)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors += 0 if ok else 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies, errors


def main() -> None:
    """Bring the service up, run the three phases, print the figures, tear it down."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=3, help="jobs timed from submit to running")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp))
        try:
            svc.wait_ready()
            with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as client:
                delays = submit_to_running(svc, client, args.jobs)
                print(f"submit -> running (idle worker, {len(delays)} jobs): median {statistics.median(delays):.3f} s,"
                      f" max {max(delays):.3f} s")
                target = client.post("/v1/jobs", json=TINY).raise_for_status().json()["id"]

            def poll(c: httpx.Client, rng: random.Random) -> bool:
                return c.get(f"/v1/jobs/{target}").status_code == 200

            n, lat, err = hammer(svc, args.clients, args.seconds, poll)
            print(f"status polls, {args.clients} clients, {args.seconds:.0f} s: {n / args.seconds:.0f} polls/s, "
                  f"p50 {1000 * pct(lat, 0.5):.1f} ms, p99 {1000 * pct(lat, 0.99):.1f} ms, errors {err}")

            submitted: list[str] = []
            sub_lock = threading.Lock()

            def mixed(c: httpx.Client, rng: random.Random) -> bool:
                roll = rng.random()
                if roll < 0.1:
                    r = c.post("/v1/jobs", json=TINY)
                    if r.status_code == 201:
                        with sub_lock:
                            submitted.append(r.json()["id"])
                    return r.status_code == 201
                if roll < 0.2:
                    r = c.get("/v1/jobs", params={"status": "succeeded", "limit": 5})
                    items = r.json().get("items", []) if r.status_code == 200 else []
                    if r.status_code != 200 or not items:
                        return r.status_code == 200
                    d = c.get(f"/v1/jobs/{items[0]['id']}/artifacts/model_card.json",
                              headers={"Range": "bytes=0-99"})
                    return d.status_code in (200, 206)
                with sub_lock:
                    pick = rng.choice(submitted) if submitted else target
                return c.get(f"/v1/jobs/{pick}").status_code == 200

            n, lat, err = hammer(svc, args.clients, args.seconds, mixed)
            with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=30) as client:
                missing = [j for j in submitted if client.get(f"/v1/jobs/{j}").status_code != 200]
            print(f"mixed load, {args.clients} clients, {args.seconds:.0f} s: {n / args.seconds:.0f} req/s, "
                  f"p50 {1000 * pct(lat, 0.5):.1f} ms, p99 {1000 * pct(lat, 0.99):.1f} ms, errors {err}; "
                  f"{len(submitted)} jobs submitted, {len(submitted) - len(missing)} accounted for")
        finally:
            svc.close()


if __name__ == "__main__":
    main()
