"""`first login` / `first token` / `first logout` against FakeGlobusServer, through the real globus-sdk."""

from __future__ import annotations

import stat
import time
import uuid
from pathlib import Path

import globus_sdk
import pytest
from typer.testing import CliRunner

from first.cli import app
from first.login import LoginError, default_token_file, get_token, load_tokens, login
from tests.fakes.globus_server import FakeGlobusServer

runner = CliRunner()
NATIVE_CLIENT_ID = str(uuid.uuid4())  # the gateway's native app, which callers log in through


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """Never touch the real ~/.config, and ignore whatever FIRST_* login settings the shell has."""
    for var in ("FIRST_LOGIN_CLIENT_ID", "FIRST_LOGIN_SCOPE", "FIRST_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def server():
    """One server for the module: stopping one takes 0.5 s (its serve_forever poll interval)."""
    with FakeGlobusServer() as s:
        yield s


@pytest.fixture
def fake(server, monkeypatch):
    """The shared server with fresh counters; each test logs in anew, so old tokens there don't matter."""
    server.calls.clear()
    server.revoked.clear()
    server.mode = "ok"
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", server.url + "/")
    return server


@pytest.fixture
def token_file(tmp_path) -> Path:
    return tmp_path / "cfg" / "first" / "globus-tokens.json"


def do_login(fake: FakeGlobusServer, token_file: Path, expires_in: int = 3600) -> list[str]:
    """Log in with the library function; the "browser" approves the URL the helper showed. Returns the URLs."""
    urls: list[str] = []

    def browser(url: str) -> str:
        urls.append(url)
        return fake.approve(url, username="alice@uchicago.edu", expires_in=expires_in)

    login(NATIVE_CLIENT_ID, fake.scope, token_file, code_reader=browser)
    return urls


def test_globus_sdk_reads_the_auth_url_from_the_environment(fake):
    assert globus_sdk.NativeAppAuthClient(NATIVE_CLIENT_ID).base_url == fake.url + "/"


def test_login_stores_private_tokens_and_prints_no_secret(fake, token_file, capsys):
    before = time.time()
    (url,) = do_login(fake, token_file)
    out = capsys.readouterr()
    assert out.out == ""  # stdout stays clean
    assert url in out.err and url.startswith(fake.url + "/v2/oauth2/authorize?")
    assert f"client_id={NATIVE_CLIENT_ID}" in url and "access_type=offline" in url  # refresh tokens requested

    stored = load_tokens(token_file)
    assert stored is not None
    assert stored.access_token not in out.err and stored.refresh_token not in out.err
    assert fake.tokens[stored.access_token].active and fake.tokens[stored.access_token].client_id == NATIVE_CLIENT_ID
    assert stored.refresh_token in fake.refresh_tokens
    assert stored.client_id == NATIVE_CLIENT_ID and stored.scope == fake.scope
    assert stored.resource_server == fake.client_id and stored.auth_url == fake.url + "/"
    assert before + 3590 <= stored.expires_at <= time.time() + 3601
    assert fake.calls["authorization_code"] == 1

    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert [p.name for p in token_file.parent.iterdir()] == [token_file.name]  # no temp file left behind


def test_default_token_file_follows_xdg_then_home(tmp_path, monkeypatch):
    assert default_token_file() == tmp_path / "xdg" / "first" / "globus-tokens.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_token_file() == tmp_path / "home" / ".config" / "first" / "globus-tokens.json"


def test_first_token_prints_the_stored_token_without_calling_auth(fake, token_file, monkeypatch):
    do_login(fake, token_file)
    calls_before = dict(fake.calls)
    monkeypatch.setenv("FIRST_TOKEN_FILE", str(token_file))  # the envvar, as in `export OPENAI_API_KEY=$(first token)`
    r = runner.invoke(app, ["token"])
    assert r.exit_code == 0, r.output
    assert r.stdout == load_tokens(token_file).access_token + "\n"
    assert dict(fake.calls) == calls_before  # still valid: no refresh, no request at all


def test_get_token_refreshes_a_token_about_to_expire(fake, token_file):
    do_login(fake, token_file, expires_in=5)
    old = load_tokens(token_file)
    new_token = get_token(NATIVE_CLIENT_ID, token_file, min_valid_s=60)
    assert new_token != old.access_token
    assert fake.tokens[new_token].active
    assert fake.calls["refresh_token"] == 1
    saved = load_tokens(token_file)
    assert saved.access_token == new_token and saved.refresh_token == old.refresh_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # The CLI path refreshes the same way, and prints only the token.
    r = runner.invoke(app, ["token", "--token-file", str(token_file), "--min-valid", "60"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == load_tokens(token_file).access_token != new_token
    assert fake.calls["refresh_token"] == 2


def test_a_revoked_refresh_token_asks_to_log_in_again(fake, token_file):
    do_login(fake, token_file, expires_in=5)
    fake.refresh_tokens.pop(load_tokens(token_file).refresh_token)  # e.g. consent revoked in the Globus web app
    with pytest.raises(LoginError, match=r"expired or was revoked.*Run `first login` again"):
        get_token(None, token_file)
    r = runner.invoke(app, ["token", "--token-file", str(token_file)])
    assert r.exit_code == 1 and r.stdout == ""
    assert "first login" in r.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_is_refused(fake, token_file, mode):
    do_login(fake, token_file)
    token_file.chmod(mode)
    with pytest.raises(LoginError, match=r"chmod 600"):
        get_token(None, token_file)
    r = runner.invoke(app, ["token", "--token-file", str(token_file)])
    assert r.exit_code == 1 and r.stdout == ""
    assert f"chmod 600 {token_file}" in r.stderr
    assert fake.calls["refresh_token"] == 0


def test_no_token_file_says_to_log_in(fake, token_file):
    with pytest.raises(LoginError, match=r"Run `first login` first"):
        get_token(NATIVE_CLIENT_ID, token_file)
    r = runner.invoke(app, ["token", "--token-file", str(token_file)])
    assert r.exit_code == 1 and r.stdout == "" and "first login" in r.stderr


def test_tokens_of_another_client_are_not_used(fake, token_file):
    do_login(fake, token_file)
    with pytest.raises(LoginError, match=r"issued to client .*first login"):
        get_token(str(uuid.uuid4()), token_file)


def test_first_logout_revokes_both_tokens_and_deletes_the_file(fake, token_file):
    do_login(fake, token_file)
    stored = load_tokens(token_file)
    r = runner.invoke(app, ["logout", "--token-file", str(token_file)])
    assert r.exit_code == 0, r.output
    assert fake.revoked == [stored.refresh_token, stored.access_token]
    assert not fake.tokens[stored.access_token].active and stored.refresh_token not in fake.refresh_tokens
    assert not token_file.exists() and "Logged out" in r.stderr and r.stdout == ""

    again = runner.invoke(app, ["logout", "--token-file", str(token_file)])
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    assert len(fake.revoked) == 2
    assert runner.invoke(app, ["token", "--token-file", str(token_file)]).exit_code == 1


def test_first_login_without_client_id_exits_2_and_says_where_to_get_it(fake, token_file):
    r = runner.invoke(app, ["login", "--scope", fake.scope, "--token-file", str(token_file)])
    assert r.exit_code == 2
    assert "--client-id" in r.stderr and "FIRST_LOGIN_CLIENT_ID" in r.stderr and "operator" in r.stderr
    assert "FIRST_LOGIN_SCOPE" not in r.stderr  # the scope was given
    assert sum(fake.calls.values()) == 0 and not token_file.exists()

    r = runner.invoke(app, ["login", "--client-id", NATIVE_CLIENT_ID, "--token-file", str(token_file)])
    assert r.exit_code == 2 and "FIRST_LOGIN_SCOPE" in r.stderr and "/scopes/" in r.stderr


def test_first_login_with_a_bad_code_fails_clearly_and_stores_nothing(fake, token_file, monkeypatch):
    monkeypatch.setenv("FIRST_LOGIN_CLIENT_ID", NATIVE_CLIENT_ID)
    monkeypatch.setenv("FIRST_LOGIN_SCOPE", fake.scope)
    r = runner.invoke(app, ["login", "--token-file", str(token_file)], input="not-a-real-code\n")
    assert r.exit_code == 1
    assert fake.url + "/v2/oauth2/authorize?" in r.stderr and "Authorization code" in r.stderr
    assert "HTTP 400" in r.stderr and "Run `first login` again" in r.stderr
    assert fake.calls["authorization_code"] == 1 and not token_file.exists()


@pytest.mark.parametrize("command", ["login", "token", "logout"])
def test_login_commands_have_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "--token-file" in r.output and "--client-id" in r.output
    assert len(r.output.split("Usage:")[1].strip()) > 200


def test_first_login_end_to_end_as_a_user_would_run_it(fake, token_file, tmp_path):
    """The real command in a subprocess: read the URL it prints, "sign in" there, paste the code back."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FIRST_LOGIN_CLIENT_ID": NATIVE_CLIENT_ID, "FIRST_LOGIN_SCOPE": fake.scope}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "first"), "login", "--token-file", str(token_file)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = ""
        while not url:
            line = proc.stderr.readline()
            assert line, "first login exited before printing a URL"
            if "/v2/oauth2/authorize?" in line:
                url = line.strip()
        out, err = proc.communicate(fake.approve(url) + "\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == "" and "Logged in" in err
    stored = load_tokens(token_file)
    assert stored is not None and fake.tokens[stored.access_token].active
    assert stored.access_token not in err and stored.refresh_token not in err
