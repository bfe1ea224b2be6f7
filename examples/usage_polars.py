"""Your usage from the gateway's usage API, into polars: per model, and per day.

    .venv/bin/python examples/usage_polars.py [SINCE]      # SINCE: 30m, 12h, 1d, 2w or an ISO date (default 1d)

`GET /v1/usage` answers for your own requests (admins: everyone's). On the gateway's host, an analyst reads the
whole DuckDB store instead: `analytics.usage(since="7d")` or `first usage summary` (docs: For analysts).
"""

from __future__ import annotations

import sys

import httpx
import polars as pl
from _connect import api_key, base_url

since = sys.argv[1] if len(sys.argv) > 1 else "1d"
headers = {"Authorization": f"Bearer {api_key()}"}

with httpx.Client(base_url=base_url(), headers=headers, timeout=30) as http:
    for report in ("by-model", "daily"):
        r = http.get("/usage", params={"report": report, "since": since})
        if r.status_code != 200:  # errors are OpenAI-shaped: the message says what to do
            raise SystemExit(f"{r.status_code}: {r.json()['error']['message']}")
        df = pl.DataFrame(r.json()["data"])
        print(f"{report} since {since}: {df.height} row(s)")
        if df.height:
            print(df.select([c for c in ("day", "model", "requests", "total_tokens", "errors") if c in df.columns]))
