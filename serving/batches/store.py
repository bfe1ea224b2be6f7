"""Batch records, shared by the gateways (create, retrieve, list, cancel) and the ``run-batch`` flow (progress,
results) through a folder: ``<root>/batches/<id>/batch.json``, and beside it the lines answered so far
(``output.jsonl``, ``errors.jsonl``), which the flow appends to and reads back when it resumes.

Every change is a read-modify-write under an exclusive ``flock`` on the batch's lock file, so a caller's cancel
and the flow's progress never overwrite each other. The record is replaced atomically (temporary file, rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from core.errors import APIError
from core.principal import Principal

# OpenAI's batch states. A batch is active until it reaches one of the final ones.
FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
MAX_WINDOW_S = 7 * 86400
_WINDOW = re.compile(r"^(\d{1,4})([hd])$")


class RequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(msgspec.Struct, kw_only=True):
    """OpenAI's batch object, plus what only the gateway and the flow see (``owner``, ``flow_run_id``, ...)."""

    id: str
    object: str = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: dict[str, int] = msgspec.field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )
    # private
    owner: dict[str, Any] = msgspec.field(default_factory=dict)  # the creator's Principal, as a dict
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    heartbeat_at: float | None = None  # the flow run's last sign of life (it writes progress every second)
    runs: int = 0  # flow runs started for it: more than one after a resume
    gateway_url: str | None = None  # where its runs send its lines (the gateway that created it)
    runs_on: str | None = None  # "gateway" or "vllm-run-batch@<cluster>" (serving/batches/paths.py)

    PRIVATE = ("owner", "flow_run_id", "flow_run_name", "heartbeat_at", "runs", "gateway_url", "runs_on")

    @property
    def user(self) -> str:
        return str(self.owner.get("user", ""))

    @property
    def active(self) -> bool:
        return self.status not in FINAL

    def principal(self) -> Principal:
        fields = dict(self.owner)
        for name in ("groups", "identities", "identity_providers"):
            fields[name] = tuple(fields.get(name) or ())
        return Principal(**fields)

    def public(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        for private in self.PRIVATE:
            out.pop(private, None)
        out["usage"] = {**self.usage, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        return out


def window_seconds(window: str) -> int:
    """``completion_window`` as seconds: ``24h`` (OpenAI's), or any ``<n>h`` / ``<n>d`` up to 7 days."""
    m = _WINDOW.match(window or "")
    seconds = int(m.group(1)) * (3600 if m.group(2) == "h" else 86400) if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise APIError(400, f"completion_window must be like '24h' (hours) or '2d' (days), at most 7 days; got "
                       f"'{window}'.", param="completion_window")  # fmt: skip
    return seconds


def not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such batch: '{batch_id}'.", param="batch_id", code="batch_not_found")


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def folder(self, batch_id: str) -> Path:
        return self.dir / batch_id

    def create(self, *, owner: Principal, endpoint: str, input_file_id: str, window: str, lines: int,
               model: str | None, metadata: dict[str, str] | None) -> Batch:  # fmt: skip
        now = int(time.time())
        owner_fields = {**asdict(owner), "expires_at": None}  # its lines run later than the token lives
        batch = Batch(id="batch_" + secrets.token_hex(12), endpoint=endpoint, input_file_id=input_file_id,
                      completion_window=window, created_at=now, expires_at=now + window_seconds(window),
                      request_counts=RequestCounts(total=lines), metadata=metadata, model=model,
                      owner=owner_fields)  # fmt: skip
        folder = self.folder(batch.id)
        folder.mkdir(mode=0o700)
        self._write(batch)
        return batch

    def get(self, batch_id: str, owner: str | None = None) -> Batch:
        """The batch, if ``owner`` created it (``None``: an operator or the flow, who may read any)."""
        if not re.fullmatch(r"batch_[0-9a-f]{24}", batch_id or ""):
            raise not_found(batch_id)
        try:
            batch = msgspec.json.decode((self.folder(batch_id) / "batch.json").read_bytes(), type=Batch)
        except FileNotFoundError:
            raise not_found(batch_id) from None
        if owner is not None and batch.user != owner:
            raise not_found(batch_id)
        return batch

    def update(self, batch_id: str, change: Callable[[Batch], None]) -> Batch:
        """Apply ``change`` to the batch under its lock and save it (404 for a batch that does not exist)."""
        self.get(batch_id)
        with self._locked(batch_id):
            batch = self.get(batch_id)
            change(batch)
            self._write(batch)
            return batch

    def all(self, owner: str | None = None) -> Iterator[Batch]:
        for path in self.dir.glob("batch_*/batch.json"):
            try:
                batch = msgspec.json.decode(path.read_bytes(), type=Batch)
            except (FileNotFoundError, msgspec.DecodeError):
                continue
            if owner is None or batch.user == owner:
                yield batch

    def list(self, owner: str | None, after: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        """One page of batches, newest first, after the batch ``after``; and whether there are more."""
        batches = sorted(self.all(owner), key=lambda b: (b.created_at, b.id), reverse=True)
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        return batches[:limit], len(batches) > limit

    def delete(self, batch_id: str) -> None:
        folder = self.folder(batch_id)
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()

    @contextlib.contextmanager
    def _locked(self, batch_id: str) -> Iterator[None]:
        try:
            fd = os.open(self.folder(batch_id) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # deleted (batch-retention) since it was read
            raise not_found(batch_id) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, batch: Batch) -> None:
        path = self.folder(batch.id) / "batch.json"
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.encode(batch))
        os.replace(tmp, path)
