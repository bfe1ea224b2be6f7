"""`first model`: models the project builds itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from first.cli.render import err

app = typer.Typer(help="Models the project builds itself.", no_args_is_help=True)


@app.command("build-tiny")
def build_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes")] = 0,
) -> None:
    """Build the tiny demo model (byte-level BPE + a 0.8 M-parameter Llama with random weights)."""
    from compute.tiny_model import build_tiny_model

    path = build_tiny_model(out_dir, seed=seed, progress=lambda m: err.print(f"[dim]·[/dim] {m}"))
    err.print(f"[green]tiny model written to {path}[/green]")
