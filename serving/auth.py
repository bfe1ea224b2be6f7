"""Who is calling: the bearer token resolves to a Principal through an Authenticator.

Local mode uses API keys stored only as SHA-256 hashes in SQLite. Keys are 32 random bytes, so a fast
hash is safe (no dictionary to attack) and lets the gateway check a key in microseconds. Globus mode
(``serving/globus_auth.py``) sits behind the same ``Authenticator`` protocol and yields the same ``Principal``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from core.clock import SYSTEM_CLOCK, Clock
from core.errors import APIError
from core.principal import Principal

log = logging.getLogger("first.auth")

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
    """API keys, hashed, listable, revocable: in a small SQLite file (one gateway, ``FIRST_HOME/keys.sqlite``), or
    in PostgreSQL (``FIRST_KEYS_URL``), which every replica of a production deployment reads. The same table
    either way (SQLAlchemy Core)."""

    def __init__(self, where: Path | str) -> None:
        if isinstance(where, Path):
            where.parent.mkdir(parents=True, exist_ok=True)
            self.path: Path | None = where
            self.url = f"sqlite:///{where}"
        else:
            self.path, self.url = None, where
        self.engine = sa.create_engine(self.url, pool_pre_ping=True, future=True)
        KEYS_METADATA.create_all(self.engine, checkfirst=True)

    @classmethod
    def of(cls, keys_url: str | None, keys_db: Path) -> KeyStore:
        return cls(keys_url) if keys_url else cls(keys_db)

    @property
    def shared(self) -> bool:
        """A database server (PostgreSQL) rather than this host's file."""
        return self.path is None

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
        with self.engine.begin() as db:
            db.execute(API_KEYS.insert().values(
                key_id=info.key_id, key_hash=_hash(key), user=user, groups=",".join(info.groups),
                created=info.created, revoked=0, rpm=rpm, last4=info.last4,
            ))  # fmt: skip
        return key, info

    def list(self) -> list[KeyInfo]:
        t = API_KEYS.c
        with self.engine.connect() as db:
            rows = db.execute(sa.select(t.key_id, t.user, t.groups, t.created, t.revoked, t.rpm, t.last4)
                              .order_by(t.created)).all()  # fmt: skip
        return [KeyInfo(r[0], r[1], [g for g in r[2].split(",") if g], r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def revoke(self, key_id_or_user: str) -> int:
        """Revoke one key by id, or every key of a user. Returns how many were revoked."""
        t = API_KEYS.c
        with self.engine.begin() as db:
            which = sa.or_(t.key_id == key_id_or_user, t.user == key_id_or_user)
            cur = db.execute(API_KEYS.update().where(which, t.revoked == 0).values(revoked=1))
            return cur.rowcount

    def active(self) -> dict[str, Principal]:
        """Every key not revoked, by its hash."""
        t = API_KEYS.c
        with self.engine.connect() as db:
            rows = db.execute(sa.select(t.key_hash, t.user, t.groups, t.key_id, t.rpm).where(t.revoked == 0)).all()
        out = {}
        for key_hash, user, groups, key_id, rpm in rows:
            g = tuple(x for x in groups.split(",") if x)
            out[key_hash] = Principal(user, g, key_id, rpm, is_admin="admin" in g)
        return out


KEYS_METADATA = sa.MetaData()
API_KEYS = sa.Table(
    "api_keys", KEYS_METADATA,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("key_hash", sa.Text, unique=True, nullable=False),
    sa.Column("user", sa.Text, nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rpm", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last4", sa.Text, nullable=False, server_default=""),
)  # fmt: skip


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
        self.loaded_at = clock.monotonic()  # a database store: when its keys were last read
        self.stale_since: float | None = None  # ... and since when it could not be read
        self.unreadable = False  # past the bound: every key is refused until it can be read again

    def _refresh(self) -> None:
        """A file store: re-read it when the file changed (a stat at most once a second). A database store is
        re-read by ``follow`` instead, off the event loop."""
        path = self.store.path
        now = self.clock.monotonic()
        if path is None or now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            mtime = path.stat().st_mtime if path.exists() else 0.0
            if mtime != self._mtime:
                self._keys = self.store.active()
                self._mtime = mtime

    async def load(self) -> None:
        """Read a database store's keys now (at start: a gateway that cannot read them does not start)."""
        self._keys = await asyncio.to_thread(self.store.active)
        self.loaded_at = self.clock.monotonic()

    async def follow(self, every_s: float, max_stale_s: float) -> None:
        """Re-read a database store every ``every_s`` (so a revocation reaches every replica within that). While
        it cannot be read the last keys read stay valid for ``max_stale_s``; past that every key is refused
        (503): authentication never fails open."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.load()
                self.stale_since = None
            except Exception as exc:
                if self.stale_since is None:
                    self.stale_since = self.clock.monotonic()
                    log.warning("cannot read the key store (%r): the keys read %.0f s ago stay valid for %.0f s",
                                exc, self.clock.monotonic() - self.loaded_at, max_stale_s)  # fmt: skip
                if self.clock.monotonic() - self.loaded_at > max_stale_s:
                    self._keys, self.unreadable = {}, True
                continue
            self.unreadable = False

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
        if principal is None and self.unreadable:
            raise APIError(503, "The gateway cannot read its API keys right now; retry shortly.",
                           code="key_store_unreachable", headers={"Retry-After": "10"})  # fmt: skip
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
