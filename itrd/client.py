"""A Python client of the job service: submit, follow, cancel and download, with typed results.

```python
from itrd.client import Client

client = Client("http://127.0.0.1:8000", api_key="...")
job = client.submit({"kind": "train", "model": "resnet8", "dataset": {"name": "digits"}})
job = client.wait(job.id)                       # progress bar; raises JobFailed / JobCancelled
client.download(job.id, "student.safetensors", "student.safetensors")   # resumes, checks sha256
```

Every error the API answers is an `ApiError` carrying its RFC 9457 problem details.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from tqdm import tqdm

# The single distribution ships the service's schemas beside the library; the client returns them.
from service.schemas import ArtifactPublic, ArtifactsPublic, JobPublic, JobsPublic, TeacherPublic

if TYPE_CHECKING:
    from itrd.spec import JobSpec

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
EVENTS_READ_TIMEOUT = 60.0


class ClientError(Exception):
    """Base of every error the client raises."""


class ApiError(ClientError):
    """The API refused a request; `problem` holds its RFC 9457 problem details."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        detail = problem.get("detail") or problem.get("title") or "request failed"
        super().__init__(f"HTTP {status}: {detail}")

    @property
    def errors(self) -> builtins.list[dict[str, Any]]:
        """The invalid fields of a validation problem (loc, msg, type); empty for other problems."""
        errors = self.problem.get("errors")
        return errors if isinstance(errors, builtins.list) else []


class ServiceUnreachable(ClientError):
    """The service could not be reached, or the connection broke and could not be resumed."""


class JobFailed(ClientError):
    """A job ended in failure; `reason` is the service's failure reason."""

    def __init__(self, job: JobPublic) -> None:
        self.job, self.reason = job, job.failure_reason or "no reason recorded"
        super().__init__(f"job {job.id} failed: {self.reason}")


class JobCancelled(ClientError):
    """A job was cancelled before it finished."""

    def __init__(self, job: JobPublic) -> None:
        self.job = job
        super().__init__(f"job {job.id} was cancelled" + (f": {job.failure_reason}" if job.failure_reason else ""))


class ChecksumMismatch(ClientError):
    """A downloaded file does not hash to the sha256 the service lists for it (the partial file is removed)."""


