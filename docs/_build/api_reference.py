"""MkDocs hook: the API reference page (users/api.md) gets every route of the gateway's own OpenAPI document,
rendered at build time, so that it cannot drift from the code: each route's summary and description, its
parameters and body fields, and each status it can return with what it means."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

MARKER = "<!-- api-reference:"
SECTIONS = (  # (title, path prefixes), in the page's order
    ("Inference", ("/v1/chat", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/embeddings")),
    ("Models", ("/v1/models",)),
    ("Files", ("/v1/files",)),
    ("Batches", ("/v1/batches",)),
    ("Usage", ("/v1/usage",)),
    ("Status and health", ("/v1/status", "/health")),
)


def openapi_document() -> dict[str, Any]:
    """The document the gateway serves at /docs/openapi.json, from the app itself (no server started)."""
    from blocks.registry import Registry
    from core.settings import Settings
    from first.gateway import create_gateway

    with tempfile.TemporaryDirectory() as home, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Litestar 2's notes on the style of handlers' params
        settings = Settings(home=Path(home))
        app = create_gateway(settings, Registry.embedded_default(settings))
        return app.openapi_schema.to_schema()


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(dict.fromkeys(_type(s) for s in schema.get("anyOf") or schema["oneOf"]))
    if "enum" in schema:
        return " / ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    return kind


def _cell(text: str | None) -> str:
    text = (text or "").replace("\n", " ").replace("|", "\\|").strip()
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _bounds(schema: dict[str, Any]) -> list[str]:
    """A field's limits as the document states them (within anyOf too): "-2.0 to 2.0", "at least 1"."""
    found: dict[str, Any] = {}
    for part in [schema, *schema.get("anyOf", [])]:
        for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            found.setdefault(key, part.get(key))
    low = "minimum" if found["minimum"] is not None else "exclusiveMinimum"
    high = "maximum" if found["maximum"] is not None else "exclusiveMaximum"
    if found[low] is not None and found[high] is not None:
        return [f"{found[low]} to {found[high]}"]
    if found[low] is not None:
        return [f"{'at least' if low == 'minimum' else 'more than'} {found[low]}"]
    if found[high] is not None:
        return [f"{'at most' if high == 'maximum' else 'less than'} {found[high]}"]
    return []


def _described(prop: dict[str, Any]) -> str:
    """The field's description, then its limits and default."""
    parts = [prop.get("description") or "", *_bounds(prop)]
    if prop.get("default") not in (None, False, [], {}):
        parts.append(f"default {prop['default']}")
    return "; ".join(p for p in parts if p)


def _fields(schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = components.get(name, {})
    props = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, prop in props.items():
        rows.append(f"| `{name}` | {_cell(_type(prop))} | {'yes' if name in required else ''} | "
                    f"{_cell(_described(prop))} |")  # fmt: skip
    return rows


def render(doc: dict[str, Any]) -> str:
    """Markdown for every operation, grouped by :data:`SECTIONS`."""
    components = doc.get("components", {}).get("schemas", {})
    operations = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
    out: list[str] = []
    placed: set[tuple[str, str]] = set()
    for title, prefixes in SECTIONS:
        mine = [(p, m, op) for p, m, op in operations if p.startswith(prefixes) and (p, m) not in placed]
        if not mine:
            continue
        out += [f"## {title}", ""]
        for path, method, op in sorted(mine, key=lambda x: (x[0], x[1])):
            placed.add((path, method))
            out += [f"### `{method.upper()} {path}`", "", f"**{op.get('summary', '')}.**", ""]
            if op.get("description"):
                out += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
                for p in params:
                    out.append(f"| `{p['name']}` | {p['in']} | {_cell(_type(p.get('schema', {})))} | "
                               f"{'yes' if p.get('required') else ''} | {_cell(p.get('description'))} |")  # fmt: skip
                out.append("")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                rows = _fields(content.get("schema", {}), components)
                if rows:
                    out += [f"Request body (`{media}`):", "", *rows, ""]
            out += ["| status | meaning |", "| --- | --- |"]
            for status, response in sorted(op.get("responses", {}).items()):
                out.append(f"| {status} | {_cell(response.get('description'))} |")
            out.append("")
    missing = [f"{m.upper()} {p}" for p, m, _ in operations if (p, m) not in placed]
    if missing:
        raise ValueError(f"API reference: no section for {missing}; add it to SECTIONS")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    head, _, tail = markdown.partition(MARKER)
    return head + render(openapi_document()) + tail.split("-->", 1)[1]
