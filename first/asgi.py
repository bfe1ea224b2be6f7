"""ASGI entry point: ``uvicorn first.asgi:app``; settings from the environment (``FIRST_*``)."""

from core.settings import get_settings
from first.gateway import create_gateway

app = create_gateway(get_settings())
