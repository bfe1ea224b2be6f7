"""Caller-side Globus login: get, keep and refresh the access token that researchers use as their API key.

The gateway accepts a Globus access token for its scope as the OpenAI API key. This module runs the Native App
(PKCE) flow once (``login``), keeps the tokens in a private file, hands out a fresh access token on demand
(``get_token``, refreshing it with the refresh token), and revokes everything on ``logout``.

The Globus Auth URL is globus-sdk's own business (``GLOBUS_SDK_SERVICE_URL_AUTH``); the URL used at login is
recorded in the token file so that tokens are never sent to a different Auth server later.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import globus_sdk
from pydantic import BaseModel, ValidationError

TOKEN_FILE_NAME = "globus-tokens.json"


class LoginError(Exception):
    """A login problem, with a message that tells the user what to do next."""


class StoredTokens(BaseModel):
    """What ``first login`` keeps on disk: enough to refresh and revoke without asking the user again."""

    access_token: str
    refresh_token: str
    expires_at: int  # epoch seconds
    scope: str
    resource_server: str
    client_id: str
    auth_url: str  # the Globus Auth base URL these tokens came from

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


def _say(message: str) -> None:
    """Progress goes to stderr, so that stdout stays clean for ``$(first token)``."""
    print(message, file=sys.stderr, flush=True)


def default_token_file() -> Path:
    """``$XDG_CONFIG_HOME/first/globus-tokens.json``, else ``~/.config/first/globus-tokens.json``."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"  # XDG: ignore relative paths
    return base / "first" / TOKEN_FILE_NAME


# ---- the token file ----


def save_tokens(tokens: StoredTokens, token_file: Path) -> None:
    """Write atomically, mode 0600 from creation: the file is never readable by others, not even briefly."""
    token_file = Path(token_file)
    folder = token_file.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    tmp = folder / f".{token_file.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokens.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, token_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_tokens(token_file: Path) -> StoredTokens | None:
    """The stored tokens, or None when there is no file. Refuses a file that others can read."""
    token_file = Path(token_file)
    try:
        st = token_file.stat()
    except FileNotFoundError:
        return None
    if os.name == "posix" and st.st_mode & 0o077:
        raise LoginError(
            f"{token_file} is readable by other users (mode {stat.filemode(st.st_mode)}), so its tokens may have "
            f"leaked. Run `chmod 600 {token_file}` (and consider `first logout` then `first login`)."
        )
    try:
        return StoredTokens.model_validate_json(token_file.read_text(encoding="utf-8"))
    except (ValidationError, ValueError, UnicodeDecodeError) as e:
        raise LoginError(
            f"{token_file} is not a valid token file ({type(e).__name__}). Delete it and run `first login` again."
        ) from None


def _require_tokens(token_file: Path) -> StoredTokens:
    tokens = load_tokens(token_file)
    if tokens is None:
        raise LoginError(f"Not logged in: no Globus tokens at {token_file}. Run `first login` first.")
    return tokens


# ---- talking to Globus Auth ----


def _client(client_id: str) -> globus_sdk.NativeAppAuthClient:
    # globus-sdk resolves the Auth URL here (GLOBUS_SDK_SERVICE_URL_AUTH, else its environment's default).
    return globus_sdk.NativeAppAuthClient(client_id, app_name="first")


def _client_for(tokens: StoredTokens) -> globus_sdk.NativeAppAuthClient:
    """A client for the Auth server that issued ``tokens``: never send tokens to another one."""
    client = _client(tokens.client_id)
    if client.base_url.rstrip("/") != tokens.auth_url.rstrip("/"):
        raise LoginError(
            f"These tokens came from Globus Auth at {tokens.auth_url}, but globus-sdk now points at "
            f"{client.base_url} (GLOBUS_SDK_SERVICE_URL_AUTH). Restore that setting, or run `first login` again."
        )
    return client


def _error_field(e: globus_sdk.GlobusAPIError) -> str:
    """OAuth errors carry their code in ``error`` (RFC 6749), which globus-sdk does not always parse into ``code``."""
    doc = e.raw_json
    return str(doc.get("error") or "") if isinstance(doc, dict) else ""


def _api_error(action: str, e: globus_sdk.GlobusAPIError) -> str:
    detail = e.code if e.code and e.code != "Error" else _error_field(e) or e.text[:200]
    return f"{action} failed: Globus Auth answered HTTP {e.http_status} ({detail})"


def _is_invalid_grant(e: globus_sdk.GlobusAPIError) -> bool:
    codes = {str(e.code or "").lower(), _error_field(e).lower()}
    return "invalid_grant" in codes


def _pick(by_rs: dict[str, dict[str, Any]], scope: str, resource_server: str | None = None) -> dict[str, Any]:
    """The token entry for the gateway: by resource server if known, else the one granted the requested scope."""
    if resource_server and resource_server in by_rs:
        return by_rs[resource_server]
    wanted = set(scope.split())
    matches = [t for t in by_rs.values() if wanted & set(str(t.get("scope", "")).split())]
    if len(matches) == 1:
        return matches[0]
    if len(by_rs) == 1:
        return next(iter(by_rs.values()))
    raise LoginError(
        f"Globus Auth returned tokens for {sorted(by_rs)} and none clearly for the scope {scope!r}. "
        "Check --scope with the gateway's operator."
    )


