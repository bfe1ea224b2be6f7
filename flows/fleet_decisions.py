"""What the lifecycle flows decide, as small pure functions tested without Prefect (which cluster is best, what is
idle, when a drain is complete), and the markdown their artifacts are made of."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocks.registry import ClusterSpec, ModelSpec, Registry
from serving.bus import GatewayReport, Observation

QUEUED_FRESH_S = 90.0  # a "queued" observation not renewed for this long is stale (its warm-up is gone)


# ---- decisions (pure: no Prefect, no I/O) ----


def pick_best_cluster(
    spec: ModelSpec, registry: Registry, observations: Iterable[Observation], now: float | None = None
) -> tuple[str, str]:
    """Where a warm-up with cluster "best" goes: ``(cluster, why)``.

    Among the model's clusters that are declared and not in maintenance: one where it is already hot, else one
    where it is starting or queued (a fresh observation), else the one with the smallest ``expected_start_s``
    (one whose last observation is "failed" only if nothing else is left). Ties go to the model's cluster order.
    Raises ``ValueError`` when every cluster of the model is in maintenance or undeclared.
    """
    now = time.time() if now is None else now
    candidates = [c for c in spec.clusters if c in registry.clusters and not registry.clusters[c].maintenance]
    if not candidates:
        raise ValueError(
            f"model {spec.name!r} has no cluster to run on: its clusters {spec.clusters} are in maintenance or "
            "undeclared"
        )
    seen = {o.cluster: o for o in observations if o.model == spec.name and o.cluster in candidates}
    for state in ("hot", "starting", "queued"):
        for c in candidates:
            o = seen.get(c)
            if o is not None and o.state == state and (state != "queued" or now - o.ts <= QUEUED_FRESH_S):
                return c, f"already {state} there"
    best = min(
        candidates,
        key=lambda c: (getattr(seen.get(c), "state", None) == "failed", registry.clusters[c].expected_start_s),
    )
    return best, f"smallest expected start ({registry.clusters[best].expected_start_s:g} s) out of maintenance"


def observed_state(status_state: str, previous: Observation | None, cluster: ClusterSpec, now: float) -> str:
    """The state to publish for what a status check saw. The check wins (a local "cold" replaces a stale
    "starting"), except on a batch cluster while a warm-up still renews its "queued": the vLLM process does not
    exist until the batch job runs, so "cold" is exactly what queued looks like from outside. An instance that
    autoscale is retiring stays "draining" while it is still up."""
    if status_state == "hot" and previous is not None and previous.state == "draining":
        return "draining"
    if (
        status_state == "cold"
        and previous is not None
        and previous.state == "queued"
        and cluster.scheduler != "none"
        and now - previous.ts <= QUEUED_FRESH_S
    ):
        return "queued"
    return status_state


@dataclass
class IdleDecision:
    cluster: str
    model: str
    idle_s: float | None
    limit_s: int
    inflight: int
    reference: str  # what idle_s counts from
    stop: bool
    action: str


def idle_decision(
    cluster: str,
    model: str,
    limit_s: int,
    reports: Iterable[GatewayReport],
    observed_since: float | None,
    now: float,
) -> IdleDecision:
    """Should scale-down-idle stop ``model`` on ``cluster`` (known to be hot)?

    Idle time counts from the latest request any live gateway reports (``last_used``); else from when a gateway
    saw it become hot (``hot_since``); else from when a lifecycle run saw it become hot (``observed_since``).
    If a gateway saw it become hot after its last request (a restart), from then. In-flight requests are summed
    over the gateways; any keeps it. ``limit_s`` 0 means never.
    """
    key = f"{cluster}/{model}"
    uses = [r.instances[key] for r in reports if key in r.instances]
    inflight = sum(u.inflight for u in uses)
    last_used = max((u.last_used for u in uses if u.last_used), default=None)
    hot_since = max((u.hot_since for u in uses if u.hot_since), default=None)
    if last_used is not None and (hot_since is None or last_used >= hot_since):
        ref, reference = last_used, "last request"
    elif hot_since is not None:
        ref, reference = hot_since, "hot since (gateway)"
    elif observed_since is not None:
        ref, reference = observed_since, "hot since (observed)"
    else:
        ref, reference = None, "unknown"
    idle_s = None if ref is None else max(0.0, now - ref)

    def decide(stop: bool, action: str) -> IdleDecision:
        return IdleDecision(cluster, model, idle_s, limit_s, inflight, reference, stop, action)

    if limit_s == 0:
        return decide(False, "keep: idle_timeout_s is 0 (never scaled down)")
    if inflight > 0:
        return decide(False, f"keep: {inflight} request(s) in flight")
    if idle_s is None:
        return decide(False, "keep: no idle reference")
    if idle_s <= limit_s:
        return decide(False, f"keep: idle {idle_s:.0f} s of {limit_s} s")
    return decide(True, "stop")


def drain_progress(reports: Iterable[GatewayReport], cluster: str) -> tuple[list[str], int]:
    """``(gateways that still route to the cluster, requests in flight on it)`` from live gateway reports."""
    reports = list(reports)
    waiting = [r.gateway for r in reports if cluster not in r.maintenance]
    inflight = sum(u.inflight for r in reports for key, u in r.instances.items() if key.partition("/")[0] == cluster)
    return waiting, inflight


# ---- helpers ----


def utc(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes)."""
    raw = "-".join(parts).lower()
    return "-".join(p for p in "".join(c if c.isalnum() else "-" for c in raw).split("-") if p)


def cell(value: Any, width: int = 80) -> str:
    """One markdown table cell."""
    if value is None or value == "":
        return "-"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def short(detail: Any, width: int = 500) -> str | None:
    if not detail:
        return None
    text = str(detail)
    return text if len(text) <= width else "…" + text[-width:]


def md_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
