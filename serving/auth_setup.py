"""The gateway's auth mode (``FIRST_AUTH_MODE``): local API keys, or Globus access tokens whose settings live
in a Prefect block that operators may edit while the gateway runs."""

from __future__ import annotations

import asyncio
import logging

from blocks.globus import GlobusAuthBlock
from core.settings import Settings
from serving.auth import Authenticator, KeyStore, LocalKeyAuthenticator
from serving.globus_auth import GlobusAuthenticator

log = logging.getLogger("first.api")


async def load_globus_block(settings: Settings) -> GlobusAuthBlock:
    try:
        return await GlobusAuthBlock.aload(settings.globus_block)  # type: ignore[misc]
    except Exception as exc:
        raise SystemExit(
            f"FIRST_AUTH_MODE=globus, but the Globus Auth block {settings.globus_block!r} could not be loaded "
            f"from Prefect ({exc}). Create it with `first globus configure` or in the Prefect UI (Blocks)."
        ) from None


async def build_authenticator(settings: Settings, globus: GlobusAuthBlock | None) -> Authenticator:
    if settings.auth_mode == "local":
        auth = LocalKeyAuthenticator(KeyStore.of(settings.keys_url, settings.keys_db), default_rpm=settings.default_rpm)
        if auth.store.shared:
            try:
                await auth.load()
            except Exception as exc:
                raise SystemExit(f"FIRST_KEYS_URL is set, but the key store could not be read ({exc}).") from None
        return auth
    return GlobusAuthenticator(globus or await load_globus_block(settings))


async def follow_globus_block(settings: Settings, auth: GlobusAuthenticator) -> None:
    """Operators edit the Globus block in the Prefect UI; adopt their changes within a minute."""
    while True:
        await asyncio.sleep(settings.globus_block_refresh_s)
        try:
            block = await GlobusAuthBlock.aload(settings.globus_block)  # type: ignore[misc]
        except Exception as exc:
            log.warning("could not re-read the Globus Auth block (%s); keeping the settings in use", exc)
            continue
        if block.model_dump() != auth.config.model_dump():
            log.info("the Globus Auth block changed; applying it")
            auth.configure(block)
