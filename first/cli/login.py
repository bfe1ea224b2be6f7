"""`first login`, `first token`, `first logout`: a caller's Globus tokens for a production gateway."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

ClientIdOption = Annotated[
    str | None,
    typer.Option(
        envvar="FIRST_LOGIN_CLIENT_ID",
        help="The gateway's Globus native-app client id (ask the gateway's operator for it)",
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="FIRST_TOKEN_FILE",
        help="Where the tokens are kept (default: $XDG_CONFIG_HOME/first/globus-tokens.json)",
        show_default=False,
    ),
]


def _token_file(token_file: Path | None) -> Path:
    from first.login import default_token_file

    return token_file or default_token_file()


def _read_code(_url: str) -> str:
    """The prompt goes to stderr and nothing to stdout (click's prompt writes a space to stdout)."""
    typer.echo("Authorization code: ", err=True, nl=False)
    return sys.stdin.readline().strip()


def login_cmd(
    client_id: ClientIdOption = None,
    scope: Annotated[
        str | None,
        typer.Option(
            envvar="FIRST_LOGIN_SCOPE",
            help="The gateway's Globus scope, e.g. https://auth.globus.org/scopes/<gateway client id>/action_all",
            show_default=False,
        ),
    ] = None,
    token_file: TokenFileOption = None,
) -> None:
    """Sign in with Globus (as a caller of a FIRST gateway) and keep the tokens for `first token`.

    Prints a URL to open in a browser; paste back the code Globus shows. Nothing secret is printed.

    The tokens are kept in a private file (mode 0600) and refreshed automatically by `first token`.
    """
    from first.login import LoginError, login

    if not client_id or not scope:
        needs = [
            f"  {opt} (or {env}): {what}"
            for value, opt, env, what in [
                (client_id, "--client-id", "FIRST_LOGIN_CLIENT_ID", "the gateway's Globus native-app client id"),
                (scope, "--scope", "FIRST_LOGIN_SCOPE", "the gateway's scope, like "
                 "https://auth.globus.org/scopes/<gateway client id>/action_all"),
            ]
            if not value
        ]  # fmt: skip
        typer.echo("first login needs:\n" + "\n".join(needs), err=True)
        typer.echo("Both come from the gateway's operator (they are not secret).", err=True)
        raise typer.Exit(2)
    try:
        login(
            client_id,
            scope,
            _token_file(token_file),
            code_reader=_read_code,
        )
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


def token_cmd(
    client_id: ClientIdOption = None,
    token_file: TokenFileOption = None,
    min_valid: Annotated[
        int, typer.Option("--min-valid", help="Refresh first if the token expires within this many seconds")
    ] = 60,
) -> None:
    """Print a valid Globus access token, alone, on stdout (refreshing it if needed).

    Use it as the gateway's API key: export OPENAI_API_KEY=$(first token). Run `first login` once first.
    """
    from first.login import LoginError, get_token

    try:
        token = get_token(client_id, _token_file(token_file), min_valid_s=min_valid)
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    print(token)


def logout_cmd(client_id: ClientIdOption = None, token_file: TokenFileOption = None) -> None:
    """Revoke the Globus tokens that `first login` stored, and delete the token file."""
    from first.login import LoginError, logout

    try:
        logout(client_id, _token_file(token_file))
    except LoginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
