"""`first run` checks its ports before it starts anything (issue 20): who holds one, whether it is an earlier stack
of the same FIRST_HOME, and `--replace` stopping that one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from core.settings import Settings
from first import preflight
from first.runner import Runner, free_port_block


def _listen() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_a_port_held_by_another_program_is_named_with_its_process(tmp_path: Path) -> None:
    sock, port = _listen()
    with sock:
        free = free_port_block(1)
        held = preflight.check({"gateway": port, "Prefect server": free}, tmp_path / "home")
    assert len(held) == 1
    h = held[0]
    assert h.port == port and h.pid == os.getpid() and not h.ours
    assert f"port {port} (gateway) is in use by pid {os.getpid()}" in h.describe() and "pytest" in h.describe()


def test_connections_a_killed_server_left_in_time_wait_do_not_hold_its_port() -> None:
    """After a crash under load the servers' ports have connections in TIME_WAIT; the servers rebind them (with
    SO_REUSEADDR), so the check must not call them taken."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's, Prefect's and vLLM's are
    listener.bind(("127.0.0.1", free_port_block(1)))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server's side closes first: its end (port `port`) waits in TIME_WAIT
    client.close()
    listener.close()
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))
        plain_bind_fails = False
    except OSError:
        plain_bind_fails = True
    finally:
        plain.close()
    assert plain_bind_fails  # what the check saw before it set SO_REUSEADDR
    assert not preflight.in_use(port)


def test_an_earlier_stack_of_this_home_is_told_apart_and_replace_stops_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port_block(1)
    code = (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
            "print(1, flush=True); time.sleep(600)")  # fmt: skip
    earlier = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "FIRST_HOME": str(home)},
                               stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        assert earlier.stdout is not None and earlier.stdout.readline().strip() == b"1"
        held = preflight.check({"Prefect server": port}, home)
        assert len(held) == 1 and held[0].ours and held[0].pid == earlier.pid
        assert "earlier FIRST stack of this FIRST_HOME" in held[0].describe()
        assert not preflight.check({"Prefect server": port}, tmp_path / "another-home")[0].ours
        preflight.stop_earlier_stack(held, grace_s=5)
        assert earlier.wait(10) is not None and not preflight.in_use(port)
    finally:
        earlier.kill()


def test_first_run_exits_before_starting_anything_when_a_port_is_taken(tmp_path: Path, capsys) -> None:
    sock, port = _listen()
    with sock:
        runner = Runner(Settings(home=tmp_path / "home", port=port, vllm_port_base=free_port_block(2)),
                        prefect_port=free_port_block(1))  # fmt: skip
        assert runner.preflight() is False
    said = capsys.readouterr()
    text = said.out + said.err
    assert f"port {port} (gateway) is in use by pid {os.getpid()}" in text and "FIRST_PORT" in text
    assert "✓" not in text and runner.procs == []  # nothing was started
