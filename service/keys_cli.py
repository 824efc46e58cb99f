"""`itrd keys ...`: make, list and revoke the API keys of the database the settings name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sqlalchemy import Engine


def _engine() -> Engine:
    """The settings' database engine, refused with advice unless it is migrated to head."""
    from service.config import get_settings
    from service.db import get_engine, schema_is_at_head

    settings = get_settings()
    engine = get_engine(settings.database_url)
    if not schema_is_at_head(engine):
        raise click.ClickException("the database is not reachable or not migrated: run `itrd migrate` first")
    return engine


@click.group()
def keys() -> None:
    """API keys: each belongs to an owner and sees only that owner's jobs, uploads and artifacts."""


@keys.command("create")
@click.argument("owner")
@click.option("--name", default=None, help="A label to tell this owner's keys apart.")
def create(owner: str, name: str | None) -> None:
    """Make a key for OWNER and print it: it is shown this once and only its hash is kept."""
    from service.db import session_scope
    from service.keys import create_key

    with session_scope(_engine()) as session:
        try:
            row, key = create_key(session, owner, name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="OWNER") from exc
    click.echo(f"created key {row.id} for owner {row.owner!r}; send it as 'Authorization: Bearer <key>'. "
               "It is not shown again:", err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke the key KEY_ID (as `itrd keys list` shows it); calls with it answer 401 from now on."""
    from service.db import session_scope
    from service.keys import KeyNotFound, revoke_key

    with session_scope(_engine()) as session:
        try:
            row = revoke_key(session, key_id)
        except KeyNotFound as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"revoked key {row.id} of owner {row.owner!r} at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")


@keys.command("list")
@click.argument("owner", required=False)
def list_(owner: str | None) -> None:
    """List keys (of OWNER, or all): id, owner, name, created, revoked; never the keys themselves."""
    from service.db import session_scope
    from service.keys import list_keys

    with session_scope(_engine()) as session:
        rows = list_keys(session, owner)
        for row in rows:
            revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            click.echo(f"{row.id}  {row.owner}  {row.name or '-'}  created {row.created_at:%Y-%m-%d %H:%M}  "
                       f"{revoked}")
    if not rows:
        click.echo("no keys", err=True)
