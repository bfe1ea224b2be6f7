"""Every script in examples/ runs, as a new user runs it, against a real `make run` (issue 19: examples that run
in CI do not rot). Each is a subprocess with only what the user would set: OPENAI_BASE_URL, OPENAI_API_KEY and
FIRST_HOME (where `make run` wrote its Prefect address and password)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import REPO_ROOT
from tests.e2e.conftest import start_make_run

pytestmark = pytest.mark.e2e

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("examples-home")
    make, ready, run_env = start_make_run(home)
    try:
        yield {**run_env, "OPENAI_BASE_URL": ready["base_url"], "OPENAI_API_KEY": ready["api_key"]}
    finally:
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=120)


def example(env: dict[str, str], *argv: str, timeout: float = 300) -> str:
    cmd = [sys.executable, str(EXAMPLES / argv[0]), *argv[1:]] if argv[0].endswith(".py") else [
        str(EXAMPLES / argv[0]), *argv[1:]]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv[0]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_every_example_is_run_here():
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    tested = {name for name in re.findall(r'example\(env, "([\w.]+)"', Path(__file__).read_text())}
    assert scripts == tested


def test_openai_chat(env):
    out = example(env, "openai_chat.py")
    assert re.search(r"^chat: .* CompletionUsage\(completion_tokens=\d+", out, re.M), out
    assert re.search(r"^stream: \d+ chunks:", out, re.M) and "completion: " in out
    assert re.search(r"^served by: local request id: [0-9a-f]{32}$", out, re.M), out


def test_langchain_chat(env):
    out = example(env, "langchain_chat.py")
    assert out.startswith("invoke: ") and "'total_tokens':" in out
    assert re.search(r"^embed: 2 vectors of 128 dimensions$", out, re.M), out


def test_async_many(env):
    out = example(env, "async_many.py", "16", "4")
    assert re.search(r"^16 requests, 4 at a time: [\d.]+ s, [\d.]+ requests/s, median \d+ ms", out, re.M), out


def test_usage_polars(env):
    out = example(env, "usage_polars.py", "1d")
    assert "by-model since 1d:" in out and "daily since 1d:" in out


def test_prefect_warm_up(env):
    out = example(env, "prefect_warm_up.py", "tiny", "best", timeout=600)
    assert re.search(r"^flow run [\w-]+: Completed$", out, re.M), out
    assert "tiny: {'local': 'hot'}" in out


def test_apply_fleet(env):
    """Last: it adds clusters and models to this stack's registry (tiny stays as it was)."""
    out = example(env, "apply_fleet.sh")
    assert "clusters: hosted, local, polaris" in out and "llama-3-8b" in out and "projects: astro" in out
    shown = subprocess.run([str(Path(sys.executable).parent / "first"), "registry", "show"], env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(shown)["models"]["llama-3-8b"]["limits"] == {"rpm": 60, "tpm": 200000}
