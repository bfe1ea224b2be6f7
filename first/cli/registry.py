"""`first registry` and `first apply`: clusters and models, as Prefect Blocks or a YAML file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from core.settings import get_settings
from first.cli.render import err, print_table
from first.cli.running import prefect_for_writing

app = typer.Typer(help="Clusters and models (Prefect Blocks).", no_args_is_help=True)


@app.command("init")
def registry_init(
    force: Annotated[bool, typer.Option(help="Overwrite existing blocks of the same names")] = False,
) -> None:
    """Save the embedded default (cluster 'local', models 'tiny' and 'tiny-embed') as Prefect Blocks, unless blocks
    exist."""
    from blocks.registry import ClusterBlock, ModelBlock, ProjectBlock, Registry

    prefect_for_writing()

    async def go() -> None:
        from blocks.globus import GlobusAuthBlock

        # So that the UI offers them under "Blocks":
        for block_type in (ClusterBlock, ModelBlock, ProjectBlock, GlobusAuthBlock):
            await block_type.register_type_and_schema()
        existing = await Registry.load_blocks()
        if existing.models and not force:
            err.print(f"registry already has {len(existing.models)} model(s); left as is (--force to reset)")
            return
        await Registry.embedded_default(get_settings()).save_blocks()
        err.print("saved the embedded default registry as blocks (cluster 'local', models 'tiny' and 'tiny-embed')")

    asyncio.run(go())


@app.command("show")
def registry_show() -> None:
    """Print the clusters and models the gateway would load."""
    from blocks.registry import Registry

    reg = asyncio.run(Registry.load(get_settings()))
    print(json.dumps(reg.describe(), indent=2))


def apply(
    file: Annotated[Path, typer.Argument(help="YAML with `clusters:`, `models:` and `projects:` lists (block fields)")],
    prune: Annotated[bool, typer.Option(help="Delete the cluster, model and project blocks not in the file")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only show what would change")] = False,
) -> None:
    """Declare the whole registry (clusters, models and project allocations) from a file, for a reproducible setup.

    Saves a FIRST Cluster / FIRST Model / FIRST Project block for each entry, shows what was created, updated or
    left as it was, and with --prune deletes blocks the file does not name. Running gateways follow within
    FIRST_REGISTRY_REFRESH_S (5 s)."""
    from blocks.registry import ClusterBlock, ModelBlock, ProjectBlock, Registry
    from flows.parameter_choices import offer_choices

    prefect_for_writing()

    try:
        desired = Registry.from_yaml(file.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None

    async def go() -> list[tuple[str, str, str]]:
        for block_type in (ClusterBlock, ModelBlock, ProjectBlock):
            await block_type.register_type_and_schema()
        current = await Registry.load_blocks()
        if dry_run:
            return current.plan(desired, prune)
        steps = await current.apply(desired, prune)
        await offer_choices(await Registry.load_blocks())  # the deployments' drop-downs follow at once
        return steps

    steps = asyncio.run(go())
    print_table(("action", "kind", "name"), steps, f"{'plan for' if dry_run else 'applied'} {file}", stderr=True)
