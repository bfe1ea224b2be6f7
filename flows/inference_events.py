"""Every inference as a Prefect event (issue 21), within a rate budget the Prefect server keeps up with.

The serving side hands each finished request's outcome to ``InferenceEvents.observe``: a few field reads and a
deque append, no I/O. A thread of its own, once a second, turns the outcomes into events and posts them in
batches to the Prefect server's ``POST /api/events``:

- ``first.inference.completed`` / ``first.inference.failed``: the request is the resource
  (``first.request.<id>``); the model, cluster, user, groups and gateway are related resources; status, tokens,
  latency, time to first token, cold start and the clusters tried are the payload. The Event Feed filters on any
  of them, and automations trigger on them.
- Above the budget (``FIRST_EVENT_BUDGET_PER_S`` events a second, a token bucket) a successful, warm, fast
  request is folded into ``first.inference.summary``: one event per model and cluster every
  ``FIRST_EVENT_SUMMARY_S``, with counts per status, token sums and latency percentiles. Failures, cold starts
  and requests slower than ``FIRST_EVENT_SLOW_S`` always stay individual.
- Nothing is dropped uncounted: a full queue, a post that failed, and events the server did not store (its own
  queue drops silently past 10,000 messages, so every ``CHECK_EVERY_S`` the events stored under this gateway's
  label are counted on the server and compared with those posted) are counters on ``/metrics`` and ``/health``.
  When the server falls behind, the budget halves until it keeps up again.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("first.events")

COMPLETED, FAILED, SUMMARY = "first.inference.completed", "first.inference.failed", "first.inference.summary"
FLUSH_EVERY_S = 1.0
POST_BATCH = 200  # events per POST /api/events
CHECK_EVERY_S = 30.0  # how often the server's stored count is compared with what was posted
SETTLE_S = 15.0  # the server writes events within its 5 s interval; only posts older than this are checked
QUEUE_LIMIT = 50_000
WARN_EVERY_S = 60.0


def request_resource(request_id: str) -> str:
    """The resource id of a request's event: what the Event Feed filters on, and what a recorded run names."""
    return f"first.request.{request_id}"


@dataclass
class Observed:
    """What the serving side hands over per request: plain values, read once on the serving loop."""

    request_id: str
    endpoint: str
    model: str
    cluster: str | None
    user: str
    groups: list[str]
    status: int
    error_type: str | None
    error_code: str | None
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    cold_start: bool
    tried: list[str]
    stream: bool
    batch_id: str | None
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class _Summary:
    started: dt.datetime
    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    users: set[str] = field(default_factory=set)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


@dataclass
class EventCounts:
    """What happened to the requests' events, for /metrics and /health."""

    observed: int = 0
    individual: int = 0  # events posted for one request each
    summarised: int = 0  # requests folded into summary events
    summaries: int = 0  # summary events posted
    dropped_queue_full: int = 0
    dropped_post_failed: int = 0
    not_stored: int = 0  # posted, but not found on the server after SETTLE_S
    budget_per_s: float = 0.0  # the budget in force now (halved while the server falls behind)

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


