"""bench/analytics.py on a small data set, as CI runs it: it exits 0 and writes its section, with numbers, into the
file given with --out (docs/ is left alone)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import REPO_ROOT

pytestmark = pytest.mark.e2e

BEGIN = "<!-- bench/analytics.py: begin"
END = "<!-- bench/analytics.py: end -->"


def test_bench_analytics_quick_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other.py: begin -->\nkept\n<!-- other.py: end -->\n")
    docs_before = (REPO_ROOT / "docs" / "benchmarks.md").read_bytes()
    cmd = ["bench/analytics.py", "--quick", "--rows", "100000", "--out", str(out), "--dir", str(tmp_path)]
    r = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    text = out.read_text()
    assert "kept" in text  # other scripts' sections stay
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    section = text[text.index(BEGIN) : text.index(END)]
    assert "100,000 synthetic usage records" in section
    m = re.search(r"\*\*([\d,]+) rows/s\*\*", section)
    assert m and int(m.group(1).replace(",", "")) > 0, section
    for name in ("summary", "by-model", "daily", "latency"):
        row = re.search(rf"^\| {re.escape(name)} \| ([\d.,]+) ms \| ([\d.,]+) ms \| same \|", section, re.M)
        assert row, f"no timed, matching row for {name}:\n{section}"
    assert "disagreed" not in section
    assert (REPO_ROOT / "docs" / "benchmarks.md").read_bytes() == docs_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("first-bench-analytics-")] == []  # cleaned up
