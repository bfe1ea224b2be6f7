"""`first run` (everything on this machine) and `first gateway` (the gateway alone)."""

from __future__ import annotations

from typing import Annotated

import typer

from core.settings import Settings, get_settings
from first.cli.render import err

_source: list[str] = []  # where this command's Prefect came from, for what it prints


def use_embedded_prefect() -> None:
    import os

    settings = get_settings()
    url_file = settings.home / "prefect-api-url"
    if "PREFECT_API_URL" in os.environ:
        _source.append("PREFECT_API_URL")
        return
    if not url_file.exists() or not settings.prefect_auth_path.exists():
        return
    os.environ.setdefault("PREFECT_API_URL", url_file.read_text().strip())
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
    os.environ.setdefault("PREFECT_API_AUTH_STRING", settings.prefect_auth_string())
    _source.append(f"the `first run` of FIRST_HOME {settings.home}")


def prefect_for_writing() -> str:
    """The Prefect API a command that saves blocks or deployments writes to, said on stderr; never an ephemeral
    server (Prefect's fallback without PREFECT_API_URL), which no gateway reads and which vanishes with the
    command."""
    import os

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        err.print(
            "[red]No Prefect server to write to.[/red] `first run` is not running with this FIRST_HOME "
            f"({get_settings().home}) and PREFECT_API_URL is not set. Start `make run` (then run this again from "
            "any shell of the same account), or export PREFECT_API_URL=http://<prefect host>:4200/api (and "
            "PREFECT_API_AUTH_STRING=user:password if it has one) for a deployment's own Prefect."
        )
        raise typer.Exit(2)
    err.print(f"Prefect: {url} (from {_source[0] if _source else 'PREFECT_API_URL'})")
    return url


def _check_workers(settings: Settings) -> None:
    """Several workers share their state through Redis: say so before anything starts, not in a worker's log."""
    if settings.workers > 1 and not settings.redis_url:
        err.print(f"[red]FIRST_WORKERS={settings.workers} needs FIRST_REDIS_URL[/red]: the worker processes share "
                  "their limits, caps, warm-ups and streams through Redis (docs/admin/production.md). Set "
                  "FIRST_REDIS_URL=redis://host:6379/0, or run one worker (FIRST_WORKERS=1).")  # fmt: skip
        raise typer.Exit(2)


def run(
    prefect_port: Annotated[int, typer.Option(help="Port of the local Prefect server (UI and API)")] = 4200,
    warm: Annotated[bool, typer.Option(help="Warm the demo model up at start (through the warm-up deployment)")] = True,
    replace: Annotated[
        bool, typer.Option(help="Stop an earlier stack of this FIRST_HOME that still holds a port (after a crash)")
    ] = False,
) -> None:
    """Run everything on this machine until Ctrl-C: Prefect server, lifecycle worker, gateway, vLLM CPU."""
    import os

    from core.settings import prefect_env

    settings = get_settings()
    _check_workers(settings)
    # Prefect reads its settings when first imported: point this process at the local server first.
    os.environ.update(prefect_env(settings, prefect_port))
    from first.runner import Runner

    raise SystemExit(Runner(settings, prefect_port=prefect_port, warm=warm, replace=replace).run())


def gateway(
    host: Annotated[str | None, typer.Option(help="Bind address (default FIRST_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FIRST_PORT)")] = None,
) -> None:
    """Run only the gateway (uvicorn), against whatever PREFECT_API_URL points at."""
    import uvicorn

    from first.runner import HTTP_PROTOCOL, KEEP_ALIVE_S

    s = get_settings()
    _check_workers(s)
    uvicorn.run(
        "first.asgi:app", host=host or s.host, port=port or s.port, log_level="warning", access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S, http=HTTP_PROTOCOL, limit_concurrency=s.max_connections,
        workers=s.workers,  # FIRST_WORKERS: processes that share their state through FIRST_REDIS_URL
        timeout_graceful_shutdown=s.stop_grace_s or None,  # FIRST_STOP_GRACE_S
    )  # fmt: skip