@dataclass(frozen=True)
class Event:
    """One server-sent event: its type, its data parsed as JSON, and its id (None when it sets none)."""

    event: str
    data: Any
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a text stream's lines (comments and retry fields are skipped)."""
    event, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(event, payload, event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


def _problem_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {"type": "about:blank", "status": response.status_code, "title": response.reason_phrase,
            "detail": response.text[:500] or response.reason_phrase}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Client:
    """A client of the job service at `url` (e.g. http://127.0.0.1:8000); a context manager."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{method} {self.url}{path}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _problem_of(response))
        return response

    def submit(self, spec: JobSpec | Mapping[str, Any], idempotency_key: str | None = None) -> JobPublic:
        """Submit a job spec (a JobSpec or its dict); a repeated idempotency key returns the first job."""
        body = spec if isinstance(spec, Mapping) else spec.model_dump(mode="json", exclude_none=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobPublic.model_validate(self._request("POST", "/v1/jobs", json=dict(body), headers=headers).json())

    def get(self, job_id: str) -> JobPublic:
        """One job: status, progress, latest metrics, failure reason."""
        return JobPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, status: str | builtins.list[str] | None = None, kind: str | None = None,
             limit: int | None = None, page_size: int = 100) -> Iterator[JobPublic]:
        """Jobs newest first, filtered by status (one or several) and kind; pages are fetched as needed."""
        statuses = [status] if isinstance(status, str) else builtins.list(status or [])
        cursor: str | None = None
        seen = 0
        while True:
            size = min(page_size, limit - seen) if limit is not None else page_size
            if size <= 0:
                return
            params: dict[str, Any] = {"limit": size, "status": statuses}
            if kind:
                params["kind"] = kind
            if cursor:
                params["cursor"] = cursor
            page = JobsPublic.model_validate(self._request("GET", "/v1/jobs", params=params).json())
            for job in page.items:
                yield job
                seen += 1
            cursor = page.next_cursor
            if cursor is None or not page.items:
                return

    def cancel(self, job_id: str) -> JobPublic:
        """Ask a job to stop; returns it (cancelled, or cancelling while the trainer checkpoints)."""
        return JobPublic.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def metrics(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's metrics per finished epoch, ordered by epoch."""
        series: builtins.list[dict[str, Any]] = self._request("GET", f"/v1/jobs/{job_id}/metrics").json()
        return series

    def artifacts(self, job_id: str) -> builtins.list[ArtifactPublic]:
        """The files a job has produced so far, with sizes and sha256."""
        return ArtifactsPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()).items

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's server-sent events (state, progress, metrics) until it ends; metrics after `last_event_id`."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        # The server sends a keep-alive comment every 15 s: a minute of silence is a dead connection.
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT)
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _problem_of(r))
                yield from parse_sse(r.iter_lines())
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"event stream of job {job_id}: {exc}") from exc

    def wait(self, job_id: str, progress: bool = True, poll_seconds: float = 1.0,
             timeout: float | None = None) -> JobPublic:
        """Poll a job until it ends and return it; raises JobFailed or JobCancelled, TimeoutError past `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=1000, desc=f"job {job_id[:12]}", disable=not progress, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        try:
            while True:
                job = self.get(job_id)
                done = 1000 if job.status == "succeeded" else int(1000 * job.progress.fraction)
                bar.update(max(done - bar.n, 0))
                bar.set_postfix_str(_postfix(job), refresh=True)
                if job.status in TERMINAL:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
                time.sleep(poll_seconds)
        finally:
            bar.close()
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "cancelled":
            raise JobCancelled(job)
        return job

    def download(self, job_id: str, name: str, path: str | os.PathLike[str], retries: int = 5) -> Path:
        """Download an artifact to `path` through `path.part`, resuming a cut transfer, then check its sha256."""
        target = Path(path)
        listing = {a.name: a for a in self.artifacts(job_id)}
        if name not in listing:
            raise ApiError(404, {"type": "urn:itrd:problem:artifact-not-found", "status": 404,
                                 "title": "Not Found", "detail": f"job {job_id} has no artifact {name!r}"})
        artifact = listing[name]
        part = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(retries + 1):
            try:
                self._fetch_into(job_id, artifact, part)
                break
            except (httpx.TransportError, ServiceUnreachable) as exc:
                if attempt == retries:
                    raise ServiceUnreachable(f"download of {name} kept breaking: {exc}") from exc
                time.sleep(min(0.2 * 2**attempt, 5.0))
        digest = _sha256(part)
        if digest != artifact.sha256:
            part.unlink()
            raise ChecksumMismatch(f"{name}: sha256 {digest} but the service lists {artifact.sha256}; "
                                   f"the partial file was removed, download again")
        os.replace(part, target)
        return target

    def _fetch_into(self, job_id: str, artifact: ArtifactPublic, part: Path) -> None:
        """Bring `part` up to the artifact's full size, appending from where an earlier try stopped."""
        have = part.stat().st_size if part.exists() else 0
        if have > artifact.size:  # not a prefix of this file: start again
            part.unlink()
            have = 0
        if have == artifact.size:
            part.touch()  # an empty artifact has nothing to fetch, but still becomes a file
            return
        headers = {}
        if have:
            # If-Range: should the file have changed since, the server sends all of it (200), not a range.
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{artifact.sha256}"'}
        url = f"/v1/jobs/{job_id}/artifacts/{artifact.name}"
        with self._http.stream("GET", url, headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, _problem_of(r))
            mode = "ab" if r.status_code == 206 else "wb"
            with part.open(mode) as f:
                for chunk in r.iter_bytes():  # as received: every byte that arrived is kept for a resume
                    f.write(chunk)

    def upload_teacher(self, path: str | os.PathLike[str], architecture: str, num_classes: int) -> TeacherPublic:
        """Upload trained teacher weights (.safetensors or a torch state dict); distil from its id."""
        source = Path(path)
        with source.open("rb") as f:
            files = {"file": (source.name, f, "application/octet-stream")}
            data = {"architecture": architecture, "num_classes": str(num_classes)}
            response = self._request("POST", "/v1/teachers", data=data, files=files)
        return TeacherPublic.model_validate(response.json())


def _postfix(job: JobPublic) -> str:
    """The status, epoch and the latest loss terms and accuracy, for a progress bar."""
    parts = [str(job.status)]
    if job.progress.epochs:
        parts.append(f"epoch {job.progress.epoch}/{job.progress.epochs}")
    parts.extend(format_metrics(job.latest_metrics or {}))
    return " ".join(parts)


def format_metrics(metrics: Mapping[str, Any]) -> builtins.list[str]:
    """The loss terms and the test accuracy of a metrics record, as short `name=value` strings."""
    out = [f"{k.removeprefix('loss_')}={v:.4f}" for k, v in metrics.items()
           if k.startswith("loss") and isinstance(v, int | float)]
    if isinstance(metrics.get("test_top1"), int | float):
        out.append(f"top1={metrics['test_top1']:.2f}%")
    return out
