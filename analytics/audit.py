"""Audit mode (opt-in, ``FIRST_AUDIT_MODE``): the text of each request, kept apart from usage.

Usage rows (:mod:`analytics.records`) never hold text. When audit mode is on, the gateway also appends one JSON
line per request to ``FIRST_HOME/audit/<YYYY-MM-DD>.jsonl`` (the UTC day the request started)::

    {"request_id", "ts", "time", "user", "model", "cluster", "endpoint", "status", "prompt", "completion"}

``prompt`` is the chat or Anthropic messages (role, content, name; a separate ``system`` first), the completions
prompt, or the Responses and embeddings input; ``completion`` is the generated text (streams: the deltas put
together; Responses' ``output_text`` and Anthropic's ``text`` blocks too), a list of texts when the caller asked
for several choices, or null when nothing was generated (embeddings). One file per day makes retention a file
deletion: :meth:`AuditLog.enforce_retention` (run daily by the ``audit-retention`` flow) deletes the days older
than ``FIRST_AUDIT_RETENTION_DAYS``, and :meth:`AuditLog.purge` deletes chosen days on request.

Files are created ``0600`` in a ``0700`` folder (they hold what users typed). Each line is one ``write(2)`` on a
file opened with ``O_APPEND``, so several gateway processes may append to the same day.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["AuditEntry", "AuditLog", "audit_log", "completion_of", "prompt_of"]

DAY_FILE_RE = re.compile(r"^(?P<day>\d{4}-\d{2}-\d{2})\.jsonl$")


class AuditEntry(msgspec.Struct, kw_only=True):
    request_id: str
    ts: float  # request start, seconds since the epoch (UTC)
    time: str = ""  # the same, ISO 8601 (filled in by AuditLog.append)
    user: str
    model: str
    cluster: str | None = None
    endpoint: str
    status: int = 200
    prompt: Any = None  # chat: [{"role", "content", "name"?}]; completions: the prompt
    completion: str | list[str] | None = None


def prompt_of(body: Any) -> Any:
    """The prompt of a request as plain JSON: chat and Anthropic Messages their messages (with a ``system`` entry
    first where the request has one apart), completions their prompt, Responses and embeddings their input."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        system = getattr(body, "system", None)
        head = [{"role": "system", "content": system}] if system else []
        return head + [
            {k: v for k, v in (("role", m.role), ("content", m.content), ("name", getattr(m, "name", None))) if v}
            for m in messages
        ]
    instructions = getattr(body, "instructions", None)
    if instructions:
        return {"instructions": instructions, "input": body.input}
    return getattr(body, "prompt", getattr(body, "input", None))


def completion_of(pieces: dict[int, list[str]] | None) -> str | list[str] | None:
    """The generated text from pieces collected per choice index: one string, a list for several choices."""
    if not pieces:
        return None
    texts = ["".join(pieces[i]) for i in sorted(pieces)]
    return texts[0] if len(texts) == 1 else texts


def response_texts(response: dict[str, Any]) -> dict[int, list[str]]:
    """Text pieces per choice index of a whole answer: OpenAI's chat (``message.content``) and completions
    (``text``); a Responses object (its ``output_text`` parts); an Anthropic message (its ``text`` blocks)."""
    out: dict[int, list[str]] = {}
    if response.get("object") == "response":
        for item in response.get("output") or []:
            parts = item.get("content") if isinstance(item, dict) else None
            for part in parts or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    out.setdefault(0, []).append(part.get("text") or "")
        return out
    if response.get("type") == "message":
        for block in response.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "text":
                out.setdefault(0, []).append(block.get("text") or "")
        return out
    for n, choice in enumerate(response.get("choices") or []):
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        out.setdefault(int(choice.get("index", n)), []).append(text or "")
    return out


def chunk_texts(chunk: dict[str, Any], pieces: dict[int, list[str]]) -> None:
    """Add a stream chunk's text deltas to ``pieces`` (per choice index): OpenAI's chunks, Responses' typed
    ``response.output_text.delta`` events and Anthropic's ``content_block_delta`` text deltas."""
    kind = chunk.get("type")
    if kind == "response.output_text.delta":
        if chunk.get("delta"):
            pieces.setdefault(0, []).append(chunk["delta"])
        return
    if kind == "content_block_delta":
        delta = chunk.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            pieces.setdefault(0, []).append(delta["text"])
        return
    for n, choice in enumerate(chunk.get("choices") or []):
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        if text:
            pieces.setdefault(int(choice.get("index", n)), []).append(text)


def _day_of(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def _today() -> date:
    return datetime.now(UTC).date()


class AuditLog:
    """The audit folder: one JSON-lines file per UTC day (thread- and process-safe appends)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._encoder = msgspec.json.Encoder()
        self._lock = threading.Lock()
        self._ready = False

    def path_for(self, day: date) -> Path:
        return self.directory / f"{day.isoformat()}.jsonl"

    def append(self, entry: AuditEntry) -> Path:
        """Write one entry as a JSON line to its day's file (one ``write(2)``); returns the file."""
        if not entry.time:
            entry.time = datetime.fromtimestamp(entry.ts, UTC).isoformat()
        line = self._encoder.encode(entry) + b"\n"
        path = self.path_for(_day_of(entry.ts))
        with self._lock:
            if not self._ready:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._ready = True
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            except FileNotFoundError:  # the folder was removed under us
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        return path

    def days(self) -> list[tuple[date, Path]]:
        """The day files present, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = DAY_FILE_RE.match(name)
            if m is None:
                continue
            try:
                found.append((date.fromisoformat(m["day"]), self.directory / name))
            except ValueError:
                continue
        return sorted(found)

    def entries(self, day: date) -> Iterator[dict[str, Any]]:
        """The entries of one day (complete lines only)."""
        path = self.path_for(day)
        if not path.exists():
            return
        for line in path.read_bytes().splitlines():
            if line.strip():
                yield msgspec.json.decode(line)

    def expired(self, retention_days: int, today: date | None = None) -> list[Path]:
        """Day files older than ``retention_days`` days: before ``today - retention_days`` (today is always kept)."""
        if retention_days < 0:
            raise ValueError("retention_days must be >= 0")
        cutoff = (today or _today()) - timedelta(days=retention_days)
        return [path for day, path in self.days() if day < cutoff]

    def enforce_retention(self, retention_days: int, today: date | None = None) -> list[Path]:
        """Delete the day files older than ``retention_days`` days; returns what was deleted."""
        return self._delete(self.expired(retention_days, today))

    def purge(self, start: date, end: date | None = None) -> list[Path]:
        """Delete the day files from ``start`` to ``end`` (inclusive; default: ``start`` only)."""
        end = end or start
        return self._delete([path for day, path in self.days() if start <= day <= end])

    @staticmethod
    def _delete(paths: list[Path]) -> list[Path]:
        deleted = []
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            deleted.append(path)
        return deleted


@lru_cache(maxsize=8)
def audit_log(directory: Path) -> AuditLog:
    """The process's AuditLog for a folder (one lock per folder)."""
    return AuditLog(directory)
