"""`first globus`: the gateway's Globus Auth settings, a Prefect Block."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from core.settings import get_settings
from first.cli.render import err

app = typer.Typer(
    help="The gateway's Globus Auth settings (auth mode 'globus'): a Prefect Block, editable in the UI too.",
    no_args_is_help=True,
)


def _ids(values: list[str] | None) -> list[str]:
    """Repeatable options also take comma-separated lists."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@app.command("configure")
def globus_configure(
    client_id: Annotated[str, typer.Option(help="The gateway's confidential client id (app.globus.org)")],
    client_secret: Annotated[
        str,
        typer.Option(
            envvar="FIRST_GLOBUS_CLIENT_SECRET",
            prompt=True,
            hide_input=True,
            help="Its secret (prompted for, or FIRST_GLOBUS_CLIENT_SECRET; never pass it on a shared command line)",
        ),
    ],
    allowed_domain: Annotated[
        list[str] | None, typer.Option(help="Identity-provider domain callers must sign in with (repeatable)")
    ] = None,
    policy: Annotated[list[str] | None, typer.Option(help="Authentication policy id to pass (repeatable)")] = None,
    required_group: Annotated[
        list[str] | None, typer.Option(help="Group id; callers must be in one of these (repeatable)")
    ] = None,
    admin_group: Annotated[list[str] | None, typer.Option(help="Group id of admins (repeatable)")] = None,
    service_account: Annotated[
        list[str] | None, typer.Option(help="Client id allowed to call with client-credentials tokens (repeatable)")
    ] = None,
    native_client_id: Annotated[
        str | None, typer.Option(help="Native app client id callers use with `first login` (shown to them)")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="Required scope (default .../<client id>/action_all)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait on Globus for a new token, then 503")] = 5.0,
    cache_ttl: Annotated[float, typer.Option(help="Longest a token's check is reused (bounded by its expiry)")] = 300.0,
    auth_url: Annotated[str | None, typer.Option(help="Globus Auth base URL (default: production)")] = None,
    groups_url: Annotated[str | None, typer.Option(help="Globus Groups base URL (default: production)")] = None,
    name: Annotated[str | None, typer.Option(help="Block name (default FIRST_GLOBUS_BLOCK, 'default')")] = None,
) -> None:
    """Save the gateway's Globus Auth block (replacing one of the same name). Gateways pick it up within a
    minute; start a gateway with FIRST_AUTH_MODE=globus to use it."""
    from blocks.globus import GlobusAuthBlock
    from first.cli.running import prefect_for_writing

    prefect_for_writing()
    block = GlobusAuthBlock(
        client_id=client_id, client_secret=client_secret, allowed_domains=_ids(allowed_domain),
        policies=_ids(policy), required_groups=_ids(required_group), admin_groups=_ids(admin_group),
        service_accounts=_ids(service_account), native_client_id=native_client_id, scope=scope, timeout_s=timeout,
        cache_ttl_s=cache_ttl, auth_base_url=auth_url, groups_base_url=groups_url,
    )  # fmt: skip
    block_name = name or get_settings().globus_block

    async def go() -> None:
        await GlobusAuthBlock.register_type_and_schema()
        await block.save(block_name, overwrite=True)

    asyncio.run(go())
    err.print(f"saved Globus Auth block {block_name!r} (first-globus-auth/{block_name}); the secret is stored masked")


@app.command("show")
def globus_show(
    name: Annotated[str | None, typer.Option(help="Block name (default FIRST_GLOBUS_BLOCK, 'default')")] = None,
) -> None:
    """Print the Globus Auth block the gateway would use (the secret masked)."""
    from blocks.globus import GlobusAuthBlock

    block_name = name or get_settings().globus_block
    try:
        block = GlobusAuthBlock.load(block_name)
    except ValueError as exc:
        err.print(f"[red]no Globus Auth block {block_name!r}[/red] ({exc}); create it with `first globus configure`")
        raise typer.Exit(1) from None
    doc = block.model_dump(mode="json", exclude={"block_type_slug"})
    doc["client_secret"] = "**********"
    doc["required_scope"] = block.required_scope
    print(json.dumps(doc, indent=2))
