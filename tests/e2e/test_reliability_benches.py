"""The short versions of bench/abuse.py that every CI run makes (the 10-minute soak is run by hand and its figures
are in docs/benchmarks.md): no errors, no leaks, and the work of a caller who left stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import REPO_ROOT

pytestmark = pytest.mark.e2e


def _bench(tmp_path: Path, *args: str) -> dict:
    out, raw = tmp_path / "benchmarks.md", tmp_path / "result.json"
    cmd = [sys.executable, "bench/abuse.py", *args, "--quick", "--out", str(out), "--json", str(raw)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert out.read_text().count("<!-- end") == 1  # its section was written
    return json.loads(raw.read_text())


def test_short_soak_has_no_errors_and_leaks_nothing(tmp_path: Path) -> None:
    r = _bench(tmp_path, "soak")  # 200 concurrent streams for a minute
    assert r["errors"] == 0 and r["ok"] > 200
    samples = r["samples"]
    warm = next(s for s in samples if s["t"] >= samples[-1]["t"] / 5)
    assert samples[-1]["rss_kib"] < warm["rss_kib"] * 1.10, samples
    idle, after = r["idle"], r["after"]
    assert after["threads"] == idle["threads"], (idle, after)
    assert after["fds"] <= idle["fds"] + 2, (idle, after)  # (a scrape's own connection may still be closing)
    assert after["tasks"] <= idle["tasks"] + 2, (idle, after)


def test_abuse_spares_the_other_caller_and_dropped_streams_stop(tmp_path: Path) -> None:
    r = _bench(tmp_path, "abuse", "--streams", "200", "--window-s", "5", "--stream-s", "4")
    assert r["errors"] == 0 and r["quiet_ms"] and r["loaded_ms"]  # the interactive caller was always served
    assert r["statuses"].get("200", 0) + r["statuses"].get("499", 0) + r["statuses"].get("429", 0) == 200
    assert r["statuses"].get("429", 0) > 0  # 200 at once from one caller: the per-caller cap (64) turned some away
    left = r["left"]
    assert left > 0 and r["aborted"] >= left * 0.9  # the model server saw the disconnect of (nearly) every one
    # ... and stopped soon after: of a stream's 400 tokens (4 s), a dropped one makes a small part after its caller
    # left (the time the disconnect takes to reach the model server, on a busy 2-core machine), never the rest.
    after = sorted(r["after_leave"])
    assert after[len(after) // 2] <= 100 and after[-1] < 400, after