class InferenceEvents:
    """The gateway's side: ``observe`` on the serving loop, a thread that budgets, summarises and posts."""

    def __init__(
        self,
        api_url: str,
        gateway: str,
        budget_per_s: float,
        summary_s: float,
        slow_s: float,
        auth: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_thread: bool = True,
        post: Callable[[list[dict[str, Any]]], None] | None = None,
        count_stored: Callable[[], int] | None = None,
    ) -> None:
        """``post`` and ``count_stored`` are the Prefect server's ``POST /api/events`` and its count of this
        gateway's stored events (by default over HTTP at ``api_url``); ``clock`` paces the budget."""
        self.api_url = api_url.rstrip("/")
        self.gateway = gateway
        self.budget = self.configured_budget = budget_per_s
        self.summary_s = summary_s
        self.slow_ms = slow_s * 1000
        self.clock = clock
        self.counts = EventCounts(budget_per_s=budget_per_s)
        self._queue: collections.deque[Observed] = collections.deque()
        self._tokens = budget_per_s  # the bucket holds one second of budget
        self._refilled = clock()
        self._summaries: dict[tuple[str, str], _Summary] = {}
        self._summary_started = clock()
        self._posted: list[tuple[float, int]] = []  # (when, how many): posts younger than SETTLE_S
        self._warned = -WARN_EVERY_S
        self._settled = 0  # events posted at least SETTLE_S ago, which the server must have stored by now
        self._last_check = clock()
        self._since = dt.datetime.now(dt.UTC)
        self._stop = threading.Event()
        self._http = httpx.Client(base_url=self.api_url, auth=auth, timeout=10)
        self._post_batch = post or self._http_post
        self._count_stored = count_stored or self._stored_count
        self._thread = threading.Thread(target=self._run, daemon=True, name="first-inference-events")
        if start_thread:
            self._thread.start()

    @classmethod
    def from_environment(cls, gateway: str, budget_per_s: float, summary_s: float, slow_s: float) -> InferenceEvents:
        user, _, password = os.environ.get("PREFECT_API_AUTH_STRING", "").partition(":")
        return cls(os.environ["PREFECT_API_URL"], gateway, budget_per_s, summary_s, slow_s,
                   auth=(user, password) if user else None)  # fmt: skip

    # ---- the serving loop's side ----

    def observe(self, seen: Observed) -> None:
        self.counts.observed += 1
        if len(self._queue) >= QUEUE_LIMIT:
            self.counts.dropped_queue_full += 1
            return
        self._queue.append(seen)

    # ---- the thread ----

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            self.flush()
            if self.clock() - self._last_check >= CHECK_EVERY_S:
                with contextlib.suppress(Exception):
                    self.check_stored()

    def flush(self, final: bool = False) -> int:
        """Turn what was observed into events and post them; summaries when their interval is over (or
        ``final``). Returns how many events were posted."""
        now = self.clock()
        self._tokens = min(self.budget, self._tokens + (now - self._refilled) * self.budget)
        self._refilled = now
        events = []
        while self._queue:
            seen = self._queue.popleft()
            must = seen.status >= 400 or seen.cold_start or seen.latency_ms >= self.slow_ms
            if must or self._tokens >= 1:
                self._tokens -= 1
                events.append(self.request_event(seen))
                self.counts.individual += 1
            else:
                self._fold(seen)
        if final or now - self._summary_started >= self.summary_s:
            events += self._summary_events(now)
        return self._post(events)

    def _fold(self, seen: Observed) -> None:
        key = (seen.model, seen.cluster or "-")
        s = self._summaries.get(key)
        if s is None:
            s = self._summaries[key] = _Summary(started=seen.at)
        s.requests += 1
        s.by_status[seen.status] += 1
        s.users.add(seen.user)
        s.prompt_tokens += seen.prompt_tokens
        s.completion_tokens += seen.completion_tokens
        s.latencies.append(seen.latency_ms)
        if seen.ttft_ms is not None:
            s.ttfts.append(seen.ttft_ms)
        self.counts.summarised += 1

    def _summary_events(self, now: float) -> list[dict[str, Any]]:
        window = now - self._summary_started
        self._summary_started = now
        done, self._summaries = self._summaries, {}
        events = []
        for (model, cluster), s in done.items():
            events.append({
                "id": str(uuid.uuid4()),
                "occurred": dt.datetime.now(dt.UTC).isoformat(),
                "event": SUMMARY,
                "resource": {"prefect.resource.id": f"first.summary.{self.gateway}.{model}.{cluster}",
                             "prefect.resource.name": f"{model} on {cluster}", "first.gateway": self.gateway},
                "related": [_related("model", model), _related("cluster", cluster),
                            _related("gateway", self.gateway)],
                "payload": {
                    "window_s": round(window, 1), "from": s.started.isoformat(), "requests": s.requests,
                    "by_status": {str(k): v for k, v in s.by_status.items()}, "users": len(s.users),
                    "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                    "latency_ms_p50": _percentile(s.latencies, 0.5), "latency_ms_p95": _percentile(s.latencies, 0.95),
                    "latency_ms_max": round(max(s.latencies), 1), "ttft_ms_p50": _percentile(s.ttfts, 0.5),
                    "reason": f"over the budget of {self.budget:g} events/s",
                },
            })  # fmt: skip
            self.counts.summaries += 1
        return events

    def request_event(self, seen: Observed) -> dict[str, Any]:
        related = [_related("model", seen.model), _related("user", seen.user), _related("gateway", self.gateway)]
        if seen.cluster:
            related.append(_related("cluster", seen.cluster))
        related += [_related("group", g) for g in seen.groups]
        return {
            "id": str(uuid.uuid4()),  # never the request's: Prefect drops a repeated id (a batch line sent twice)
            "occurred": seen.at.isoformat(),
            "event": FAILED if seen.status >= 400 else COMPLETED,
            "resource": {"prefect.resource.id": request_resource(seen.request_id),
                         "prefect.resource.name": f"{seen.endpoint} {seen.model}", "first.gateway": self.gateway,
                         "first.error_class": error_class(seen), "first.cold_start": str(seen.cold_start).lower()},
            "related": related,
            "payload": {
                "status": seen.status, "endpoint": seen.endpoint, "stream": seen.stream,
                "prompt_tokens": seen.prompt_tokens, "completion_tokens": seen.completion_tokens,
                "latency_ms": round(seen.latency_ms, 1),
                "ttft_ms": None if seen.ttft_ms is None else round(seen.ttft_ms, 1),
                "cold_start": seen.cold_start, "tried": seen.tried, "error_type": seen.error_type,
                "error_code": seen.error_code,
                "error": (seen.error or "")[:500] or None, "batch_id": seen.batch_id,
            },
        }  # fmt: skip

    def _post(self, events: list[dict[str, Any]]) -> int:
        posted = 0
        for i in range(0, len(events), POST_BATCH):
            batch = events[i : i + POST_BATCH]
            try:
                self._post_batch(batch)
            except httpx.HTTPError as exc:
                self.counts.dropped_post_failed += len(batch)
                if self.clock() - self._warned >= WARN_EVERY_S:  # a Prefect that is down: a line a minute
                    self._warned = self.clock()
                    log.warning("inference events not posted to Prefect (%d so far): %s",
                                self.counts.dropped_post_failed, exc)  # fmt: skip
                continue
            posted += len(batch)
        if posted:
            self._posted.append((self.clock(), posted))
        return posted

    def check_stored(self) -> int:
        """Count this gateway's events on the server and compare with what was posted at least SETTLE_S ago;
        what is missing was dropped by the server. Returns the number found missing by this check."""
        now = self.clock()
        self._last_check = now
        self._settled += sum(n for at, n in self._posted if now - at >= SETTLE_S)
        self._posted = [(at, n) for at, n in self._posted if now - at < SETTLE_S]
        stored = self._count_stored()
        missing = max(0, self._settled - stored - self.counts.not_stored)
        if missing:
            self.counts.not_stored += missing
            self.budget = max(1.0, self.budget / 2)
            log.warning("the Prefect server stored %d fewer inference events than were posted; the event budget "
                        "is now %g/s", missing, self.budget)  # fmt: skip
        elif self.budget < self.configured_budget:  # it keeps up again: back towards the configured budget
            self.budget = min(self.configured_budget, self.budget * 2)
        self.counts.budget_per_s = self.budget
        return missing

    def _http_post(self, batch: list[dict[str, Any]]) -> None:
        self._http.post("/events", json=batch).raise_for_status()

    def _stored_count(self) -> int:
        body = {
            "filter": {
                "occurred": {"since": self._since.isoformat(), "until": dt.datetime.now(dt.UTC).isoformat()},
                "event": {"prefix": ["first.inference."]},
                "resource": {"labels": {"first.gateway": [self.gateway]}},
            },
            "time_unit": "week",
        }
        r = self._http.post("/events/count-by/event", json=body)
        r.raise_for_status()
        return sum(int(row["count"]) for row in r.json())

    def close(self, timeout: float = 5.0) -> None:
        """Post what is left (summaries included), then stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self.flush(final=True)
        self._http.close()


# 5xx that the gateway itself causes (it is stopping, its spool is full), not the cluster it chose
GATEWAY_CODES = frozenset({"gateway_stopping", "usage_spool", "no_cluster"})


def error_class(seen: Observed) -> str:
    """A label automations match on: "none" (answered), "caller" (4xx: the request's own fault), "cluster" (a 5xx
    on a cluster: its server or endpoint failed, or the model did not start), "gateway" (any other 5xx)."""
    if seen.status < 400:
        return "none"
    if seen.status < 500:
        return "caller"
    return "cluster" if seen.cluster and seen.error_code not in GATEWAY_CODES else "gateway"


def _related(role: str, name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"first.{role}.{name}", "prefect.resource.role": role,
            "prefect.resource.name": name}  # fmt: skip
