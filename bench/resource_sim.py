"""Resource management in simulation (issue 17): a week of synthetic traffic on three clusters, replayed in
simulated time under four policies, with FIRST's own decision code.

No real cluster is here, and a week does not fit in a benchmark, so this is a discrete-event replay. What decides
is the gateway's and the flows' own code, called as they call it:

- routing: ``serving.routing.rank`` over ``serving.live_state.Instance`` objects (least loaded hot instance
  first, then one that is starting, then a cold one to warm up);
- the fair queue at a full instance: ``serving.fair_queue.FairOrder`` (per caller group, interactive first), a
  bounded wait (FIRST_QUEUE_WAIT_S, 30 s), then a 503 (a 429 for the group that floods it);
- autoscale: ``flows.autoscale_decisions.decide_model`` every 30 s, on the load the gateways would report;
- predictive warm-up: ``flows.forecast.warm_ahead_decisions`` every 10 minutes, on four past weeks of hourly
  demand (the same generator's expected counts), and its ``keeps`` for scale-down-idle;
- scale-down-idle: a model idle for its idle_timeout_s (2 hours, as ALCF unloads rotated-in models) is stopped.

What is simulated: arrivals (Poisson, daily and weekly cycles, a weekday morning rush on three models, one tenant
flooding the popular model for an hour on Wednesday), service times (log-normal, median 5 s), time to first token
once a request holds a slot (log-normal prefill, median 0.3 s, up to twice as long in a full batch), cold starts
(10 to 15 minutes; on the batch cluster a queue wait first), and GPU time (GPUs x wall time from start to stop).

    .venv/bin/python bench/resource_sim.py            # a week, four policies; writes its section of docs/benchmarks.md
    .venv/bin/python bench/resource_sim.py --quick    # one day, a smoke run
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_output_args, fmt, measure_and_write, resolve_output
from blocks.registry import ClusterSpec, ModelSpec, Registry
from flows.autoscale_decisions import InstanceLoad, Memory, Policy, decide_model
from flows.forecast import Forecast, keeps, warm_ahead_decisions
from serving.fair_queue import INTERACTIVE, FairOrder
from serving.live_state import Instance
from serving.routing import rank

SECTION = ("## Resource management in simulation (`bench/resource_sim.py`)", "<!-- end resource sim -->")
DAY, HOUR = 86400.0, 3600.0
START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
QUEUE_WAIT_S = 30.0  # FIRST_QUEUE_WAIT_S
WARM_WAIT_S = 900.0  # callers who wait out a cold start (FIRST_WARM_WAIT_S raised for a 10-15 minute start)
IDLE_TIMEOUT_S = 7200
PREFILL_MEDIAN_S = 0.3  # time to first token once a request holds a slot: log-normal, longer in a fuller batch
FLOOD_HOURS = (14 * HOUR, 15 * HOUR)  # on Wednesday (the one day of --quick: Monday)
RUSH = (9 * HOUR, 9.5 * HOUR)
LEAD_IN = DAY  # simulated before START (the Sunday) and not counted: the week starts in a steady state

# name -> (expected_start_s, batch queue: mean wait s or 0)
CLUSTERS = {"alpha": (720.0, 0.0), "beta": (720.0, 0.0), "gamma": (1020.0, 300.0)}
# name -> (clusters, GPUs per instance, peak requests/s on a weekday, rush factor, night floor)
MODELS = {
    "big": (["alpha", "beta"], 4, 3.5, 2.0, 0.01),  # popular, all day and (a little) all night
    "mid": (["beta", "gamma"], 2, 0.8, 2.0, 0.0),  # office hours only
    "small": (["alpha", "gamma"], 1, 0.03, 40.0, 0.0),  # little, but a 1.2 req/s workflow at 09:00 on weekdays
    "rare": (["gamma"], 1, 0.004, 1.0, 0.0),
}
FLOOD_RATE = 4.0  # the flooding tenant's requests/s on "big" during the flood hour
GROUPS = [f"g{i}" for i in range(6)]


def rate(model: str, t: float) -> float:
    """Requests/s of ``model`` at ``t`` seconds after START: a working-day bump from 07:30 to 19:30 (and a night
    floor for the popular model), a fifth of it on weekends, a weekday morning rush."""
    _, _, peak, rush, floor = MODELS[model]
    day, hour = int(t // DAY) % 7, (t % DAY) / HOUR
    bump = math.exp(-(((hour - 13.5) / 3.2) ** 2)) if 7.5 <= hour < 19.5 else 0.0
    shape = floor + (1 - floor) * bump
    if day >= 5:
        shape *= 0.2
    r = peak * shape
    if day < 5 and RUSH[0] <= t % DAY < RUSH[1]:
        r *= rush
    return r


@dataclass
class Request:
    t: float
    model: str
    group: str
    service_s: float
    ttft: float | None = None
    outcome: str = "pending"  # ok | 503 | 429
    cold: bool = False
    deadline: float = 0.0
    entered: float = 0.0


def flood_window(days: float) -> tuple[float, float]:
    day = min(2, int(days) - 1) * DAY
    return day + FLOOD_HOURS[0], day + FLOOD_HOURS[1]


def arrivals(days: float, flood: bool, seed: int) -> list[Request]:
    """From LEAD_IN before START (the Sunday before) to ``days`` after it."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    window = flood_window(days)
    for model in MODELS:
        for minute in range(-int(LEAD_IN / 60), int(days * 1440)):
            t0 = minute * 60.0
            lam = rate(model, t0 + 30) * 60
            if flood and model == "big" and window[0] <= t0 < window[1]:
                lam_flood = FLOOD_RATE * 60
                for t in np.sort(rng.uniform(t0, t0 + 60, rng.poisson(lam_flood))):
                    out.append(Request(float(t), model, "flood", float(rng.lognormal(math.log(5.0), 0.6))))
            for t in np.sort(rng.uniform(t0, t0 + 60, rng.poisson(lam))):
                group = GROUPS[int(rng.integers(len(GROUPS)))]
                out.append(Request(float(t), model, group, float(rng.lognormal(math.log(5.0), 0.6))))
    out.sort(key=lambda r: r.t)
    return out


