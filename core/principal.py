"""Who is calling, as every layer below the HTTP edge sees it, whichever way they authenticated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """Who is calling, as every step of the inference flow sees it, whichever way they authenticated."""

    user: str  # local: the key's user; Globus: the primary identity's username (alice@uchicago.edu)
    groups: tuple[str, ...] = ()  # local: names given to the key; Globus: ids of the caller's groups
    key_id: str | None = None
    rpm: int = 0  # requests per minute for this credential (local keys); 0 = no limit
    is_admin: bool = False
    identities: tuple[str, ...] = ()  # Globus: usernames of every identity in the caller's identity set
    identity_providers: tuple[str, ...] = ()  # Globus: domains of the identities signed in this session
    expires_at: float | None = None  # Globus: the token's expiry (epoch seconds)
    auth: str = "local"  # "local" | "globus"
    batch_id: str | None = None  # a batch's line, sent by its run-batch flow run on the owner's behalf
