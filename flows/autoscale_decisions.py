"""What ``autoscale`` decides, as a pure function of the fleet's load (tested without Prefect, and replayed by
``bench/resource_sim.py`` on a simulated week).

For each model, from the instances' states (lifecycle observations) and the load every live gateway reports
(in flight, waiting for a slot, refused after waiting, median wait):

- **min_instances first**: a cluster running fewer instances of the model than its ``min_instances`` gets one
  (the always-hot tier);
- **one start at a time**: while an instance of the model starts (or waits in a batch queue), nothing else;
- **scale out** when the model is under pressure: utilization ``(in flight + waiting) / (hot instances x
  max_concurrency)`` at or above ``high``, or (while utilization is above ``low``) requests refused after waiting
  or a median wait for a slot above ``queue_ms_high`` in the last minute. The new instance goes to the model's
  cluster with the smallest expected start (new capacity soonest), then the fewest of its instances, that is out
  of maintenance and under both bounds (the cluster's ``max_instances`` for all its models, the model's own
  ``max_instances`` there). ``out_cooldown_s`` after a scale-out, no other;
- **scale in** when utilization stayed at or below ``low`` for ``scale_in_after_s`` and would stay below ``high``
  without one instance, and no scale action happened for ``in_cooldown_s``: the hot instance with the highest
  number (autoscale's newest), never below a cluster's ``min_instances``, never the model's last hot instance
  (scale to zero is scale-down-idle's, on idle time; scale from zero is a request's or predictive warm-up's).

The high/low band, the sustained-low time and the cooldowns are the hysteresis that keeps it from flapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from blocks.registry import Registry

RUNNING = ("hot", "starting", "queued")


@dataclass(frozen=True)
class Policy:
    high: float = 0.8
    low: float = 0.3
    queue_ms_high: float = 2000.0
    scale_in_after_s: float = 300.0
    out_cooldown_s: float = 120.0
    in_cooldown_s: float = 300.0


@dataclass
class InstanceLoad:
    """One instance of a model on a cluster: its state and what the gateways report of it, summed."""

    cluster: str
    replica: int
    state: str
    inflight: int = 0
    waiting: int = 0
    refused_1m: int = 0
    queue_ms_p50: float | None = None


@dataclass
class Memory:
    """What autoscale remembers of a model between runs (kept in a Prefect Variable)."""

    low_since: float | None = None
    last_out: float | None = None
    last_in: float | None = None


@dataclass
class ScaleDecision:
    model: str
    action: Literal["out", "in", "keep"]
    reason: str
    cluster: str | None = None
    replica: int | None = None
    signals: dict[str, Any] = field(default_factory=dict)

    @property
    def instance(self) -> str | None:
        """The instance the action is for, as flows name it ("m", "m@1")."""
        if self.replica is None:
            return None
        return self.model if self.replica == 0 else f"{self.model}@{self.replica}"


def decide_model(
    registry: Registry,
    model: str,
    loads: list[InstanceLoad],
    memory: Memory,
    now: float,
    policy: Policy = Policy(),
    cluster_running: dict[str, int] | None = None,
) -> ScaleDecision:
    """One model's decision (``memory`` is updated in place: the sustained-low clock, the last actions).
    ``cluster_running``: instances running on each cluster, of every model (default: this model's)."""
    spec = registry.models[model]
    clusters = [c for c in spec.clusters if c in registry.clusters]
    running = [i for i in loads if i.state in RUNNING]
    hot = [i for i in loads if i.state == "hot"]
    capacity = sum(registry.clusters[i.cluster].max_concurrency for i in hot)
    demand = sum(i.inflight + i.waiting for i in loads)
    util = demand / capacity if capacity else 0.0
    refused = sum(i.refused_1m for i in loads)
    waits = [i.queue_ms_p50 for i in hot if i.queue_ms_p50 is not None]
    wait = max(waits) if waits else None
    signals = {"hot": len(hot), "running": len(running), "utilization": round(util, 2), "in_flight+waiting": demand,
               "refused_1m": refused, "queue_ms_p50": wait}  # fmt: skip

    def decision(action: Literal["out", "in", "keep"], reason: str, cluster: str | None = None,
                 replica: int | None = None) -> ScaleDecision:  # fmt: skip
        if action == "out":
            memory.last_out, memory.low_since = now, None
        elif action == "in":
            memory.last_in, memory.low_since = now, None
        return ScaleDecision(model, action, reason, cluster, replica, signals)

    def free_replica(cluster: str) -> int:
        taken = {i.replica for i in running if i.cluster == cluster}
        return min(n for n in range(len(taken) + 1) if n not in taken)

    for c in clusters:  # the always-hot tier
        low_bound, _ = spec.instance_bounds(c)
        here = sum(1 for i in running if i.cluster == c)
        if here < low_bound:
            if registry.clusters[c].maintenance:
                return decision("keep", f"below min_instances ({here} of {low_bound}) on {c}, but it is in "
                                "maintenance")  # fmt: skip
            return decision("out", f"below min_instances on {c} ({here} of {low_bound})", c, free_replica(c))
    if any(i.state in ("starting", "queued") for i in loads):
        return decision("keep", "an instance is starting: waiting for it before deciding more")
    if not hot:
        memory.low_since = None
        return decision("keep", "cold: a request or predictive-warm-up starts it")

    pressure = []
    if util >= policy.high:
        pressure.append(f"utilization {util:.2f} >= {policy.high}")
    busy = util > policy.low  # the last minute's refusals and waits count only while the load lasts
    if refused and busy:
        pressure.append(f"{refused} request(s) refused after waiting, last minute")
    if wait is not None and wait >= policy.queue_ms_high and busy:
        pressure.append(f"median wait for a slot {wait:.0f} ms >= {policy.queue_ms_high:.0f} ms")
    if pressure:
        memory.low_since = None
        why = "; ".join(pressure)
        if memory.last_out is not None and now - memory.last_out < policy.out_cooldown_s:
            return decision("keep", f"{why}, but the last scale-out was {now - memory.last_out:.0f} s ago "
                            f"(cooldown {policy.out_cooldown_s:.0f} s)")  # fmt: skip
        bounded = []
        options = []
        for c in clusters:
            cl = registry.clusters[c]
            here = sum(1 for i in running if i.cluster == c)
            on_cluster = here if cluster_running is None else cluster_running.get(c, 0)
            _, high_bound = spec.instance_bounds(c)
            if cl.maintenance:
                bounded.append(f"{c} in maintenance")
            elif here >= high_bound:
                bounded.append(f"{c} at the model's max_instances ({high_bound})")
            elif on_cluster >= cl.max_instances:
                bounded.append(f"{c} at the cluster's max_instances ({cl.max_instances})")
            else:
                options.append((cl.expected_start_s, here, clusters.index(c), c))
        if not options:
            return decision("keep", f"{why}; wanted to scale out but every cluster is at a bound: "
                            f"{', '.join(bounded)}")  # fmt: skip
        _, _, _, target = min(options)
        return decision("out", why, target, free_replica(target))

    victim = _victim(hot, registry, spec) if util <= policy.low and len(hot) > 1 else None
    if victim is not None:
        after = demand / (capacity - registry.clusters[victim.cluster].max_concurrency)
        if after >= policy.high:
            memory.low_since = None
            return decision("keep", f"utilization {util:.2f} is low, but one instance fewer would make it {after:.2f}")
        if memory.low_since is None:
            memory.low_since = now
        low_for = now - memory.low_since
        if low_for < policy.scale_in_after_s:
            return decision("keep", f"utilization {util:.2f} <= {policy.low} for {low_for:.0f} s of "
                            f"{policy.scale_in_after_s:.0f} s")  # fmt: skip
        last = max(t for t in (memory.last_out, memory.last_in, 0.0) if t is not None)
        if now - last < policy.in_cooldown_s:
            return decision("keep", f"utilization {util:.2f} low, but the last scale action was {now - last:.0f} s "
                            f"ago (cooldown {policy.in_cooldown_s:.0f} s)")  # fmt: skip
        return decision("in", f"utilization {util:.2f} <= {policy.low} for {low_for:.0f} s", victim.cluster,
                        victim.replica)  # fmt: skip
    memory.low_since = None
    if util <= policy.low and len(hot) > 1:
        return decision("keep", f"utilization {util:.2f} low, but every hot instance is within min_instances")
    if util <= policy.low:
        return decision("keep", f"utilization {util:.2f} low on its one hot instance (scale-down-idle stops it "
                        "once idle)")  # fmt: skip
    return decision("keep", f"utilization {util:.2f} within [{policy.low}, {policy.high})")


def _victim(hot: list[InstanceLoad], registry: Registry, spec: Any) -> InstanceLoad | None:
    """The instance scale-in retires: the highest-numbered hot one with the least in flight, not one its
    cluster's min_instances keeps (``None`` if all are kept)."""
    ordered = sorted(hot, key=lambda i: (-i.replica, i.inflight, -registry.clusters[i.cluster].expected_start_s))
    for inst in ordered:
        low_bound, _ = spec.instance_bounds(inst.cluster)
        if sum(1 for i in hot if i.cluster == inst.cluster) > low_bound:
            return inst
    return None
