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
    kind: Annotated[str, typer.Option(help="generate: the Llama text model; embed: the BERT embedding model")] = (
        "generate"
    ),
) -> None:
    """Build a tiny model with random weights that vLLM CPU serves offline: the demo text model (byte-level BPE and
    a 0.8 M-parameter Llama), or with --kind embed the embedding model (the same tokenizer, a BERT encoder with
    mean pooling)."""
    from compute.tiny_model import build_tiny_model

    if kind not in ("generate", "embed"):
        err.print(f"[red]--kind is generate or embed, not {kind!r}[/red]")
        raise typer.Exit(2)
    path = build_tiny_model(out_dir, seed=seed, progress=lambda m: err.print(f"[dim]·[/dim] {m}"), kind=kind)
    err.print(f"[green]tiny model written to {path}[/green]")
