"""Allocation accounting: instance time (GPUs x wall time) charged to projects pro rata by tokens, idle hours to
the idle owner, budgets per period; and a spent project refused (or demoted) by a real gateway."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from analytics.allocations import (
    NO_PROJECT,
    InstanceEvent,
    Interval,
    allocation_report,
    append_event,
    charges,
    instance_intervals,
    period_bounds,
    read_events,
)
from analytics.records import UsageRecord
from analytics.spool import UsageSpool
from analytics.store import UsageStore
from blocks.registry import ModelSpec, ProjectSpec, Registry
from core.errors import APIError
from core.principal import Principal
from core.settings import Settings
from serving.auth import KeyStore
from serving.budgets import Budgets
from tests.fakes.openai_simulator import OpenAISimulatorDouble
from tests.gateway_factory import GatewayProcess

H = 3600.0
T0 = datetime(2026, 12, 1, tzinfo=UTC).timestamp()  # a month start


def ev(hours: float, state: str, cluster: str = "c", model: str = "m") -> InstanceEvent:
    return InstanceEvent(T0 + hours * H, cluster, model, state)


def test_instance_time_runs_from_warm_up_to_scale_down_or_failure():
    events = [ev(0, "queued"), ev(1, "starting"), ev(1.25, "hot"), ev(3, "cold"),  # 2 h held (queued: no GPUs)
              ev(5, "starting"), ev(6, "failed"),  # 1 h, then it died
              ev(8, "hot")]  # fmt: skip  # still up at "until"
    got = instance_intervals(events, T0, T0 + 10 * H)
    assert [(i.start - T0, i.end - T0) for i in got] == [(1 * H, 3 * H), (5 * H, 6 * H), (8 * H, 10 * H)]
    clipped = instance_intervals(events, T0 + 2 * H, T0 + 9 * H)
    assert [(i.start - T0, i.end - T0) for i in clipped] == [(2 * H, 3 * H), (5 * H, 6 * H), (8 * H, 9 * H)]


def test_hours_are_shared_pro_rata_by_tokens_and_idle_hours_go_to_the_owner():
    iv = [Interval("c", "m", T0, T0 + 3 * H)]  # three hours on a 4-GPU instance: 12 GPU-hours
    tokens = {("c", "m", T0): {"astro": 300, "bio": 100}, ("c", "m", T0 + H): {"bio": 50}}
    got = charges(iv, {("c", "m"): 4}, tokens, "facility")
    total = {p: sum(h.values()) for p, h in got.items()}
    assert total == pytest.approx({"astro": 3.0, "bio": 1.0 + 4.0, "facility": 4.0})
    assert sum(total.values()) == pytest.approx(12.0), "every GPU-hour is charged to someone"


def test_budget_periods_are_calendar_utc():
    now = datetime(2026, 11, 17, 8, tzinfo=UTC)
    assert period_bounds("month", now) == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert period_bounds("quarter", now) == (datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("year", now) == (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_events_survive_a_torn_line(tmp_path: Path):
    append_event(tmp_path, ev(1, "hot"))
    with open(next(tmp_path.glob("*.jsonl")), "ab") as f:
        f.write(b'{"ts": 12, "clus')  # a writer killed mid-line
    append_event(tmp_path, ev(2, "cold"))
    assert [e.state for e in read_events(tmp_path)] == ["hot", "cold"]


def _registry() -> Registry:
    return Registry(
        models={"m": ModelSpec(name="m", clusters=["c"], path="-", gpus=2)},
        projects={
            "astro": ProjectSpec(name="astro", groups=["astro-team"], gpu_hours=3.0),
            "bio": ProjectSpec(name="bio", groups=["bio-lab"], gpu_hours=100.0, when_spent="demote"),
        },
    )


def _usage(home: Path, rows: list[tuple[float, list[str], int]]) -> UsageStore:
    """The usage table with these (hours after T0, groups, tokens) rows on cluster c, model m."""
    spool = UsageSpool(home / "spool")
    for n, (hours, groups, tokens) in enumerate(rows):
        spool.append(UsageRecord(
            request_id=f"r{n}", ts=T0 + hours * H, user=f"u{n}", groups=groups, model="m", cluster="c",
            endpoint="chat.completions", stream=False, prompt_tokens=tokens, completion_tokens=0,
            total_tokens=tokens, latency_ms=10.0, ttft_ms=None, status=200, error_type=None, cold_start=False,
        ))  # fmt: skip
    spool.close()
    store = UsageStore(home / "usage.duckdb")
    store.ingest(home / "spool")
    return store


def test_the_report_charges_projects_and_flags_a_spent_budget(tmp_path: Path):
    events = tmp_path / "events"
    for e in (ev(0, "starting"), ev(0.1, "hot"), ev(3, "cold")):  # 3 h x 2 GPUs = 6 GPU-hours
        append_event(events, e)
    store = _usage(tmp_path, [(0.5, ["astro-team"], 300), (0.6, ["bio-lab"], 100), (1.5, ["astro-team"], 10),
                              (1.7, ["nobody"], 10)])  # fmt: skip
    report = allocation_report(store, events, _registry(), "facility", now=datetime.fromtimestamp(T0 + 5 * H, UTC))
    rows = {r["project"]: r for r in report.to_dicts()}
    assert rows["astro"]["gpu_hours_used"] == pytest.approx(1.5 + 1.0)  # 3/4 of hour 0, half of hour 1
    assert rows["bio"]["gpu_hours_used"] == pytest.approx(0.5)
    assert rows[NO_PROJECT]["gpu_hours_used"] == pytest.approx(1.0)
    assert rows["facility"]["gpu_hours_used"] == pytest.approx(2.0)  # hour 2: nobody
    assert not rows["astro"]["spent"] and rows["astro"]["gpu_hours_left"] == pytest.approx(0.5)
    later = allocation_report(store, events, _registry(), "facility", now=datetime.fromtimestamp(T0 + 5 * H, UTC))
    assert later.to_dicts() == report.to_dicts(), "the same inputs give the same report"
    append_event(events, ev(4, "hot"))  # up again, astro alone uses it in hour 4
    store = _usage(tmp_path / "again", [(0.5, ["astro-team"], 300), (0.6, ["bio-lab"], 100),
                                         (1.5, ["astro-team"], 10), (4.2, ["astro-team"], 5)])  # fmt: skip
    spent = allocation_report(store, events, _registry(), "facility", now=datetime.fromtimestamp(T0 + 5 * H, UTC))
    astro = next(r for r in spent.to_dicts() if r["project"] == "astro")
    assert astro["spent"] and astro["gpu_hours_used"] >= 3.0 and astro["renews"] == datetime(2027, 1, 1, tzinfo=UTC)


def test_a_spent_project_is_refused_naming_it_or_demoted():
    reg = _registry()
    budgets = Budgets()
    renews = datetime(2027, 1, 1, tzinfo=UTC)
    budgets.update([
        {"project": "astro", "spent": True, "gpu_hours_used": 3.2, "gpu_hours_budget": 3.0, "renews": renews},
        {"project": "bio", "spent": True, "gpu_hours_used": 101.0, "gpu_hours_budget": 100.0, "renews": renews},
        {"project": "facility", "spent": False, "gpu_hours_used": 9.0, "gpu_hours_budget": None, "renews": renews},
    ])  # fmt: skip
    alice = Principal(user="alice", groups=("astro-team",))
    with pytest.raises(APIError) as e:
        budgets.check(alice, reg.project_of(alice.groups))
    assert e.value.status == 403 and e.value.code == "allocation_spent"
    assert "Project 'astro'" in e.value.message and "2027-01-01" in e.value.message
    bob = Principal(user="bob", groups=("bio-lab",))
    budgets.check(bob, reg.project_of(bob.groups))  # demoted, not refused
    assert budgets.demoted(reg.project_of(bob.groups)) and not budgets.demoted(reg.project_of(("other",)))


def test_a_group_in_two_projects_is_a_registry_error():
    doc = {"models": [], "clusters": [], "projects": [{"name": "a", "groups": ["g"], "gpu_hours": 1},
                                                      {"name": "b", "groups": ["g"], "gpu_hours": 1}]}  # fmt: skip
    with pytest.raises(ValueError, match="group 'g' is in both 'a' and 'b'"):
        Registry.from_yaml(yaml.safe_dump(doc))


def test_a_gateway_refuses_a_spent_project_and_reports_the_burn(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    now = datetime.now(UTC).timestamp()
    for e in (InstanceEvent(now - 2 * H, "a", "m", "hot"),):  # up for the last 2 h: 2 GPU-hours, all astro's
        append_event(home / "instance-events", e)
    spool = UsageSpool(Settings(home=home).spool_root)
    spool.append(UsageRecord(
        request_id="old", ts=now - 1.5 * H, user="alice", groups=["astro-team"], model="m", cluster="a",
        endpoint="chat.completions", stream=False, prompt_tokens=5, completion_tokens=5, total_tokens=10,
        latency_ms=10.0, ttft_ms=None, status=200, error_type=None, cold_start=False,
    ))  # fmt: skip
    spool.close()
    with OpenAISimulatorDouble(latency_s=0.0) as sim:
        registry = home / "registry.yaml"
        registry.write_text(yaml.safe_dump({
            "clusters": [{"name": "a", "transport": "http", "base_url": sim.base_url}],
            "models": [{"name": "m", "path": "-", "clusters": ["a"]}],
            "projects": [{"name": "astro", "groups": ["astro-team"], "gpu_hours": 0.5},
                         {"name": "bio", "groups": ["bio-lab"], "gpu_hours": 100}],
        }))  # fmt: skip
        UsageStore(Settings(home=home).usage_db).ingest(Settings(home=home).spool_root)
        keys = KeyStore(Settings(home=home).keys_db)
        alice, bob = keys.create("alice", ["astro-team"])[0], keys.create("bob", ["bio-lab"])[0]
        admin = keys.create("ops", ["admin"])[0]
        gw = GatewayProcess(home, registry).start()
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            refused = httpx.post(
                gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {alice}"}
            )
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["code"] == "allocation_spent" and "Project 'astro'" in error["message"]
            ok = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {bob}"})
            assert ok.status_code == 200
            report = httpx.get(gw.url + "/v1/usage", params={"report": "allocations"},
                               headers={"Authorization": f"Bearer {admin}"}).json()  # fmt: skip
            rows = {r["project"]: r for r in report["data"]}
            # 2 h up: the hour astro used it (whole or partial) is astro's, the rest the idle owner's.
            assert rows["astro"]["spent"] and 0.5 < rows["astro"]["gpu_hours_used"] <= 1.0
            total = rows["astro"]["gpu_hours_used"] + rows["facility"]["gpu_hours_used"]
            assert total == pytest.approx(2.0, abs=0.02)
            own = httpx.get(gw.url + "/v1/usage", params={"report": "allocations"},
                            headers={"Authorization": f"Bearer {bob}"}).json()  # fmt: skip
            assert [r["project"] for r in own["data"]] == ["bio"]
        finally:
            gw.stop()
