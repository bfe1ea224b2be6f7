"""The lines of a batch input file, in OpenAI's format, and the checks one must pass before a batch starts::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", ...}}

Every line is JSON; ``custom_id`` is unique; ``url`` is one of the batch endpoints and the same on every line;
the body is a valid request for that endpoint (not streaming); the model exists, serves that endpoint, and the
uploader may use it. The first line that fails names itself: ``line 3: ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from blocks.registry import Registry
from core.errors import APIError
from core.principal import Principal
from serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.visibility import allowed

# Batch endpoints (the `url` of a line, `endpoint` of a batch) -> (endpoint name in usage rows, request model).
BATCH_ENDPOINTS: dict[str, tuple[str, type[BaseModel]]] = {
    "/v1/chat/completions": ("chat.completions", ChatCompletionRequest),
    "/v1/completions": ("completions", CompletionRequest),
    "/v1/embeddings": ("embeddings", EmbeddingRequest),
}
MAX_CUSTOM_ID = 512


class BatchLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    custom_id: str
    method: str = "POST"
    url: str
    body: dict[str, Any]


def bad_line(n: int, why: str) -> APIError:
    return APIError(400, f"line {n}: {why}", param="file", code="invalid_batch_line")


def read_lines(path: Path, offset: int = 0, first_n: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each non-blank line, read as a stream; from byte ``offset``, where the line
    number is ``first_n``."""
    for n, raw, _ in read_lines_at(path, offset, first_n):
        yield n, raw


def read_lines_at(path: Path, offset: int = 0, first_n: int = 1) -> Iterator[tuple[int, bytes, int]]:
    """:func:`read_lines` with each line's byte offset (where a later read may start)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        at = offset
        for n, raw in enumerate(fh, first_n):
            if raw.strip():
                yield n, raw, at
            at += len(raw)


def check_input_file(path: Path, who: Principal, registry: Registry, max_lines: int) -> tuple[int, str]:
    """Check every line of a batch input file; return (lines, endpoint). Raises 400 naming the first bad line."""
    seen: set[str] = set()
    endpoint: str | None = None
    models: dict[str, str | None] = {}  # model name -> why it may not be used (None: it may)
    count = 0
    decoder = msgspec.json.Decoder(BatchLine)
    for n, raw in read_lines(path):
        count += 1
        if count > max_lines:
            raise APIError(400, f"The file has more than {max_lines} requests, this gateway's limit for one batch; "
                           "split it into several files.", param="file", code="too_many_lines")  # fmt: skip
        try:
            line = decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise bad_line(n, f"{exc} (each line needs custom_id, method, url and body)") from None
        except msgspec.DecodeError:
            raise bad_line(n, "not valid JSON (one request object per line)") from None
        if not line.custom_id or len(line.custom_id) > MAX_CUSTOM_ID:
            raise bad_line(n, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
        if line.custom_id in seen:
            raise bad_line(n, f"custom_id '{line.custom_id}' is used twice; each line needs its own")
        seen.add(line.custom_id)
        if line.method.upper() != "POST":
            raise bad_line(n, f"method must be POST, not '{line.method}'")
        if line.url not in BATCH_ENDPOINTS:
            raise bad_line(n, f"url '{line.url}' is not a batch endpoint (one of {', '.join(BATCH_ENDPOINTS)})")
        if endpoint is None:
            endpoint = line.url
        elif line.url != endpoint:
            raise bad_line(n, f"url '{line.url}' differs from the first line's '{endpoint}'; one batch, one endpoint")
        name, model_type = BATCH_ENDPOINTS[line.url]
        try:
            body = model_type.model_validate(line.body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise bad_line(n, f"body.{where}: {err['msg']}") from None
        if getattr(body, "stream", False):
            raise bad_line(n, "stream must be false in a batch (each answer goes to the output file)")
        model = body.model  # type: ignore[attr-defined]
        if model not in models:
            models[model] = _model_problem(model, name, who, registry)
        if models[model] is not None:
            raise bad_line(n, models[model])  # type: ignore[arg-type]
    if count == 0:
        raise APIError(400, "The file has no requests: one JSON request per line.", param="file",
                       code="invalid_batch_line")  # fmt: skip
    assert endpoint is not None
    return count, endpoint


def _model_problem(name: str, endpoint: str, who: Principal, registry: Registry) -> str | None:
    model = registry.resolve(name)
    if model is None or (model.hidden and not allowed(who, model)):
        return f"the model '{name}' does not exist or you do not have access to it"
    if not allowed(who, model):
        return f"you do not have access to the model '{model.name}'; ask the gateway's operators"
    if endpoint not in model.endpoints:
        return f"the model '{model.name}' does not serve /v1/{endpoint.replace('.', '/')}"
    return None
