"""Before `first run` starts anything, every port it needs must be free (issue 20).

A port held by an earlier stack of the same FIRST_HOME (a crash left its Prefect server or vLLM running) is told
apart from one held by anything else: the first can be stopped (``first run --replace``), the second is named,
port and process, and `first run` exits before it prints any ✓. The owner of a listening socket comes from
/proc (its inode in /proc/net/tcp, then the process whose descriptors hold it); a process is the stack's when its
environment has this FIRST_HOME, which every process of a stack inherits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class HeldPort:
    port: int
    what: str  # what the stack wanted it for
    pid: int | None  # None: a process this account cannot see
    command: str
    ours: bool  # a process of an earlier stack of this FIRST_HOME

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command})" if self.pid else "a process this account cannot see"
        if self.ours:
            return f"port {self.port} ({self.what}) is held by an earlier FIRST stack of this FIRST_HOME: {who}"
        return f"port {self.port} ({self.what}) is in use by {who}"


def in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding ``port`` fails because something holds it. With SO_REUSEADDR, as the servers bind it:
    connections of a killed stack left in TIME_WAIT do not hold it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    return inodes


def holder(port: int) -> int | None:
    """The pid of a process listening on ``port``, if this account can see it."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(entry.name)
    return None


def _command(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())[:120]
    except OSError:
        return "?"


def _of_home(pid: int, home: Path) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"FIRST_HOME={home}".encode() in environ


def check(ports: dict[str, int], home: Path) -> list[HeldPort]:
    """What holds any of ``ports`` (what it is for -> port) now."""
    held = []
    for what, port in ports.items():
        if not in_use(port):
            continue
        pid = holder(port)
        held.append(HeldPort(port, what, pid, _command(pid) if pid else "", bool(pid) and _of_home(pid, home)))
    return held


def stop_earlier_stack(held: list[HeldPort], grace_s: float = 10.0) -> None:
    """``--replace``: stop the earlier stack's processes that hold the ports (each with its process group: a vLLM
    and its workers, a Prefect server and its services), SIGTERM then SIGKILL after ``grace_s``."""
    groups = set()
    for h in held:
        if h.ours and h.pid:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(h.pid))
    groups.discard(os.getpgrp())  # never this command's own group
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(in_use(h.port) for h in held):
        time.sleep(0.2)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(in_use(h.port) for h in held):
        time.sleep(0.2)
