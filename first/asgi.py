"""ASGI entry point: ``uvicorn first.asgi:app``; settings from the environment (``FIRST_*``)."""

import os

from core.settings import get_settings
from first.gateway import create_gateway

os.umask(0o077)  # the spool, the usage database and logs this process writes are its owner's only
app = create_gateway(get_settings())
