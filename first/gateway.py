"""The composition root: the Litestar app (``api``) with the Prefect control plane (``flows``) lent to it.

``api`` and ``flows`` sit side by side and do not import each other; this is where they meet. Run it with
``uvicorn first.asgi:app`` (what ``first run`` and ``first gateway`` do).
"""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app
from blocks.globus import GlobusAuthBlock
from blocks.registry import Registry
from core.settings import Settings
from flows.control_plane import PrefectControlPlane


def create_gateway(
    settings: Settings, registry: Registry | None = None, globus: GlobusAuthBlock | None = None
) -> Litestar:
    """The gateway a process serves: warm-ups run as ``warm-up`` flows, requests are tracked per the settings."""
    return create_app(settings, registry, globus, control=PrefectControlPlane(settings))
