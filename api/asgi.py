"""ASGI entry point: ``uvicorn api.asgi:app``."""

from api.app import create_app

app = create_app()
