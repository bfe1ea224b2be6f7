"""The `first` command line: help everywhere, keys printed alone, usage summary from the spool."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from core.settings import get_settings
from first.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "command",
    [[], ["run"], ["gateway"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["model"],
     ["model", "build-tiny"], ["usage"], ["usage", "summary"], ["usage", "ingest"], ["registry"],
     ["registry", "init"], ["registry", "show"]],
)  # fmt: skip
def test_every_command_has_help(command):
    r = runner.invoke(app, [*command, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output
    assert len(r.output.split("Usage:")[1].strip()) > 40  # says more than its own name


def test_keys_create_prints_the_key_alone_then_list_and_revoke(home):
    r = runner.invoke(app, ["keys", "create", "--user", "alice", "--group", "staff", "--group", "hpc"])
    assert r.exit_code == 0
    key = r.stdout.strip()
    assert key.startswith("first-") and "\n" not in key and " " not in key
    listed = runner.invoke(app, ["keys", "list"]).stdout
    assert "alice" in listed and "hpc,staff" in listed and key not in listed
    assert runner.invoke(app, ["keys", "revoke", "alice"]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list"]).stdout
    missing = runner.invoke(app, ["keys", "revoke", "nobody"])
    assert missing.exit_code == 1


def test_usage_summary_reads_the_spool(home):
    spool = UsageSpool(home / "spool")
    now = time.time()
    for i, (user, tokens, status) in enumerate([("a", 10, 200), ("a", 30, 200), ("b", 5, 503)]):
        spool.append(
            UsageRecord(
                request_id=f"r{i}",
                ts=now,
                user=user,
                model="tiny",
                endpoint="completions",
                total_tokens=tokens,
                status=status,
                latency_ms=10.0 * (i + 1),
            )
        )
    spool.close()
    r = runner.invoke(app, ["usage", "summary", "--since", "1d", "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = {row["user"]: row for row in json.loads(r.stdout)}
    assert (rows["a"]["requests"], rows["a"]["total_tokens"], rows["a"]["errors"]) == (2, 40, 0)
    assert (rows["b"]["requests"], rows["b"]["errors"]) == (1, 1)
    bad = runner.invoke(app, ["usage", "summary", "--since", "yesterday"])
    assert bad.exit_code != 0 and "30m, 12h, 1d, 2w" in bad.output


def test_commands_that_write_to_prefect_refuse_an_ephemeral_one(home, tmp_path, monkeypatch):
    """Without `first run` on this FIRST_HOME or PREFECT_API_URL, `first apply` would write to a throwaway
    Prefect that no gateway reads: it refuses, and says what to do."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("clusters: [{name: c, transport: http, base_url: 'http://x'}]\nmodels: []\n")
    for command in (["apply", str(fleet)], ["registry", "init"]):
        r = runner.invoke(app, command)
        assert r.exit_code == 2, r.output
        assert "No Prefect server to write to" in r.output and "PREFECT_API_URL" in r.output
