"""Inference events (issue 21): one per request within the budget, summaries above it, failures, cold starts and
slow requests always individual, and every event that does not reach Prefect counted. The Prefect server's side
is a list that takes the posts (``events_posted_double``) and a number for its stored count: the budget's logic
without a server; tests/e2e/test_inference_events_e2e.py runs it against a real one."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from flows.inference_events import COMPLETED, FAILED, SETTLE_S, SUMMARY, InferenceEvents, Observed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seen(n: int, **kw: Any) -> Observed:
    fields: dict[str, Any] = {
        "request_id": f"r{n}", "endpoint": "chat.completions", "model": "m", "cluster": "c", "user": "alice",
        "groups": ["lab"], "status": 200, "error_type": None, "error_code": None, "error": None, "prompt_tokens": 5,
        "completion_tokens": 7, "latency_ms": 100.0 + n, "ttft_ms": 20.0, "cold_start": False, "tried": ["c"],
        "stream": False, "batch_id": None,
    }  # fmt: skip
    return Observed(**{**fields, **kw})


@pytest.fixture
def events_posted_double() -> list[dict[str, Any]]:
    return []


def emitter(posted: list[dict[str, Any]], clock: Clock, budget: float = 5, stored: list[int] | None = None):
    return InferenceEvents(
        "http://prefect.invalid/api", "gw-1", budget_per_s=budget, summary_s=10, slow_s=30, clock=clock,
        start_thread=False, post=posted.extend, count_stored=lambda: (stored or [0])[0],
    )  # fmt: skip


def test_within_the_budget_each_request_is_an_event_with_its_related_resources(events_posted_double) -> None:
    clock = Clock()
    ev = emitter(events_posted_double, clock)
    for n in range(3):
        ev.observe(seen(n))
    assert ev.flush() == 3
    first = events_posted_double[0]
    assert first["event"] == COMPLETED and first["id"] != events_posted_double[1]["id"]
    assert first["resource"] == {"prefect.resource.id": "first.request.r0", "first.gateway": "gw-1",
                                 "prefect.resource.name": "chat.completions m", "first.error_class": "none",
                                 "first.cold_start": "false"}  # fmt: skip
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in first["related"]}
    assert roles == {"model": "first.model.m", "cluster": "first.cluster.c", "user": "first.user.alice",
                     "group": "first.group.lab", "gateway": "first.gateway.gw-1"}  # fmt: skip
    assert first["payload"] | {"latency_ms": 0} == {
        "status": 200, "endpoint": "chat.completions", "stream": False, "prompt_tokens": 5, "completion_tokens": 7,
        "latency_ms": 0, "ttft_ms": 20.0, "cold_start": False, "tried": ["c"], "error_type": None, "error_code": None,
        "error": None, "batch_id": None,
    }  # fmt: skip
    assert ev.counts.individual == 3 and ev.counts.summarised == 0


def test_above_the_budget_requests_fold_into_a_summary_but_failures_cold_starts_and_slow_ones_do_not(
    events_posted_double,
) -> None:
    clock = Clock()
    ev = emitter(events_posted_double, clock, budget=5)
    for n in range(20):
        ev.observe(seen(n))
    ev.observe(seen(100, status=502, error_type="bad_gateway", error="the model server failed"))
    ev.observe(seen(101, cold_start=True))
    ev.observe(seen(102, latency_ms=45_000.0))
    ev.flush()
    individual = [e for e in events_posted_double if e["event"] != SUMMARY]
    assert len(individual) == 5 + 3  # the budget's worth, and the three that always stay individual
    assert {e["resource"]["prefect.resource.id"] for e in individual} >= {
        "first.request.r100", "first.request.r101", "first.request.r102"}  # fmt: skip
    assert [e["event"] for e in individual if e["payload"]["status"] == 502] == [FAILED]
    assert ev.counts.summarised == 15 and not any(e["event"] == SUMMARY for e in events_posted_double)
    clock.now += 10  # the summary's interval is over
    ev.flush()
    (summary,) = [e for e in events_posted_double if e["event"] == SUMMARY]
    p = summary["payload"]
    assert p["requests"] == 15 and p["by_status"] == {"200": 15} and p["users"] == 1
    assert (p["prompt_tokens"], p["completion_tokens"]) == (15 * 5, 15 * 7)
    assert p["latency_ms_p50"] is not None and p["latency_ms_p95"] >= p["latency_ms_p50"]
    assert summary["resource"]["prefect.resource.id"] == "first.summary.gw-1.m.c"
    assert {r["prefect.resource.role"] for r in summary["related"]} == {"model", "cluster", "gateway"}


def test_the_budget_refills_with_time(events_posted_double) -> None:
    clock = Clock()
    ev = emitter(events_posted_double, clock, budget=5)
    for n in range(10):
        ev.observe(seen(n))
    ev.flush()
    clock.now += 1.0  # one second more: five more individual events
    for n in range(10, 20):
        ev.observe(seen(n))
    ev.flush()
    assert ev.counts.individual == 10 and ev.counts.summarised == 10


def test_a_failed_post_is_counted_not_retried_for_ever(events_posted_double) -> None:
    def prefect_down_double(batch: list[dict[str, Any]]) -> None:
        raise httpx.ConnectError("connection refused")

    ev = InferenceEvents("http://prefect.invalid/api", "gw-1", budget_per_s=5, summary_s=10, slow_s=30, clock=Clock(),
                         start_thread=False, post=prefect_down_double, count_stored=lambda: 0)  # fmt: skip
    ev.observe(seen(1))
    assert ev.flush() == 0 and ev.counts.dropped_post_failed == 1


def test_events_the_server_did_not_store_are_counted_and_the_budget_halves_until_it_keeps_up(
    events_posted_double,
) -> None:
    clock, stored = Clock(), [0]
    ev = emitter(events_posted_double, clock, budget=8, stored=stored)
    for n in range(8):
        ev.observe(seen(n))
    ev.flush()
    clock.now += SETTLE_S + 1
    stored[0] = 6  # the server's queue dropped two
    assert ev.check_stored() == 2
    assert ev.counts.not_stored == 2 and ev.budget == 4 and ev.counts.budget_per_s == 4
    assert ev.check_stored() == 0 and ev.budget == 8  # nothing more missing: back to the configured budget


def test_close_posts_what_is_left_summaries_included(events_posted_double) -> None:
    clock = Clock()
    ev = emitter(events_posted_double, clock, budget=1)
    for n in range(4):
        ev.observe(seen(n))
    ev.close()
    assert [e["event"] for e in events_posted_double] == [COMPLETED, SUMMARY]
    assert events_posted_double[1]["payload"]["requests"] == 3
