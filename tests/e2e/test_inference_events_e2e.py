"""Every inference visible in Prefect (issue 21): requests through `make run` arrive as first.inference.* events
in Prefect's events API, with the request as the resource and the model, cluster, user and gateway related;
above the budget they arrive as summary events that count them; /health and /metrics say what was posted."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from serving.auth import KeyStore
from tests.e2e.conftest import REPO_ROOT, ctrl_c, dump, start_make_run

pytestmark = pytest.mark.e2e

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BUDGET = 4  # events a second: small, so that a burst goes over it


def prefect_events(ready: dict[str, Any], home: Path, since: dt.datetime) -> list[dict[str, Any]]:
    """Every first.inference.* event the Prefect server stored since ``since`` (all pages)."""
    user, _, password = (home / "prefect-api-auth").read_text().strip().partition(":")
    body = {"filter": {"occurred": {"since": since.isoformat()}, "event": {"prefix": ["first.inference."]}},
            "limit": 50}  # fmt: skip
    with httpx.Client(auth=(user, password), timeout=30) as http:
        page = http.post(ready["prefect_ui"] + "/api/events/filter", json=body).raise_for_status().json()
        events = list(page["events"])
        while page.get("next_page"):
            page = http.get(page["next_page"]).raise_for_status().json()
            events += page["events"]
    return events


def test_requests_become_events_and_a_burst_over_the_budget_a_summary(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = {"FIRST_EVENT_BUDGET_PER_S": str(BUDGET), "FIRST_EVENT_SUMMARY_S": "3"}
    make, ready, _ = start_make_run(home, log=tmp_path / "run.log", extra_env=settings)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    auth = {"Authorization": f"Bearer {ready['api_key']}"}
    try:
        with httpx.Client(base_url=ready["base_url"], headers=auth, timeout=60) as http:
            # Within the budget: one at a time, slower than BUDGET a second.
            calm = []
            for _ in range(6):
                r = http.post("/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
                calm.append(r.headers["x-request-id"])
                time.sleep(1.5 / BUDGET)
            failed = http.post("/chat/completions", json={**CHAT, "max_tokens": 100_000})
            assert failed.status_code == 400
            time.sleep(2.0)  # the bucket fills again
            burst: list[str] = []

            def caller() -> None:
                with httpx.Client(base_url=ready["base_url"], headers=auth, timeout=60) as own:
                    for _ in range(10):
                        r = own.post("/chat/completions", json=CHAT)
                        assert r.status_code == 200, r.text
                        burst.append(r.headers["x-request-id"])

            threads = [threading.Thread(target=caller) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        total = len(calm) + 1 + len(burst)
        deadline = time.monotonic() + 60  # a summary after its 3 s; the server writes within 5 s
        while True:
            events = prefect_events(ready, home, since)
            individual = [e for e in events if e["event"] != "first.inference.summary"]
            summarised = sum(e["payload"]["requests"] for e in events if e["event"] == "first.inference.summary")
            if len(individual) + summarised >= total or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        health = httpx.get(ready["base_url"].removesuffix("/v1") + "/health", timeout=30).json()
        admin = KeyStore(Settings(home=home).keys_db).create("ops", ["admin"])[0]
        root = ready["base_url"].removesuffix("/v1")
        metrics = httpx.get(root + "/metrics", headers={"Authorization": f"Bearer {admin}"}, timeout=30).text
    finally:
        ctrl_c(make)

    # Every request is accounted for exactly once: its own event, or a count in a summary.
    assert len(individual) + summarised == total, dump(events)
    assert summarised > 0, "the burst went over the budget, but nothing was summarised"
    by_request = {e["resource"]["prefect.resource.id"].removeprefix("first.request."): e for e in individual}
    assert set(calm) <= set(by_request), "a request within the budget has no event of its own"
    assert len(by_request) == len(individual)  # one event per request, never two
    event = by_request[calm[0]]
    assert event["event"] == "first.inference.completed"
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in event["related"]}
    assert related["model"] == "first.model.tiny" and related["cluster"] == "first.cluster.local"
    assert related["user"] == "first.user.demo" and related["gateway"].startswith("first.gateway.")
    assert event["payload"]["status"] == 200 and event["payload"]["completion_tokens"] == 4
    (refused,) = [e for e in individual if e["payload"]["status"] == 400]  # failures always stay individual
    assert refused["event"] == "first.inference.failed" and refused["payload"]["error_type"]
    counts = health["flow_records"]["events"]
    assert counts["individual"] == len(individual) and counts["summarised"] == summarised
    assert counts["dropped_queue_full"] == counts["dropped_post_failed"] == counts["not_stored"] == 0
    assert 'first_inference_events_total{kind="request"}' in metrics


def test_failures_of_a_cluster_fire_the_drain_automation(tmp_path: Path) -> None:
    """`make run` applies the automations; failures of one model on one cluster (injected as the gateway would
    post them) make Prefect run drain-cluster for that cluster."""
    home = tmp_path / "home"
    make, ready, _ = start_make_run(home, run_args="--no-warm", log=tmp_path / "run.log")
    user, _, password = (home / "prefect-api-auth").read_text().strip().partition(":")
    api = ready["prefect_ui"] + "/api"
    try:
        with httpx.Client(auth=(user, password), timeout=30) as http:
            names = {a["name"] for a in http.post(api + "/automations/filter", json={}).raise_for_status().json()}
            assert {"first: failing cluster", "first: demand for a cold model", "first: busy tenant"} <= names
            failures = [{
                "id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(),
                "event": "first.inference.failed",
                "resource": {"prefect.resource.id": f"first.request.injected{n}", "first.error_class": "cluster",
                             "first.gateway": "test", "first.cold_start": "false"},
                "related": [{"prefect.resource.id": "first.cluster.local", "prefect.resource.role": "cluster",
                             "prefect.resource.name": "local"},
                            {"prefect.resource.id": "first.model.tiny", "prefect.resource.role": "model",
                             "prefect.resource.name": "tiny"}],
                "payload": {"status": 502, "error_code": "backend_unreachable"},
            } for n in range(10)]  # fmt: skip
            http.post(api + "/events", json=failures).raise_for_status()
            deadline = time.monotonic() + 90
            while True:
                runs = http.post(api + "/flow_runs/filter", json={
                    "flows": {"name": {"any_": ["drain-cluster"]}}}).raise_for_status().json()  # fmt: skip
                if runs or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
    finally:
        ctrl_c(make)
    assert [r["parameters"]["cluster"] for r in runs] == ["local"], dump(runs)


def test_the_cold_model_and_busy_tenant_automations_fire(tmp_path: Path) -> None:
    """`first automations apply` with small thresholds: cold-start requests for a model make Prefect run warm-up
    for it on the best cluster, and a user over the request threshold is flagged (the automation fires)."""
    home = tmp_path / "home"
    make, ready, env = start_make_run(home, run_args="--no-warm", log=tmp_path / "run.log")
    user, _, password = (home / "prefect-api-auth").read_text().strip().partition(":")
    api = ready["prefect_ui"] + "/api"
    since = dt.datetime.now(dt.UTC).isoformat()
    try:
        applied = subprocess.run([str(REPO_ROOT / ".venv/bin/first"), "automations", "apply", "--cold-burst", "2",
                                  "--tenant-requests", "5", "--action", "record"], env=env, cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert applied.returncode == 0 and applied.stderr.count("updated automation") == 3, applied.stderr
        with httpx.Client(auth=(user, password), timeout=30) as http:
            automations = {a["name"]: a for a in http.post(api + "/automations/filter", json={}).json()}
            assert automations["first: busy tenant"]["trigger"]["threshold"] == 5
            injected = [{
                "id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(),
                "event": "first.inference.completed",
                "resource": {"prefect.resource.id": f"first.request.busy{n}", "first.error_class": "none",
                             "first.gateway": "test", "first.cold_start": "true" if n < 2 else "false"},
                "related": [{"prefect.resource.id": "first.model.tiny", "prefect.resource.role": "model",
                             "prefect.resource.name": "tiny"},
                            {"prefect.resource.id": "first.user.carol", "prefect.resource.role": "user",
                             "prefect.resource.name": "carol"}],
                "payload": {"status": 200},
            } for n in range(6)]  # fmt: skip
            http.post(api + "/events", json=injected).raise_for_status()
            deadline = time.monotonic() + 90
            while True:
                warm_ups = http.post(api + "/flow_runs/filter", json={
                    "flows": {"name": {"any_": ["warm-up"]}}}).json()  # fmt: skip
                fired = http.post(api + "/events/filter", json={"filter": {
                    "occurred": {"since": since}, "event": {"name": ["prefect.automation.triggered"]}},
                    "limit": 50}).json()["events"]  # fmt: skip
                names = {e["resource"].get("prefect.resource.name") for e in fired}
                if (warm_ups and "first: busy tenant" in names) or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
    finally:
        ctrl_c(make)
    assert [(r["parameters"]["model"], r["parameters"]["cluster"]) for r in warm_ups] == [("tiny", "best")], dump(
        warm_ups
    )
    assert {"first: busy tenant", "first: demand for a cold model"} <= names, dump(fired)
