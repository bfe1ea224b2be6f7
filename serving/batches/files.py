"""Uploaded files (``/v1/files``): bytes on disk beside a small JSON record, private to their uploader.

A file is ``<root>/files/<id>.data`` plus ``<id>.json`` (its OpenAI file object and its owner). The folder is
0700 and the files 0600. An upload is written to a temporary name as its bytes arrive (never held whole in
memory) and renamed into place only once it is complete and within the limits: a file larger than
``max_file_bytes`` or past its owner's quota is refused with 413, and nothing of it stays.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from core.errors import APIError

PURPOSES = ("batch", "batch_output", "user_data")


class FileObject(msgspec.Struct, kw_only=True):
    """OpenAI's file object, and who owns it (not shown to callers)."""

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    owner: str = ""
    lines: int | None = None  # batch input: how many requests it holds (after its checks)
    endpoint: str | None = None  # batch input: the one `url` its lines use

    def public(self) -> dict[str, object]:
        out = msgspec.to_builtins(self)
        for private in ("owner", "lines", "endpoint"):
            out.pop(private, None)
        return out


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such file: '{file_id}'.", param="file_id", code="file_not_found")


class FileStore:
    """The files of every user under one folder. Another user's file is 404, as a hidden model is."""

    def __init__(self, root: Path, max_bytes: int, quota_bytes: int) -> None:
        self.dir = root / "files"
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        os.chmod(self.dir, 0o700)

    def data_path(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.data"

    def _meta_path(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.json"

    # ---- writing ----

    def upload(self, owner: str, filename: str, purpose: str) -> Upload:
        """Start an upload; feed it with ``write`` and end it with ``commit`` (or ``discard``)."""
        if purpose not in PURPOSES:
            raise APIError(400, f"'purpose' must be one of {', '.join(PURPOSES)}; got '{purpose}'.", param="purpose")
        room = min(self.max_bytes, self.quota_bytes - self.bytes_of(owner))
        if room <= 0:
            raise _quota(self.quota_bytes)
        return Upload(self, owner, filename, purpose, room)

    def add(self, owner: str, filename: str, purpose: str, source: Path) -> FileObject:
        """Adopt a file already on disk under this folder (a batch's output), moving it into place."""
        meta = FileObject(id=_new_id(), bytes=source.stat().st_size, created_at=int(time.time()), filename=filename,
                          purpose=purpose, owner=owner)  # fmt: skip
        os.chmod(source, 0o600)
        os.replace(source, self.data_path(meta.id))
        self.save(meta)
        return meta

    def save(self, meta: FileObject) -> None:
        tmp = self._meta_path(meta.id).with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.encode(meta))
        os.replace(tmp, self._meta_path(meta.id))

    # ---- reading ----

    def get(self, file_id: str, owner: str | None) -> FileObject:
        """The file, if ``owner`` owns it (``None``: an operator, who may read any)."""
        if not _valid_id(file_id):
            raise not_found(file_id)
        try:
            meta = msgspec.json.decode(self._meta_path(file_id).read_bytes(), type=FileObject)
        except FileNotFoundError:
            raise not_found(file_id) from None
        if owner is not None and meta.owner != owner:
            raise not_found(file_id)
        return meta

    def all(self, owner: str | None = None) -> Iterator[FileObject]:
        for path in self.dir.glob("file-*.json"):
            try:
                meta = msgspec.json.decode(path.read_bytes(), type=FileObject)
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # deleted meanwhile, or half-written by a crash (its data is cleaned by retention)
            if owner is None or meta.owner == owner:
                yield meta

    def list(self, owner: str, purpose: str | None = None, after: str | None = None, limit: int = 10000,
             order: str = "desc") -> tuple[list[FileObject], bool]:  # fmt: skip
        """One page of the owner's files, newest first (or oldest with ``order="asc"``), after the file ``after``;
        and whether there are more."""
        files = [f for f in self.all(owner) if purpose is None or f.purpose == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order != "asc")
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        return files[:limit], len(files) > limit

    def bytes_of(self, owner: str) -> int:
        return sum(f.bytes for f in self.all(owner))

    def delete(self, file_id: str, owner: str | None) -> FileObject:
        meta = self.get(file_id, owner)
        self._meta_path(file_id).unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)
        return meta


class Upload:
    """One upload in progress: bytes go to a temporary file as they arrive."""

    def __init__(self, store: FileStore, owner: str, filename: str, purpose: str, room: int) -> None:
        self.store, self.owner, self.filename, self.purpose, self.room = store, owner, filename, purpose, room
        self.id = _new_id()
        self.size = 0
        self.tmp = store.dir / f".{self.id}.upload"
        self._fh = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.room:
            self.discard()
            if self.size > self.store.max_bytes:
                raise APIError(413, f"The file is larger than this gateway's limit of {_mib(self.store.max_bytes)};"
                               " split it into several batches.", param="file", code="file_too_large")  # fmt: skip
            raise _quota(self.store.quota_bytes)
        self._fh.write(data)

    def close(self) -> None:
        """All bytes are in: flush them to the temporary file (which the checks then read)."""
        self._fh.close()

    def commit(self, lines: int | None = None, endpoint: str | None = None) -> FileObject:
        self._fh.close()
        meta = FileObject(id=self.id, bytes=self.size, created_at=int(time.time()), filename=self.filename,
                          purpose=self.purpose, owner=self.owner, lines=lines, endpoint=endpoint)  # fmt: skip
        os.replace(self.tmp, self.store.data_path(self.id))
        self.store.save(meta)
        return meta

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _quota(quota: int) -> APIError:
    return APIError(413, f"Your files would take more than your quota of {_mib(quota)}; delete some "
                    "(client.files.delete) and retry.", param="file", code="file_quota_exceeded")  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _new_id() -> str:
    return "file-" + secrets.token_hex(12)


def _valid_id(file_id: str) -> bool:
    return file_id.startswith("file-") and len(file_id) == 29 and all(c in "0123456789abcdef" for c in file_id[5:])
