"""`first functions`: register the functions FIRST runs on clusters (Globus Compute)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from first.cli.render import err, print_table

app = typer.Typer(help="The functions FIRST runs on clusters (Globus Compute).", no_args_is_help=True)


@app.command("register")
def functions_register(
    cluster: Annotated[str, typer.Option(help="The cluster (its block) whose endpoint will run the functions")],
    group: Annotated[str | None, typer.Option(help="Share the functions with this Globus group id")] = None,
    public: Annotated[bool, typer.Option(help="Let anyone run them (they hold no secrets)")] = False,
) -> None:
    """Register FIRST's cluster functions with Globus Compute once and store their ids in the cluster's block.

    The gateway then runs them by id (submit_to_registered_function). Run it as the gateway's own client
    (GLOBUS_COMPUTE_CLIENT_ID / GLOBUS_COMPUTE_CLIENT_SECRET), so the functions belong to the identity that
    runs them; otherwise Globus Compute asks you to log in, and you must share them (--group or --public)."""
    import os

    from blocks.registry import ClusterBlock, Registry, _slug
    from compute.globus_compute import compute_client, register_functions
    from first.cli.running import prefect_for_writing

    prefect_for_writing()
    reg = asyncio.run(Registry.load_blocks())
    spec = reg.clusters.get(cluster)
    if spec is None:
        err.print(f"[red]no cluster block named {cluster!r}[/red]; known: {', '.join(sorted(reg.clusters)) or 'none'}")
        raise typer.Exit(1)
    if spec.transport != "globus-compute":
        err.print(
            f"cluster {cluster!r} has transport {spec.transport!r}: nothing to register (a local endpoint registers "
            "the functions itself when it starts; a direct-HTTP cluster runs none)"
        )
        return
    if os.environ.get("GLOBUS_COMPUTE_CLIENT_ID"):
        client = compute_client()
    else:
        from globus_compute_sdk import Client

        err.print("no GLOBUS_COMPUTE_CLIENT_ID: registering as you (Globus Compute may ask you to log in)")
        client = Client()
    kwargs = {"group": group} if group else {}
    ids = register_functions(client, public=public, **kwargs)
    spec.function_ids = ids
    asyncio.run(ClusterBlock(spec=spec).save(_slug(spec.name), overwrite=True))
    print_table(("function", "id"), ids.items(), f"registered for cluster {cluster} (saved in its block)", stderr=True)
