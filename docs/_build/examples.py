"""MkDocs hook: the Examples page (users/examples.md) shows each script of examples/ whole, as it is in the
repository, under the comment at its top that says what it shows. The scripts run in CI
(tests/e2e/test_examples_e2e.py), so what the page shows runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "<!-- examples -->"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ORDER = ("openai_chat.py", "langchain_chat.py", "async_many.py", "usage_polars.py", "prefect_warm_up.py",
         "apply_fleet.sh", "fleet.yaml", "_connect.py")  # fmt: skip
LANGUAGE = {".py": "python", ".sh": "bash", ".yaml": "yaml"}


def render() -> str:
    files = sorted((p for p in EXAMPLES.iterdir() if p.suffix in LANGUAGE), key=lambda p: (
        ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))  # fmt: skip
    out = []
    for path in files:
        text = path.read_text()
        out += [f"## `examples/{path.name}`", "", f"```{LANGUAGE[path.suffix]}", text.rstrip(), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
