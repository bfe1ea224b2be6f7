"""`make run` answers the openai client, and Ctrl-C (SIGINT) leaves no process behind, vLLM included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import REPO_ROOT, processes_of, start_make_run

pytestmark = pytest.mark.e2e


def test_make_run_serves_then_ctrl_c_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    t0 = time.monotonic()
    make, ready, env = start_make_run(home)
    try:
        started_in = time.monotonic() - t0
        c = openai.OpenAI(base_url=ready["base_url"], api_key=ready["api_key"], max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens == 4
        # Around the gateway there is no way in: vLLM wants its own key, Prefect's API its password.
        state = json.loads(next((home / "instances").glob("*/*.json")).read_text())
        assert home.stat().st_mode & 0o777 == 0o700
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(state["base_url"] + "/v1/chat/completions", json=chat, timeout=30).status_code == 401
        prefect_api = ready["prefect_ui"] + "/api"
        write = httpx.post(prefect_api + "/variables/", json={"name": "first_state__x", "value": {}}, timeout=30)
        assert write.status_code == 401
        auth = (home / "prefect-api-auth").read_text().strip()
        assert (home / "prefect-api-auth").stat().st_mode & 0o777 == 0o600
        user, _, password = auth.partition(":")
        ok = httpx.post(prefect_api + "/variables/filter", json={}, auth=(user, password), timeout=30)
        assert ok.status_code == 200
        # The owner's `first` commands in another shell find the running server and its password by themselves.
        shown = subprocess.run([str(REPO_ROOT / ".venv/bin/first"), "registry", "show"], env=env, cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert shown.returncode == 0 and "tiny" in shown.stdout, shown.stderr[-2000:]
        # A second `make run` on the same ports says who holds them, before it starts anything (issue 20): this
        # stack's own processes for the same FIRST_HOME, someone else's for another.
        prefect_port = ready["prefect_ui"].rsplit(":", 1)[1]
        for other_home, expected in ((home, "earlier FIRST stack of this FIRST_HOME"), (tmp_path / "b", "in use by")):
            again = subprocess.run([str(REPO_ROOT / ".venv/bin/first"), "run", "--prefect-port", prefect_port],
                                   env={**env, "FIRST_HOME": str(other_home)}, cwd=REPO_ROOT, capture_output=True,
                                   text=True, timeout=120)  # fmt: skip
            said = again.stdout + again.stderr
            assert again.returncode == 2 and expected in said and "✓" not in said, said[-2000:]
            assert f"port {prefect_port} (Prefect server)" in said and "port " + env["FIRST_PORT"] in said
        before = processes_of(home)
        vllm = [json.loads(p.read_text())["pid"] for p in (home / "instances").glob("*/*.json")]
        assert vllm and all(pid in before for pid in vllm), (vllm, before)
        assert len(before) >= 5  # runner, Prefect server, worker, gateway, local endpoint, vLLM and its workers
    finally:
        stopping = time.monotonic()
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the foreground group
        make.wait(timeout=120)
        stopped_in = time.monotonic() - stopping
    deadline = time.monotonic() + 10
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"processes left after Ctrl-C: {left}"
    assert stopped_in < 10, f"Ctrl-C took {stopped_in:.1f} s (the bound is 10 s with a hot model)"
    print(f"make run was ready in {started_in:.0f} s with the setup already done; Ctrl-C stopped it in "
          f"{stopped_in:.1f} s")  # fmt: skip
