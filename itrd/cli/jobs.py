"""Client commands of the `itrd` CLI: submit, jobs, status, watch, cancel, download, upload-teacher.

Where the service is and the API key come from, first match wins: the `--url`/`--api-key` flags, the
`ITRD_URL`/`ITRD_API_KEY` environment variables, then the TOML file `$ITRD_CLIENT_CONFIG` or
`$XDG_CONFIG_HOME/itrd/client.toml` (default `~/.config/itrd/client.toml`) with `url = "..."` and
`api_key = "..."`. The URL defaults to http://127.0.0.1:8000.

Exit codes scripts can rely on: 0 ok, 1 the job failed or was cancelled, 2 usage or validation error
(and other refusals: a conflict, a bad range), 3 not found, 4 authentication or permission,
5 server error or service unreachable (including a checksum mismatch after download); 130 when
interrupted with Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import yaml

if TYPE_CHECKING:
    from itrd.client import Client, Event
    from service.schemas import JobPublic

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_SERVER = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C
DEFAULT_URL = "http://127.0.0.1:8000"
F = TypeVar("F", bound=Callable[..., Any])


def config_path() -> Path:
    """The client's config file: $ITRD_CLIENT_CONFIG, else $XDG_CONFIG_HOME/itrd/client.toml."""
    if os.environ.get("ITRD_CLIENT_CONFIG"):
        return Path(os.environ["ITRD_CLIENT_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "itrd" / "client.toml"


def read_config() -> dict[str, Any]:
    """The config file's settings ({} when there is none); a malformed file is a usage error."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError) as exc:
        fail(f"{path}: {exc}", EXIT_USAGE)


def fail(message: str, code: int) -> NoReturn:
    """Print an error on stderr and exit with `code`."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def exit_code_for_status(status: int) -> int:
    """The CLI's exit code for an HTTP error status."""
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_AUTH
    return EXIT_SERVER if status >= 500 else EXIT_USAGE


def reports_errors(command: F) -> F:
    """Turn the client's exceptions into a message and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from itrd import client as c

        try:
            return command(*args, **kwargs)
        except c.ApiError as exc:
            lines = [str(exc)] + [f"  {'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.errors]
            fail("\n".join(lines), exit_code_for_status(exc.status))
        except (c.JobFailed, c.JobCancelled) as exc:
            fail(str(exc), EXIT_JOB_FAILED)
        except (c.ServiceUnreachable, c.ChecksumMismatch) as exc:
            fail(str(exc), EXIT_SERVER)
        except KeyboardInterrupt:
            fail("interrupted (the job itself goes on; `itrd cancel ID` stops it)", EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def connection_options(command: F) -> F:
    """Add --url, --api-key and --json; the command receives `client` (opened) and `as_json`."""

    @click.option("--url", envvar="ITRD_URL", default=None, help="Service URL [env ITRD_URL; config url].")
    @click.option("--api-key", envvar="ITRD_API_KEY", default=None,
                  help="API key [env ITRD_API_KEY; config api_key].")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")
    @functools.wraps(command)
    @reports_errors
    def wrapper(*args: Any, url: str | None, api_key: str | None, **kwargs: Any) -> Any:
        from itrd.client import Client

        config = read_config() if url is None or api_key is None else {}
        with Client(url or config.get("url") or DEFAULT_URL, api_key=api_key or config.get("api_key")) as client:
            return command(*args, client=client, **kwargs)

    return wrapper  # type: ignore[return-value]


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON."""
    click.echo(json.dumps(data, indent=2, default=str))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as left-aligned columns under a header line."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def job_row(job: JobPublic) -> list[Any]:
    """A job's cells in the jobs table."""
    fraction = 1.0 if job.status == "succeeded" else job.progress.fraction
    epochs = f"{job.progress.epoch}/{job.progress.epochs}" if job.progress.epochs else ""
    top1 = (job.latest_metrics or {}).get("test_top1")
    method = (job.spec.get("method") or {}).get("name", "") if job.kind == "distill" else ""
    return [job.id, job.kind, job.spec.get("model", ""), method, job.status, f"{100 * fraction:.0f}%", epochs,
            f"{top1:.2f}" if isinstance(top1, int | float) else "", job.created_at.strftime("%Y-%m-%d %H:%M")]


JOB_HEADERS = ["ID", "KIND", "MODEL", "METHOD", "STATUS", "PROGRESS", "EPOCH", "TOP1", "CREATED"]


def describe(job: JobPublic) -> str:
    """A job in a few lines, for people."""
    from itrd.client import format_metrics

    lines = [f"job      {job.id}", f"kind     {job.kind} ({job.spec.get('model')})", f"status   {job.status}"]
    if job.queue_position is not None:
        lines.append(f"queue    {job.queue} (position {job.queue_position})")
    p = job.progress
    if p.epochs:
        lines.append(f"progress {100 * p.fraction:.1f}% (epoch {p.epoch}/{p.epochs})")
    if job.latest_metrics:
        lines.append("metrics  " + " ".join(format_metrics(job.latest_metrics)))
    if job.failure_reason:
        lines.append(f"reason   {job.failure_reason}")
    lines.append(f"attempt  {job.attempt}/{job.max_attempts}")
    if job.callback is not None:
        cb = job.callback
        note = f", last error: {cb.last_error}" if cb.last_error else ""
        lines.append(f"callback {cb.state} after {cb.attempts} attempt(s){note}")
    return "\n".join(lines)


def end_with(job: JobPublic) -> None:
    """Exit 1 if the job failed or was cancelled (with its reason), else return."""
    if job.status in ("failed", "cancelled"):
        fail(f"job {job.id} {job.status}" + (f": {job.failure_reason}" if job.failure_reason else ""),
             EXIT_JOB_FAILED)


def load_spec_file(path: Path) -> dict[str, Any]:
    """A spec file (YAML or JSON) as a dict; the service validates it."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        fail(f"{path}: not YAML or JSON: {exc}", EXIT_USAGE)
    if not isinstance(data, dict):
        fail(f"{path}: a spec is a mapping of fields, not {type(data).__name__}", EXIT_USAGE)
    return data


@click.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", "wait_for_it", is_flag=True, help="Follow the job to its end (exit 1 if it fails).")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the same job.")
@connection_options
def submit(spec_file: Path, wait_for_it: bool, idempotency_key: str | None, client: Client, as_json: bool) -> None:
    """Submit the job in SPEC_FILE (YAML or JSON) to the service."""
    job = client.submit(load_spec_file(spec_file), idempotency_key=idempotency_key)
    if not as_json:
        where = f", position {job.queue_position} in queue {job.queue}" if job.queue_position else ""
        click.echo(f"submitted job {job.id} ({job.status}{where})")
    if wait_for_it:
        job = follow(client, job.id, as_json=False, quiet=as_json)
    if as_json:
        emit_json(job.model_dump(mode="json"))
    end_with(job)


@click.command("jobs")
@click.option("--status", "statuses", multiple=True, help="Only jobs in this status (repeat for several).")
@click.option("--kind", type=click.Choice(["train", "distill"]), default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="At most this many.")
@connection_options
def list_jobs(statuses: tuple[str, ...], kind: str | None, limit: int, client: Client, as_json: bool) -> None:
    """List jobs, newest first."""
    found = list(client.list(status=list(statuses), kind=kind, limit=limit))
    if as_json:
        emit_json([j.model_dump(mode="json") for j in found])
    else:
        click.echo(table(JOB_HEADERS, (job_row(j) for j in found)))


@click.command()
@click.argument("job_id")
@connection_options
def status(job_id: str, client: Client, as_json: bool) -> None:
    """Show one job: status, progress, latest metrics, failure reason."""
    job = client.get(job_id)
    click.echo(json.dumps(job.model_dump(mode="json"), indent=2) if as_json else describe(job))


@click.command()
@click.argument("job_id")
@connection_options
def watch(job_id: str, client: Client, as_json: bool) -> None:
    """Follow a job live until it ends: progress bar, loss terms and accuracy (--json: one event per line)."""
    end_with(follow(client, job_id, as_json=as_json))


@click.command()
@click.argument("job_id")
@connection_options
def cancel(job_id: str, client: Client, as_json: bool) -> None:
    """Cancel a job (a running one stops after its next checkpoint)."""
    job = client.cancel(job_id)
    click.echo(json.dumps(job.model_dump(mode="json"), indent=2) if as_json else f"job {job.id}: {job.status}")


@click.command()
@click.argument("job_id")
@click.option("--artifact", "name", default="student.safetensors", show_default=True, help="Which file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to save it (default: the artifact's name here).")
@connection_options
def download(job_id: str, name: str, output: Path | None, client: Client, as_json: bool) -> None:
    """Download a job's artifact, resuming a cut transfer, and check its sha256."""
    path = client.download(job_id, name, output or Path(name))
    listing = {a.name: a for a in client.artifacts(job_id)}
    if as_json:
        emit_json({"path": str(path), "name": name, "size": path.stat().st_size, "sha256": listing[name].sha256})
    else:
        click.echo(f"{path} ({path.stat().st_size} bytes, sha256 {listing[name].sha256} verified)")


@click.command("upload-teacher")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--arch", required=True, help="The teacher's architecture (a name from `itrd models`).")
@click.option("--classes", "num_classes", required=True, type=click.IntRange(min=1), help="Its class count.")
@connection_options
def upload_teacher(weights: Path, arch: str, num_classes: int, client: Client, as_json: bool) -> None:
    """Upload trained teacher weights; distil from them with `teacher: {architecture, upload: ID}`."""
    teacher = client.upload_teacher(weights, arch, num_classes)
    if as_json:
        emit_json(teacher.model_dump(mode="json"))
    else:
        click.echo(f"uploaded teacher {teacher.id} ({teacher.architecture}, {teacher.num_classes} classes, "
                   f"{teacher.size} bytes)\nuse it with: teacher: {{architecture: {teacher.architecture}, "
                   f"upload: {teacher.id}}}")


def follow(client: Client, job_id: str, *, as_json: bool, quiet: bool = False, reconnects: int = 5) -> JobPublic:
    """Follow a job's event stream to its end (reconnecting with Last-Event-ID) and return the final job.

    as_json prints each event as a JSON line; quiet prints nothing (a caller that prints JSON itself).
    """
    import time

    from tqdm import tqdm

    from itrd.client import ServiceUnreachable

    mode = "json" if as_json else "quiet" if quiet else "human"
    bar = tqdm(total=1000, desc=f"job {job_id[:12]}", disable=mode != "human", dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    last_id: str | None = None
    job: JobPublic | None = None
    breaks = 0
    try:
        while True:
            try:
                for event in client.events(job_id, last_event_id=last_id):
                    last_id = event.id or last_id
                    job = _show_event(event, bar, job, mode) or job
            except ServiceUnreachable:
                if breaks >= reconnects:
                    raise
            if job is not None and job.status in ("succeeded", "failed", "cancelled"):
                return job
            breaks += 1  # the stream broke, or ended before the job did: pick it up where it stopped
            if breaks > reconnects:
                return client.get(job_id)
            time.sleep(min(0.5 * breaks, 3.0))
    finally:
        bar.close()


def _show_event(event: Event, bar: Any, job: JobPublic | None, mode: str) -> JobPublic | None:
    """Show one event (a JSON line, or bar updates and epoch lines); returns the job of a state event."""
    from itrd.client import format_metrics
    from service.schemas import JobPublic

    human = mode == "human"
    if mode == "json":
        click.echo(json.dumps({"event": event.event, "id": event.id, "data": event.data}))
    if event.event == "state":
        new = JobPublic.model_validate(event.data)
        if human and (job is None or job.status != new.status):
            bar.write(f"status: {new.status}" + (f" ({new.failure_reason})" if new.failure_reason else ""))
        if new.status == "succeeded":
            bar.update(1000 - bar.n)
        bar.set_postfix_str(str(new.status))
        return new
    if event.event == "progress" and isinstance(event.data, dict):
        bar.update(max(int(1000 * float(event.data.get("fraction") or 0.0)) - bar.n, 0))
    elif event.event == "metrics" and isinstance(event.data, dict) and human:
        epochs = job.progress.epochs if job is not None else None
        of = f"/{epochs}" if epochs else ""
        bar.write(f"epoch {event.data.get('epoch')}{of} " + " ".join(format_metrics(event.data)))
    return None


def register(group: click.Group) -> None:
    """Add the client commands to the `itrd` command group."""
    for command in (submit, list_jobs, status, watch, cancel, download, upload_teacher):
        group.add_command(command)
