"""The ``first`` command line, one module per sub-app: run the gateway, keys, models, usage, registry,
functions, Globus settings and login. Output goes through ``first/cli/render.py``."""

from __future__ import annotations

import typer

from first.cli import automations, batches, functions, globus, keys, login, model, registry, running, usage

app = typer.Typer(
    help="FIRST: an OpenAI-compatible inference gateway for HPC clusters, with Prefect as its control plane.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _embedded_prefect() -> None:
    """Point this command at the embedded Prefect server when `first run` is running on this machine (the URL
    and API password it left in FIRST_HOME); a PREFECT_API_URL set in the environment wins."""
    running.use_embedded_prefect()


app.command()(running.run)
app.command()(running.gateway)
app.add_typer(keys.app, name="keys")
app.add_typer(model.app, name="model")
app.add_typer(usage.app, name="usage")
app.add_typer(batches.app, name="batches")
app.add_typer(registry.app, name="registry")
app.command("apply")(registry.apply)
app.add_typer(globus.app, name="globus")
app.add_typer(functions.app, name="functions")
app.add_typer(automations.app, name="automations")
app.command("login")(login.login_cmd)
app.command("token")(login.token_cmd)
app.command("logout")(login.logout_cmd)


if __name__ == "__main__":
    app()
