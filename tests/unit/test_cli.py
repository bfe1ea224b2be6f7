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


def _spool_some(home, users=("alice@uchicago.edu", "bob@anl.gov")):
    spool = UsageSpool(home / "spool")
    now = time.time()
    for i, user in enumerate(users * 3):
        model = ("tiny", "llama-3.1-8b")[i // 2 % 2]
        record = UsageRecord(
            request_id=f"w{i}", ts=now - 3600 * 24 * 10, user=user, model=model, cluster="local",
            endpoint="chat.completions", prompt_tokens=1200, completion_tokens=340, total_tokens=1540,
            status=200, latency_ms=812.5 + i, ttft_ms=40.0,
        )  # fmt: skip
        spool.append(record)
    spool.close()


@pytest.mark.parametrize("report", ["summary", "top-users", "by-model", "by-cluster", "latency", "errors", "daily"])
def test_table_reports_fit_80_columns_with_whole_headers(home, monkeypatch, report):
    """An 80-column terminal (issue 19): every line fits, no header is cut, and the columns left out are named
    on stderr with how to get them."""
    _spool_some(home)
    monkeypatch.setenv("COLUMNS", "80")
    r = runner.invoke(app, ["usage", report, "--since", "2w"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    assert "…" not in r.stdout  # no header or cell cut short
    header = next(line for line in lines if "│" in line or "┃" in line)
    shown = [h.strip() for h in header.replace("┃", "│").split("│") if h.strip()]
    assert shown and all(" " not in h for h in shown), shown  # whole column names, not wrapped halves
    wide = runner.invoke(app, ["usage", report, "--since", "2w", "--format", "json"])
    every = list(json.loads(wide.stdout)[0]) if json.loads(wide.stdout) else []
    if shown == ["column", "value"]:  # one row: one line per column, every column there
        assert all(c in r.stdout for c in every)
    elif len(every) > len(shown):
        assert "more column(s)" in r.stderr and "--wide" in r.stderr
        assert all(c in r.stderr for c in every if c not in shown)


def test_summary_shows_its_key_columns_and_wide_or_columns_gives_the_rest(home, monkeypatch):
    _spool_some(home)
    monkeypatch.setenv("COLUMNS", "80")
    narrow = runner.invoke(app, ["usage", "summary", "--since", "2w"])
    for key in ("user", "model", "requests", "errors", "total_tokens"):
        assert key in narrow.stdout
    assert "first_ts" not in narrow.stdout and "first_ts" in narrow.stderr
    monkeypatch.setenv("COLUMNS", "400")
    wide = runner.invoke(app, ["usage", "summary", "--since", "2w", "--wide"])
    assert "first_ts" in wide.stdout and "cold_starts" in wide.stdout and "more column" not in wide.stderr
    picked = runner.invoke(app, ["usage", "summary", "--since", "2w", "--columns", "user,p95_latency_ms", "-f", "csv"])
    assert picked.stdout.splitlines()[0] == "user,p95_latency_ms"
    bad = runner.invoke(app, ["usage", "summary", "--columns", "user,colour"])
    assert bad.exit_code == 2 and "no column colour" in bad.output and "total_tokens" in bad.output
    every = runner.invoke(app, ["usage", "summary", "--since", "2w", "--format", "csv"])
    assert len(every.stdout.splitlines()[0].split(",")) == 15  # csv keeps every column


@pytest.mark.parametrize("since", ["2w", "1.5d", "90m", "3600s", "2026-01-01", "2026-01-01T06:00:00+02:00"])
def test_the_cli_takes_every_window_the_api_takes(home, since):
    """One grammar for --since and /v1/usage?since= (core/timewindow.py): what one accepts, the other does."""
    _spool_some(home)
    r = runner.invoke(app, ["usage", "by-model", "--since", since, "--format", "json"])
    assert r.exit_code == 0, r.output


def test_the_python_api_takes_the_same_windows(home):
    """analytics.report("daily", since="30d"), as the analysts' page shows: the third door, the same grammar."""
    import analytics

    _spool_some(home)
    runner.invoke(app, ["usage", "ingest"])
    assert analytics.report("by-model", since="2w")["requests"].sum() == 6
    assert analytics.report("by-model", since="1d").height == 0  # the rows are 10 days old
    with pytest.raises(ValueError, match="30m, 12h, 1d, 2w"):
        analytics.usage(since="yesterday")
