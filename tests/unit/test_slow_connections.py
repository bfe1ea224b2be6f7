"""Slow and greedy connections against a real uvicorn gateway process: a client that connects and sends nothing,
or drips its headers (slowloris), is cut off after FIRST_HEADER_TIMEOUT_S; real requests keep being served."""

from __future__ import annotations

import socket
import time

import httpx

from tests.gateway_factory import GatewayProcess


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (recv gives b"" or a reset), or None if it did not."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
    except ConnectionResetError:
        return time.monotonic() - t0
    except TimeoutError:
        return None


def test_silent_and_dripping_connections_are_closed_after_the_header_timeout(tmp_path) -> None:
    gw = GatewayProcess(tmp_path / "home", env={"FIRST_HEADER_TIMEOUT_S": "1"}).start()
    try:
        silent = socket.create_connection(("127.0.0.1", gw.port))
        dripping = socket.create_connection(("127.0.0.1", gw.port))
        dripping.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        # Meanwhile a real client is served at once.
        assert httpx.get(gw.url + "/health", timeout=5).status_code == 200
        assert (_closed_within(silent, 5) or 99) < 4
        assert (_closed_within(dripping, 5) or 99) < 4
        # A kept-alive connection that finished its request is not cut by the header timeout (keep-alive's 75 s).
        with httpx.Client(base_url=gw.url) as client:
            assert client.get("/health").status_code == 200
            time.sleep(1.5)
            assert client.get("/health").status_code == 200
            assert client.get("/health").headers.get("connection") != "close"
    finally:
        gw.stop()
