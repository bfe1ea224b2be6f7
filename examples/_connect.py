"""Where the examples find the gateway: OPENAI_BASE_URL and OPENAI_API_KEY (what the openai client reads), else
`make run`'s own (http://127.0.0.1:8000/v1 and the demo key it wrote to .first/demo-api-key)."""

from __future__ import annotations

import os
from pathlib import Path

FIRST_HOME = Path(os.environ.get("FIRST_HOME", Path(__file__).resolve().parent.parent / ".first"))


def base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")


def api_key() -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    demo = FIRST_HOME / "demo-api-key"
    if not demo.exists():
        raise SystemExit(f"set OPENAI_API_KEY (or start `make run`, which writes {demo})")
    return demo.read_text().strip()


MODEL = os.environ.get("FIRST_MODEL", "tiny")
EMBED_MODEL = os.environ.get("FIRST_EMBED_MODEL", "tiny-embed")
