"""Real Redis and PostgreSQL servers for the production-topology tests, started on 127.0.0.1 and a free port in a
temporary folder, and stopped at the end. The binaries come from Debian's packages (`make services` installs
them as root); without them a test skips, naming the package to install."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from first.runner import free_port


class RedisServer:
    """``redis-server`` without persistence. ``stop()`` and ``start()`` again keep the port (Redis going away and
    coming back)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed: `sudo apt-get install redis-server` (or `make services`)")
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL's server is not installed: `sudo apt-get install postgresql` (or `make services`)")
    return Path(found[-1]).parent


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb, pg_ctl), trusting local connections, with one database. As root,
    initdb refuses to run: then the server runs as ``nobody``."""

    def __init__(self, folder: Path, database: str = "prefect") -> None:
        self.bin, self.folder, self.port, self.database = _pg_bin(), folder, free_port(), database
        self.data = folder / "data"
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in argv]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)

    @property
    def url(self) -> str:
        """For Prefect (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def sync_url(self, database: str) -> str:
        """For FIRST's key store (``FIRST_KEYS_URL``), in a database of its own."""
        with contextlib.suppress(subprocess.CalledProcessError):  # already there
            self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", self.user, database)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.folder, 0o777)
            for parent in list(self.folder.parents)[:-1]:  # nobody must reach the folder
                with contextlib.suppress(OSError):
                    os.chmod(parent, os.stat(parent).st_mode | 0o011)
        if not self.data.exists():
            self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", self.user, "--no-sync")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.folder / "postgres.log", "-w", "-t", "60",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.folder} -F", "start")  # fmt: skip
        with contextlib.suppress(subprocess.CalledProcessError):  # already there after a restart
            self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", self.user, self.database)
        return self

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster), by its pid file rather than pg_ctl: the server's user may
        have lost its way into the folder (pytest makes its temporary root 0700 again when another session starts)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
