"""The credential a ``run-batch`` flow run sends a batch's lines to a gateway with.

``first-batch-<batch id>-<HMAC of the id>``: the gateway that sees it checks the HMAC with the secret every
gateway and worker of the deployment share (``FIRST_HOME/batch-secret``, 0600, made on first use), reads the
batch's record and acts as its owner, for that batch's lines only, while the batch is active. The worker never
holds the owner's own credential, and a leaked batch credential ends with its batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from core.errors import APIError
from core.principal import Principal
from serving.auth import Authenticator
from serving.batches.store import BatchStore

PREFIX = "first-batch-"


class BatchTokens:
    def __init__(self, secret_path: Path) -> None:
        self.secret_path = secret_path
        self._secret: bytes | None = None

    def _key(self) -> bytes:
        if self._secret is None:
            try:
                fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32) + "\n")
            except FileExistsError:
                pass
            self._secret = self.secret_path.read_text().strip().encode()
        return self._secret

    def issue(self, batch_id: str) -> str:
        return f"{PREFIX}{batch_id}-{self._sign(batch_id)}"

    def verify(self, token: str) -> str | None:
        """The batch id a well-signed token names, else None."""
        if not token.startswith(PREFIX):
            return None
        batch_id, _, sig = token[len(PREFIX) :].rpartition("-")
        if not batch_id or not hmac.compare_digest(self._sign(batch_id).encode(), sig.encode("utf-8", "replace")):
            return None
        return batch_id

    def _sign(self, batch_id: str) -> str:
        return hmac.new(self._key(), batch_id.encode(), hashlib.sha256).hexdigest()


class WithBatchCredentials:
    """An authenticator that also takes batch credentials, and hands every other credential to ``inner``."""

    def __init__(self, inner: Authenticator, tokens: BatchTokens, store: BatchStore) -> None:
        self.inner, self.tokens, self.store = inner, tokens, store

    @property
    def checks(self) -> int | None:
        """The inner authenticator's remote checks so far (Globus: cache misses), for /health."""
        return getattr(self.inner, "checks", None)

    async def authenticate(self, token: str | None) -> Principal:
        if token and token.startswith(PREFIX):
            return self._batch_principal(token)
        return await self.inner.authenticate(token)

    def known(self, token: str | None) -> Principal | None:
        if token and token.startswith(PREFIX):
            try:
                return self._batch_principal(token)
            except APIError:
                return None
        return self.inner.known(token)

    def _batch_principal(self, token: str) -> Principal:
        batch_id = self.tokens.verify(token)
        refused = APIError(401, "This batch credential is not valid (or its batch has ended).",
                           code="invalid_api_key")  # fmt: skip
        if batch_id is None:
            raise refused
        try:
            batch = self.store.get(batch_id)
        except APIError:
            raise refused from None
        if not batch.active or batch.status == "cancelling":
            raise refused
        return dataclasses.replace(batch.principal(), batch_id=batch_id)
