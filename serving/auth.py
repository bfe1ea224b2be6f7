"""Who is calling: the bearer token resolves to a Principal through an Authenticator.

Local mode uses API keys stored only as SHA-256 hashes in SQLite. Keys are 32 random bytes, so a fast
hash is safe (no dictionary to attack) and lets the gateway check a key in microseconds. Globus mode
(``api/globus_auth.py``) sits behind the same ``Authenticator`` protocol and yields the same ``Principal``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.clock import SYSTEM_CLOCK, Clock
from core.errors import APIError
from core.principal import Principal

KEY_PREFIX = "first-"


class Authenticator(Protocol):
    async def authenticate(self, token: str | None) -> Principal: ...

    def known(self, token: str | None) -> Principal | None:
        """The principal, if the credential is valid and can be told so without a remote call; else None."""
        ...


@dataclass
class KeyInfo:
    key_id: str
    user: str
    groups: list[str]
    created: float
    revoked: bool
    rpm: int = 0
    last4: str = field(default="")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")


def _check_name(kind: str, name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise ValueError(
            f"{kind} name {name!r} is not allowed: use 1 to 128 letters, digits and _ . @ + - (one {kind} per "
            f"--{kind if kind == 'group' else 'user'}; repeat --group for several)"
        )


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """API keys in a small SQLite file: hashed, listable, revocable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL,"
                " user TEXT NOT NULL, groups TEXT NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL"
                " DEFAULT 0, rpm INTEGER NOT NULL DEFAULT 0, last4 TEXT NOT NULL DEFAULT '')"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def create(self, user: str, groups: list[str] | None = None, rpm: int = 0) -> tuple[str, KeyInfo]:
        """A new key for ``user`` in ``groups``. Names are checked: the groups are stored comma-joined, so a
        comma in one would smuggle in another (``--group "x,admin"`` must not make an admin key)."""
        _check_name("user", user)
        for group in groups or []:
            _check_name("group", group)
        if rpm < 0:
            raise ValueError(f"rpm must be 0 (no limit) or more, not {rpm}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(secrets.token_hex(4), user, sorted(set(groups or [])), time.time(), False, rpm, key[-4:])
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?,?,?,?,?,0,?,?)",
                (info.key_id, _hash(key), user, ",".join(info.groups), info.created, rpm, info.last4),
            )
        return key, info

    def list(self) -> list[KeyInfo]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key_id, user, groups, created, revoked, rpm, last4 FROM api_keys ORDER BY created"
            ).fetchall()
        return [KeyInfo(r[0], r[1], [g for g in r[2].split(",") if g], r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def revoke(self, key_id_or_user: str) -> int:
        """Revoke one key by id, or every key of a user. Returns how many were revoked."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked=1 WHERE (key_id=? OR user=?) AND revoked=0",
                (key_id_or_user, key_id_or_user),
            )
            return cur.rowcount

    def _active(self) -> dict[str, Principal]:
        with self._connect() as db:
            rows = db.execute("SELECT key_hash, user, groups, key_id, rpm FROM api_keys WHERE revoked=0").fetchall()
        out = {}
        for key_hash, user, groups, key_id, rpm in rows:
            g = tuple(x for x in groups.split(",") if x)
            out[key_hash] = Principal(user, g, key_id, rpm, is_admin="admin" in g)
        return out


class LocalKeyAuthenticator:
    """Checks bearer API keys against the KeyStore; reloads it when the file changes (at most once a second)."""

    def __init__(self, store: KeyStore, default_rpm: int = 0, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.clock = clock
        self.default_rpm = default_rpm
        self._keys: dict[str, Principal] = {}
        self._mtime = -1.0
        self._checked = 0.0
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        now = self.clock.monotonic()
        if now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            mtime = self.store.path.stat().st_mtime if self.store.path.exists() else 0.0
            if mtime != self._mtime:
                self._keys = self.store._active()
                self._mtime = mtime

    async def authenticate(self, token: str | None) -> Principal:
        return self.check(token)

    def known(self, token: str | None) -> Principal | None:
        """The principal if the key is valid (the check is local and cheap), else None."""
        try:
            return self.check(token)
        except APIError:
            return None

    def check(self, token: str | None) -> Principal:
        """The synchronous check (microseconds: a hash and a dict scan, no I/O but a stat once a second)."""
        if not token:
            raise APIError(
                401,
                "Missing credential. Send 'Authorization: Bearer <API key>' (create one with `first keys create`).",
                code="missing_api_key",
            )
        self._refresh()
        digest = _hash(token)
        # A dict lookup by the SHA-256 of the presented key: whatever its timing reveals is about the hash of
        # the caller's own input, which they can compute anyway; nothing about stored keys. O(1) in the keys.
        principal = self._keys.get(digest)
        if principal is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if principal.rpm == 0 and self.default_rpm:
            principal = dataclasses.replace(principal, rpm=self.default_rpm)
        return principal


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
