"""MkDocs hook: ``<!-- include: PATH -->`` in a page becomes the repository file PATH (Markdown), its headings
one level deeper. For READMEs that must stay beside what they describe (deployments/endpoints/README.md beside
the endpoint templates) and still be part of the site, without a copy that drifts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(r"<!-- include: (\S+) -->")


def _demoted(text: str) -> str:
    """Without its title (the page's heading stands for it), headings one level deeper (outside code fences)."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return INCLUDE.sub(lambda m: _demoted((REPO / m[1]).read_text()), markdown)