# ---- the three operations ----


def login(
    client_id: str,
    scope: str,
    token_file: Path,
    code_reader: Callable[[str], str],
    *,
    say: Callable[[str], None] = _say,
) -> StoredTokens:
    """Run the Native App (PKCE) flow and store the tokens.

    ``code_reader`` is called with the authorize URL (already shown to the user) and returns the code the user
    pasted back. Tokens are never printed."""
    client = _client(client_id)
    client.oauth2_start_flow(requested_scopes=scope, refresh_tokens=True)
    url = client.oauth2_get_authorize_url()
    say("Open this URL in a browser, sign in with Globus, and paste the authorization code it shows:\n")
    say(f"    {url}\n")
    code = code_reader(url).strip()
    if not code:
        raise LoginError("No authorization code given. Run `first login` again and paste the code Globus shows.")
    try:
        response = client.oauth2_exchange_code_for_tokens(code)
    except globus_sdk.GlobusAPIError as e:
        hint = " (the code is single-use and expires quickly)" if _is_invalid_grant(e) else ""
        raise LoginError(f"{_api_error('Exchanging the code', e)}{hint}. Run `first login` again.") from None
    except globus_sdk.NetworkError as e:
        raise LoginError(f"Could not reach Globus Auth at {client.base_url}: {e}. Try again later.") from None
    entry = _pick(response.by_resource_server, scope)
    if not entry.get("refresh_token"):
        raise LoginError("Globus Auth returned no refresh token. Ask the gateway's operator to check the client.")
    tokens = StoredTokens(
        access_token=str(entry["access_token"]),
        refresh_token=str(entry["refresh_token"]),
        expires_at=int(entry["expires_at_seconds"]),
        scope=str(entry.get("scope") or scope),
        resource_server=str(entry["resource_server"]),
        client_id=client_id,
        auth_url=client.base_url,
    )
    save_tokens(tokens, token_file)
    say(f"Logged in. Tokens saved to {token_file}. Use: export OPENAI_API_KEY=$(first token)")
    return tokens


def get_token(client_id: str | None, token_file: Path, min_valid_s: float = 60) -> str:
    """A valid access token: the stored one, or a refreshed one if it expires within ``min_valid_s``."""
    tokens = _require_tokens(token_file)
    if client_id and client_id != tokens.client_id:
        raise LoginError(
            f"The tokens in {token_file} were issued to client {tokens.client_id}, not {client_id}. "
            "Run `first login` again with the new client id."
        )
    if tokens.expires_in() > min_valid_s:
        return tokens.access_token
    client = _client_for(tokens)
    try:
        response = client.oauth2_refresh_token(tokens.refresh_token)
    except globus_sdk.GlobusAPIError as e:
        if _is_invalid_grant(e):
            raise LoginError(
                "Your Globus login has expired or was revoked (the refresh token is no longer valid). "
                "Run `first login` again."
            ) from None
        raise LoginError(f"{_api_error('Refreshing the access token', e)}. Try again later.") from None
    except globus_sdk.NetworkError as e:
        raise LoginError(f"Could not reach Globus Auth at {client.base_url}: {e}. Try again later.") from None
    entry = _pick(response.by_resource_server, tokens.scope, tokens.resource_server)
    refreshed = tokens.model_copy(
        update={
            "access_token": str(entry["access_token"]),
            # Globus may rotate the refresh token, or not send one: keep the old one then.
            "refresh_token": str(entry.get("refresh_token") or tokens.refresh_token),
            "expires_at": int(entry["expires_at_seconds"]),
        }
    )
    save_tokens(refreshed, token_file)
    return refreshed.access_token


def logout(client_id: str | None, token_file: Path, *, say: Callable[[str], None] = _say) -> list[str]:
    """Revoke the refresh and access tokens, then delete the file (even if a revocation failed).

    Returns the revocation problems (empty when both were revoked); each is also reported through ``say``."""
    token_file = Path(token_file)
    tokens = load_tokens(token_file)
    if tokens is None:
        say(f"No Globus tokens at {token_file}: nothing to do.")
        return []
    if client_id and client_id != tokens.client_id:
        say(f"Note: the tokens were issued to client {tokens.client_id}; revoking them as that client.")
    client = _client_for(tokens)
    problems: list[str] = []
    for kind, token in (("refresh token", tokens.refresh_token), ("access token", tokens.access_token)):
        try:
            client.oauth2_revoke_token(token)
        except globus_sdk.GlobusAPIError as e:
            problems.append(_api_error(f"Revoking the {kind}", e))
        except globus_sdk.NetworkError as e:
            problems.append(f"Revoking the {kind} failed: could not reach {client.base_url} ({e})")
    token_file.unlink(missing_ok=True)
    for p in problems:
        say(f"Warning: {p}. It stays valid until it expires (or revoke the consent in the Globus web app).")
    say(f"Logged out: tokens {'revoked and ' if not problems else ''}deleted from {token_file}.")
    return problems
