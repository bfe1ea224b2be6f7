"""Prometheus metrics of the fleet, read from the gateway's live state when scraped (no cost per request)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from serving.limits import FailedAuthThrottle
from serving.live_state import STATES, LiveState
from serving.replicas.store import SharedStore
from serving.request import ControlPlane


class FleetCollector:
    """One sample per model instance (model, cluster) and per cluster, made at scrape time."""

    def __init__(
        self,
        live: LiveState,
        throttle: FailedAuthThrottle | None = None,
        shared: SharedStore | None = None,
        control: ControlPlane | None = None,
    ) -> None:
        self.live = live
        self.throttle = throttle
        self.shared = shared
        self.control = control

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        labels = ["model", "cluster"]
        state = GaugeMetricFamily(
            "first_instance_state", "1 for the state a model instance is in", labels=[*labels, "state"]
        )
        inflight = GaugeMetricFamily("first_instance_inflight", "Requests running on the instance", labels=labels)
        p50 = GaugeMetricFamily("first_instance_latency_p50_ms", "Median latency, last 5 minutes", labels=labels)
        requests = CounterMetricFamily("first_instance_requests", "Requests that ran on the instance", labels=labels)
        errors = CounterMetricFamily("first_instance_errors", "Requests the cluster failed", labels=labels)
        warm_ups = CounterMetricFamily("first_instance_warm_ups", "Warm-ups this gateway started", labels=labels)
        instance_breaker = GaugeMetricFamily(
            "first_instance_breaker_open",
            "1 while the model's server on the cluster is closed off (its breaker)",
            labels=labels,
        )
        waiting = GaugeMetricFamily("first_instance_waiting", "Requests waiting in the instance's fair queue (it is "
                                    "full)", labels=labels)  # fmt: skip
        queue_timeouts = CounterMetricFamily("first_instance_queue_timeouts", "Requests refused after waiting their "
                                             "bound in the instance's fair queue", labels=labels)  # fmt: skip
        for inst in self.live.all():
            key = [inst.model.name, inst.cluster.name]
            waiting.add_metric(key, inst.admission.queued if inst.admission else 0)
            queue_timeouts.add_metric(key, inst.admission.timeouts if inst.admission else 0)
            shown = inst.shown_state
            for s in STATES:
                state.add_metric([*key, s], 1.0 if shown == s else 0.0)
            inflight.add_metric(key, inst.inflight)
            recent = inst.recent(now)
            if recent["latency_ms_p50"] is not None:
                p50.add_metric(key, recent["latency_ms_p50"])
            requests.add_metric(key, inst.requests)
            errors.add_metric(key, inst.errors)
            warm_ups.add_metric(key, inst.warm_ups)
            instance_breaker.add_metric(key, 1.0 if inst.breaker and inst.breaker.state(now) == "open" else 0.0)
        breaker = GaugeMetricFamily("first_cluster_breaker_open", "1 while the cluster's circuit breaker is open",
                                    labels=["cluster"])  # fmt: skip
        opened = CounterMetricFamily("first_cluster_breaker_opened", "Times the breaker opened", labels=["cluster"])
        for name, b in self.live.breakers.items():
            breaker.add_metric([name], 1.0 if b.state(now) == "open" else 0.0)
            opened.add_metric([name], b.opened)
        failovers = CounterMetricFamily("first_failovers", "Requests moved to another cluster before their first byte")
        failovers.add_metric([], self.live.failovers)
        audit = CounterMetricFamily("first_audit_write_failures", "Audit-mode entries that could not be written")
        audit.add_metric([], self.live.audit_failures)
        try:  # leaks show here first (the soak bench reads it): tasks that outlive their request
            tasks = GaugeMetricFamily("first_gateway_asyncio_tasks", "asyncio tasks alive in the gateway's event loop")
            tasks.add_metric([], len(asyncio.all_tasks()))
            yield tasks
        except RuntimeError:  # scraped from outside the event loop
            pass
        if self.throttle is not None:
            failures = CounterMetricFamily("first_auth_failures", "Requests refused 401 (no or a wrong credential)")
            failures.add_metric([], self.throttle.failures)
            throttled = CounterMetricFamily(
                "first_auth_throttled", "Requests refused 429: their address failed authentication too often lately"
            )
            throttled.add_metric([], self.throttle.refused)
            yield from (failures, throttled)
        if self.shared is not None:
            up = GaugeMetricFamily("first_redis_up", "1 while the replicas' Redis answers (0: degraded, own state)")
            up.add_metric([], 1.0 if self.shared.up else 0.0)
            redis_errors = CounterMetricFamily("first_redis_errors", "Redis calls that failed or timed out")
            redis_errors.add_metric([], self.shared.errors)
            fallbacks = CounterMetricFamily(
                "first_redis_fallbacks", "Times this replica used its own state because Redis was down"
            )
            fallbacks.add_metric([], self.shared.fallbacks)
            yield from (up, redis_errors, fallbacks)
        yield from self._events()
        yield from (
            state,
            inflight,
            p50,
            requests,
            errors,
            warm_ups,
            instance_breaker,
            waiting,
            queue_timeouts,
            breaker,
            opened,
            failovers,
            audit,
        )

    def _events(self) -> Iterator[Metric]:
        """What became of the inference events (flows/inference_events.py): nothing lost uncounted."""
        stats = self.control.stats() if self.control is not None else None
        counts = (stats or {}).get("events")
        if not counts:
            return
        sent = CounterMetricFamily(
            "first_inference_events",
            "Inference events sent to Prefect (those lost are in ..._lost too)",
            labels=["kind"],
        )
        sent.add_metric(["request"], counts["individual"])
        sent.add_metric(["summary"], counts["summaries"])
        folded = CounterMetricFamily(
            "first_inference_events_summarised_requests", "Requests over the event budget, counted in summary events"
        )
        folded.add_metric([], counts["summarised"])
        lost = CounterMetricFamily(
            "first_inference_events_lost", "Inference events that did not reach Prefect, by why", labels=["reason"]
        )
        for reason in ("dropped_queue_full", "dropped_post_failed", "not_stored"):
            lost.add_metric([reason.removeprefix("dropped_")], counts[reason])
        budget = GaugeMetricFamily("first_inference_event_budget", "Events a second posted one per request now")
        budget.add_metric([], counts["budget_per_s"])
        yield from (sent, folded, lost, budget)


def metrics_registry(
    live: LiveState,
    throttle: FailedAuthThrottle | None = None,
    shared: SharedStore | None = None,
    control: ControlPlane | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(live, throttle, shared, control))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> Any:
    return generate_latest(registry)
