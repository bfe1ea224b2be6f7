"""What a gateway takes from the control plane: lifecycle observations (Prefect Variables anyone with API access
can write) are adopted only when they are plausible, and the gateway's state stays its owner's."""

from __future__ import annotations

import stat
import time

import pytest

from blocks.registry import ClusterModelArgs, ClusterSpec, ModelSpec
from core.settings import Settings
from serving.bus import Observation
from serving.live_state import LiveState, allowed_base_url

LOCAL = ClusterSpec(name="local", transport="local")
HTTP = ClusterSpec(name="site", transport="http", base_url="https://llm.site.example.org/v1/")
REMOTE = ClusterSpec(name="polaris", transport="globus-compute", endpoint_id="00000000-0000-0000-0000-000000000000")
MODEL = ModelSpec(name="m", clusters=["local", "site", "polaris"], path="-", port=8100,
                  per_cluster={"polaris": ClusterModelArgs(port=8200)})  # fmt: skip


@pytest.mark.parametrize(
    ("cluster", "url", "ok"),
    [
        (LOCAL, "http://127.0.0.1:8100", True),
        (LOCAL, "http://localhost:8100/", True),
        (LOCAL, "http://127.0.0.1:9999", False),  # another port: someone else's server
        (LOCAL, "http://evil.example.org:8100", False),
        (LOCAL, "http://user:pw@127.0.0.1:8100", False),
        (HTTP, "https://llm.site.example.org/v1", True),
        (HTTP, "https://evil.example.org/v1", False),
        (REMOTE, "http://x3004c0s7b0n0:8200", True),  # whatever node the batch job got, on the model's port
        (REMOTE, "http://x3004c0s7b0n0:8100", False),
        (REMOTE, "ftp://x3004c0s7b0n0:8200", False),
        (REMOTE, "http://[::1", False),
    ],
)
def test_a_server_url_is_adopted_only_where_the_cluster_spec_allows_it(cluster, url, ok) -> None:
    assert allowed_base_url(cluster, MODEL, url) is ok


class BackendsDouble:
    """LiveState.adopt never calls a backend; this stands in for Backends, which would build executors."""


def test_forged_observations_are_ignored(tmp_path) -> None:
    live = LiveState(BackendsDouble(), Settings(home=tmp_path))  # type: ignore[arg-type]
    clusters, models = {"local": LOCAL}, {"m": MODEL}
    hijack = Observation(cluster="local", model="m", state="hot", base_url="http://attacker.example.org:8100")
    assert not live.adopt(hijack, clusters, models)
    future = Observation(cluster="local", model="m", state="hot", base_url="http://127.0.0.1:8100",
                         ts=time.time() + 3600)  # fmt: skip
    assert not live.adopt(future, clusters, models)  # it would have shadowed every genuine observation after it
    assert live.instance(LOCAL, MODEL).state == "unknown"
    genuine = Observation(cluster="local", model="m", state="hot", base_url="http://127.0.0.1:8100")
    assert live.adopt(genuine, clusters, models)
    assert (live.instance(LOCAL, MODEL).state, live.instance(LOCAL, MODEL).base_url) == ("hot", genuine.base_url)


def test_the_state_folder_is_private(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    Settings(home=home).make_home()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