def history(weeks: int = 4) -> pl.DataFrame:
    """Hourly requests of the weeks before START (the expected counts: what the usage table would hold)."""
    rows = []
    for model in MODELS:
        for h in range(weeks * 7 * 24):
            t = h * HOUR
            n = sum(rate(model, t + m * 60 + 30) * 60 for m in range(60))
            rows.append((model, START - timedelta(weeks=weeks) + timedelta(hours=h), round(n)))
    return pl.DataFrame(rows, schema={"model": pl.String, "hour": pl.Datetime("us", "UTC"), "requests": pl.Int64},
                        orient="row")  # fmt: skip


@dataclass
class SimInstance:
    inst: Instance
    gpus: int
    order: FairOrder[Request] = field(default_factory=FairOrder)
    pending: list[Request] = field(default_factory=list)  # waiting for its warm-up
    started: float | None = None  # holding GPUs since
    draining: bool = False
    waits: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=400))
    refusals: deque[float] = field(default_factory=lambda: deque(maxlen=400))


class Sim:
    def __init__(self, policy: str, requests: list[Request], days: float, fair: bool, seed: int) -> None:
        self.policy, self.requests, self.end, self.fair = policy, requests, days * DAY, fair
        self.rng = np.random.default_rng(seed + 1)
        scaled, self.predictive = policy.startswith("autoscale"), policy.endswith("+predictive")
        self.registry = Registry(
            clusters={n: ClusterSpec(name=n, max_concurrency=16, max_instances=4, expected_start_s=s,
                                     scheduler="pbs" if q else "none") for n, (s, q) in CLUSTERS.items()},
            models={m: ModelSpec(name=m, path="-", clusters=c, gpus=g, max_instances=3 if scaled else 1,
                                 idle_timeout_s=IDLE_TIMEOUT_S) for m, (c, g, *_rest) in MODELS.items()},
        )  # fmt: skip
        self.instances: dict[tuple[str, str, int], SimInstance] = {}
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.gpu_s = 0.0
        self.memory = {m: Memory() for m in MODELS}
        self.keep: set[str] = set()
        self.observed: dict[tuple[str, datetime], int] = {}
        self.base_history = history() if self.predictive else None

    # ---- instances ----

    def sim_instance(self, cluster: str, model: str, replica: int = 0) -> SimInstance:
        key = (cluster, model, replica)
        if key not in self.instances:
            spec = self.registry.models[model].as_replica(replica)
            inst = Instance(self.registry.clusters[cluster], spec, state="cold")
            self.instances[key] = SimInstance(inst, spec.on(cluster).gpus or 1)
        return self.instances[key]

    def start(self, si: SimInstance, t: float) -> None:
        if si.inst.state in ("hot", "starting", "queued"):
            return
        queue_mean = CLUSTERS[si.inst.cluster.name][1]
        delay = (self.rng.exponential(queue_mean) if queue_mean else 0.0) + self.rng.uniform(600, 900)
        si.inst.state, si.inst.since, si.started, si.draining = "starting", t, t, False
        si.inst.warm_ups += 1
        self.push(t + delay, "ready", si)

    def stop(self, si: SimInstance, t: float) -> None:
        if si.started is not None:  # counted within the week only
            self.gpu_s += max(0.0, min(t, self.end) - max(si.started, 0.0)) * si.gpus
        si.started, si.draining = None, False
        si.inst.state, si.inst.since, si.inst.hot_since = "cold", t, None

    def running(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for si in self.instances.values():
            if si.inst.state in ("hot", "starting", "queued"):
                out[si.inst.cluster.name] = out.get(si.inst.cluster.name, 0) + 1
        return out

    # ---- events ----

    def push(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> Sim:
        for r in self.requests:
            self.push(r.t, "arrive", r)
        if self.policy == "always-on":
            for m, (clusters, *_rest) in MODELS.items():
                for c in clusters:
                    si = self.sim_instance(c, m)
                    si.inst.state, si.inst.hot_since, si.started = "hot", -LEAD_IN, -LEAD_IN
        else:
            self.push(-LEAD_IN + 300.0, "idle", None)
        if self.policy.startswith("autoscale"):
            self.push(-LEAD_IN + 30.0, "autoscale", None)
        if self.predictive:
            self.push(-LEAD_IN, "predict", None)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > self.end + 2 * HOUR:
                break
            getattr(self, "on_" + kind)(t, payload)
        for si in self.instances.values():
            self.stop(si, self.end)
        return self

    def on_arrive(self, t: float, r: Request) -> None:
        hour = (START + timedelta(seconds=t)).replace(minute=0, second=0, microsecond=0)
        self.observed[(r.model, hour)] = self.observed.get((r.model, hour), 0) + 1
        spec = self.registry.models[r.model]
        candidates = []
        for c in spec.clusters:
            candidates.append(self.sim_instance(c, r.model).inst)
            candidates += [si.inst for (cl, m, n), si in self.instances.items()
                           if cl == c and m == r.model and n > 0 and si.inst.state == "hot"]  # fmt: skip
        candidates = [i for i in candidates if not self.instances[self.key(i)].draining]
        plan = rank(candidates, {}, {}, t, self.running())
        if not plan:
            r.outcome = "503"
            return
        si = self.instances[self.key(plan[0])]
        if si.inst.state != "hot":
            r.cold = True
            if si.inst.state == "cold":
                self.start(si, t)
            r.deadline = t + WARM_WAIT_S
            si.pending.append(r)
            self.push(r.deadline, "warm_timeout", r)
            return
        self.enter(si, r, t)

    @staticmethod
    def key(inst: Instance) -> tuple[str, str, int]:
        return (inst.cluster.name, inst.model.name, inst.model.replica)

    def enter(self, si: SimInstance, r: Request, t: float) -> None:
        r.entered = t
        if si.inst.inflight < si.inst.cluster.max_concurrency and not len(si.order):
            self.admit(si, r, t)
            return
        si.order.push(r.group if self.fair else "all", 1.0, INTERACTIVE, r)
        r.outcome, r.deadline = "queued", t + QUEUE_WAIT_S
        self.push(r.deadline, "queue_timeout", (si, r))

    def admit(self, si: SimInstance, r: Request, t: float) -> None:
        si.inst.inflight += 1
        si.inst.last_used = t
        si.waits.append((t, (t - r.entered) * 1000))
        occupancy = si.inst.inflight / si.inst.cluster.max_concurrency
        prefill = float(self.rng.lognormal(math.log(PREFILL_MEDIAN_S), 0.5)) * (1 + occupancy)
        r.outcome, r.ttft = "running", t - r.t + prefill
        self.push(t + r.service_s, "done", (si, r))

    def on_done(self, t: float, payload: tuple[SimInstance, Request]) -> None:
        si, r = payload
        r.outcome = "ok"
        si.inst.inflight -= 1
        si.inst.last_used = t
        while len(si.order) and si.inst.inflight < si.inst.cluster.max_concurrency:
            nxt = si.order.pop().item
            if nxt.outcome == "queued":
                self.admit(si, nxt, t)
        if si.draining and si.inst.inflight == 0 and not len(si.order):
            self.stop(si, t)

    def on_queue_timeout(self, t: float, payload: tuple[SimInstance, Request]) -> None:
        si, r = payload
        if r.outcome != "queued":
            return
        flows = [e.item.group for e in si.order.heap if e.item.outcome == "queued"]
        share = len(flows) / max(1, len(set(flows)))
        r.outcome = "429" if len(set(flows)) > 1 and flows.count(r.group) > share else "503"
        si.refusals.append(t)

    def on_warm_timeout(self, t: float, r: Request) -> None:
        if r.outcome == "pending":
            r.outcome = "503"

    def on_ready(self, t: float, si: SimInstance) -> None:
        if si.inst.state != "starting":
            return
        si.inst.state, si.inst.since, si.inst.hot_since, si.inst.last_used = "hot", t, t, t
        pending, si.pending = si.pending, []
        for r in pending:
            if r.outcome == "pending":
                self.enter(si, r, t)

    # ---- controllers ----

    def on_idle(self, t: float, _: Any) -> None:
        for si in self.instances.values():
            i = si.inst
            if i.state != "hot" or i.inflight or len(si.order) or si.draining:
                continue
            idle = t - max(i.last_used or 0.0, i.hot_since or 0.0)
            low, _high = i.model.instance_bounds(i.cluster.name)
            if idle > IDLE_TIMEOUT_S and i.model.name not in self.keep and i.model.replica >= low:
                self.stop(si, t)
        self.push(t + 300.0, "idle", None)

    def on_autoscale(self, t: float, _: Any) -> None:
        running = self.running()
        for model in MODELS:
            loads = []
            for (c, m, n), si in self.instances.items():
                if m != model:
                    continue
                waits = [ms for w, ms in si.waits if t - w <= 60]
                state = "draining" if si.draining else si.inst.state
                queued = sum(1 for e in si.order.heap if e.item.outcome == "queued")
                loads.append(InstanceLoad(c, n, state, si.inst.inflight, queued,
                                          sum(1 for x in si.refusals if t - x <= 60),
                                          float(np.median(waits)) if waits else None))  # fmt: skip
            d = decide_model(self.registry, model, loads, self.memory[model], t, Policy(), running)
            if d.action == "out" and d.cluster is not None and d.replica is not None:
                self.start(self.sim_instance(d.cluster, model, d.replica), t)
            elif d.action == "in" and d.cluster is not None and d.replica is not None:
                si = self.sim_instance(d.cluster, model, d.replica)
                si.draining = True
                if si.inst.inflight == 0 and not len(si.order):
                    self.stop(si, t)
        self.push(t + 30.0, "autoscale", None)

    def on_predict(self, t: float, _: Any) -> None:
        assert self.base_history is not None
        now = START + timedelta(seconds=t)
        seen = pl.DataFrame([(m, h, n) for (m, h), n in self.observed.items()],
                            schema=self.base_history.schema, orient="row")  # fmt: skip
        forecast = Forecast(pl.concat([self.base_history, seen]), now, 4)
        states: dict[str, list[str]] = {}
        for (_c, m, _n), si in self.instances.items():
            states.setdefault(m, []).append(si.inst.state)
        decisions = warm_ahead_decisions(self.registry, forecast, states, 600.0)
        self.keep = keeps(decisions)
        for d in decisions:
            if d.action == "warm":
                spec = self.registry.models[d.model]
                best = min(spec.clusters, key=lambda c: self.registry.clusters[c].expected_start_s)
                self.start(self.sim_instance(best, d.model), t)
        self.push(t + 600.0, "predict", None)


def summarize(sim: Sim, days: float) -> dict[str, float]:
    rs = [r for r in sim.requests if r.t >= 0]  # the lead-in day is not counted
    ok = [r.ttft for r in rs if r.outcome == "ok" and r.ttft is not None]
    return {
        "requests": len(rs),
        "cold": sum(r.cold for r in rs),
        "cold_pct": 100.0 * sum(r.cold for r in rs) / len(rs),
        "ttft_p50": float(np.percentile(ok, 50)),
        "ttft_p95": float(np.percentile(ok, 95)),
        "n429": sum(r.outcome == "429" for r in rs),
        "n503": sum(r.outcome == "503" for r in rs),
        "gpu_h": sim.gpu_s / HOUR,
    }


def flood_p95(sim: Sim, days: float) -> float:
    """The other tenants' p95 time to first token on the flooded model during the flood hour."""
    start, end = flood_window(days)
    xs = [r.ttft for r in sim.requests if r.model == "big" and r.group != "flood" and start <= r.t < end
          and r.outcome == "ok" and r.ttft is not None]  # fmt: skip
    return float(np.percentile(xs, 95)) if xs else float("nan")


POLICIES = ("reactive", "reactive+predictive", "autoscale", "autoscale+predictive", "always-on")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    days = 1.0 if args.quick else 7.0
    out: dict[str, Any] = {"days": days}
    flood_trace, quiet_trace = arrivals(days, True, args.seed), arrivals(days, False, args.seed)
    for policy in POLICIES:
        t0 = time.monotonic()
        sim = Sim(policy, [Request(r.t, r.model, r.group, r.service_s) for r in flood_trace], days, True, args.seed)
        out[policy] = summarize(sim.run(), days)
        out[policy]["flood_p95"] = flood_p95(sim, days)
        quiet = Sim(policy, [Request(r.t, r.model, r.group, r.service_s) for r in quiet_trace], days, True, args.seed)
        out[policy]["quiet_p95"] = flood_p95(quiet.run(), days)
        out[policy]["sim_s"] = time.monotonic() - t0
        print(f"{policy}: {out[policy]}", flush=True)
    fifo = Sim("autoscale+predictive", [Request(r.t, r.model, r.group, r.service_s) for r in flood_trace], days,
               False, args.seed).run()  # fmt: skip
    out["fifo_flood_p95"] = flood_p95(fifo, days)
    return out


def _vs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``a`` against ``b``: the cut in cold hits and the change in GPU-hours."""
    cut = 100 * (1 - a["cold"] / b["cold"]) if b["cold"] else float("nan")
    more = 100 * (a["gpu_h"] / b["gpu_h"] - 1)
    return f"cold hits {b['cold']:,} -> {a['cold']:,} ({cut:.0f} % fewer), GPU-hours {more:+.1f} %"


def report(args: argparse.Namespace, m: dict[str, Any], started: datetime, wall_s: float) -> str:
    reactive = m["reactive"]
    rows = []
    for policy in POLICIES:
        r = m[policy]
        rows.append(
            f"| {policy} | {r['cold']:,} ({fmt(r['cold_pct'], '.3f')} %) | {fmt(r['ttft_p50'], '.2f')} s "
            f"| {fmt(r['ttft_p95'], '.1f')} s | {r['n429']:,} | {r['n503']:,} | {fmt(r['gpu_h'], ',.0f')} "
            f"({fmt(100 * (r['gpu_h'] / reactive['gpu_h'] - 1), '+.0f')} %) "
            f"| {fmt(r['flood_p95'], '.2f')} s / {fmt(r['quiet_p95'], '.2f')} s = "
            f"{fmt(r['flood_p95'] / r['quiet_p95'], '.2f')}x |"
        )  # fmt: skip
    pred = m["autoscale+predictive"]
    days = m["days"]
    return "\n".join([
        SECTION[0],
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC, commit `{_commit()}`; {days:g} simulated day(s) from Monday (after "
        f"a simulated Sunday not counted), {reactive['requests']:,} requests, seed {args.seed}; {wall_s:.0f} s of "
        "CPU for all runs. Three clusters (alpha, beta: cold start 10-15 min; gamma: a PBS queue wait, mean 5 min, "
        "first), 16 slots per instance, four models: big (4 GPUs, alpha+beta, peak 3.5 req/s, some traffic all "
        "night), mid (2 GPUs, office hours), small (1 GPU, little traffic but a 1.2 req/s workflow at 09:00 on "
        "weekdays), rare (1 GPU). Service time log-normal (median 5 s); time to first token once in a slot "
        "log-normal (median 0.3 s), up to twice as long in a full batch. A weekday morning rush (09:00-09:30) on "
        "big, mid and small; on Wednesday (Monday with --quick) 14:00-15:00 one tenant floods big with 4 req/s "
        "more. Callers wait up to 15 minutes for a cold start, 30 s in a full instance's queue. The decisions are "
        "FIRST's own code (see the script's docstring).",
        "",
        "| policy | requests that met a cold model | TTFT p50 | TTFT p95 | 429 | 503 | GPU-hours (vs reactive) | "
        "others' TTFT p95 on big, flood hour / same hour quiet |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- **Predictive warm-up** (goal: at least 50 % fewer cold hits for at most 15 % more GPU-hours): alone, "
        f"against reactive: {_vs(m['reactive+predictive'], reactive)}; with autoscale, against autoscale alone: "
        f"{_vs(pred, m['autoscale'])}.",
        f"- **The flood** (goal: the others' p95 within 2x of quiet): with the fair queue, "
        f"{pred['flood_p95'] / pred['quiet_p95']:.2f}x under autoscale+predictive; with first-come-first-served "
        f"instead (the same policy, one queue for everyone), {m['fifo_flood_p95'] / pred['quiet_p95']:.2f}x.",
        "- reactive: today's gateway without these flows: one instance per model, warmed by the first request, "
        "stopped after 2 idle hours. +predictive: `predictive-warm-up` every 10 minutes over four past weeks of "
        "the same traffic (its forecast also keeps a model through a predicted busy hour). autoscale: up to 3 "
        "instances per model per cluster, `autoscale` every 30 s with its default policy. always-on: every model "
        "hot on each of its clusters all week, no scaling.",
        "",
        SECTION[1],
        "",
    ])  # fmt: skip


def _commit() -> str:
    from bench.common import git

    return git("rev-parse", "--short", "HEAD")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=17, help="the traffic's random seed (default 17)")
    add_output_args(ap, "one simulated day")
    args = ap.parse_args(argv)
    resolve_output(args)
    return measure_and_write(args, SECTION, measure, report)


if __name__ == "__main__":
    sys.exit(main())
