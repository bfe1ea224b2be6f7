"""`first keys`: local API keys (auth mode 'local')."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from core.settings import get_settings
from first.cli.render import err, print_table

app = typer.Typer(
    help="Local API keys (auth mode 'local'). Keys are stored only as SHA-256 hashes.", no_args_is_help=True
)


@app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="Who the key belongs to (recorded in usage)")],
    group: Annotated[list[str] | None, typer.Option(help="A group the user belongs to (repeatable)")] = None,
    rpm: Annotated[int, typer.Option(help="Requests per minute allowed (0: no limit)")] = 0,
) -> None:
    """Create an API key and print it, alone, on stdout (it can't be shown again)."""

    try:
        key, info = _store().create(user, group or [], rpm)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    err.print(f"created key {info.key_id} for {user} (groups: {', '.join(info.groups) or '-'})")
    print(key)


@app.command("list")
def keys_list() -> None:
    """List API keys (ids, users, groups; never the keys themselves)."""

    rows = [
        (k.key_id, k.user, ",".join(k.groups), k.rpm or "-", datetime.fromtimestamp(k.created, UTC).strftime(
            "%Y-%m-%d %H:%M"), "…" + k.last4, "revoked" if k.revoked else "active")
        for k in _store().list()
    ]  # fmt: skip
    print_table(("id", "user", "groups", "rpm", "created", "ends with", "status"), rows)


@app.command("revoke")
def keys_revoke(
    key_id_or_user: Annotated[str, typer.Argument(help="A key id, or a user (revokes all their keys)")],
) -> None:
    """Revoke a key (the gateway stops accepting it within a second)."""

    n = _store().revoke(key_id_or_user)
    if n == 0:
        err.print(f"[red]no active key matches {key_id_or_user!r}[/red] (see `first keys list`)")
        raise typer.Exit(1)
    err.print(f"revoked {n} key(s)")


def _store() -> Any:
    """The key store this deployment's gateways read: FIRST_KEYS_URL (PostgreSQL) if set, else FIRST_HOME's file."""
    from serving.auth import KeyStore

    s = get_settings()
    return KeyStore.of(s.keys_url, s.keys_db)
