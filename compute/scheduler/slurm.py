"""Slurm: job states, hostlists, and the parsers over ``squeue``, ``sacct`` and ``sinfo``."""

from __future__ import annotations

import re
from collections.abc import Iterable

from compute.scheduler.jobs import (
    Job,
    JobState,
    Node,
    _epoch,
    _int,
    _str,
    _unique,
)

_SLURM_STATES: dict[str, JobState] = {
    "PENDING": "queued", "PD": "queued", "REQUEUED": "queued", "RQ": "queued", "REQUEUE_FED": "queued",
    "RF": "queued", "SUSPENDED": "queued", "S": "queued", "STOPPED": "queued", "ST": "queued",
    "REQUEUE_HOLD": "held", "RH": "held", "RESV_DEL_HOLD": "held", "RD": "held",
    "CONFIGURING": "starting", "CF": "starting",
    "RUNNING": "running", "R": "running", "RESIZING": "running", "RS": "running", "SIGNALING": "running",
    "SI": "running",
    "COMPLETING": "exiting", "CG": "exiting", "STAGE_OUT": "exiting", "SO": "exiting",
    "COMPLETED": "finished", "CD": "finished",
    "FAILED": "failed", "F": "failed", "CANCELLED": "failed", "CA": "failed", "TIMEOUT": "failed",
    "TO": "failed", "NODE_FAIL": "failed", "NF": "failed", "PREEMPTED": "failed", "PR": "failed",
    "BOOT_FAIL": "failed", "BF": "failed", "DEADLINE": "failed", "DL": "failed", "OUT_OF_MEMORY": "failed",
    "OOM": "failed", "SPECIAL_EXIT": "failed", "SE": "failed",
}  # fmt: skip
_SLURM_HELD_REASONS = ("JobHeld", "DependencyNeverSatisfied")
_SLURM_NODE_UP = {"idle", "mixed", "mix", "allocated", "alloc", "completing", "comp", "planned", "plnd", "reserved"}
_SLURM_NODE_FLAGS = "*~#!%$@^-"  # sinfo %T suffixes: * not responding, ~ powered off, # powering up, ...
_SLURM_NODE_DOWN_FLAGS = "*~#%"  # not responding, powered off, powering up, powering down


def normalize_slurm_state(state: str, reason: str | None = None) -> JobState:
    """Slurm job state (``squeue %T``/``%t`` or ``sacct State``, e.g. "CANCELLED by 51234") and pending
    reason -> normalized state (module docstring)."""
    words = state.strip().split()
    code = words[0].rstrip("+").upper() if words else ""
    normalized = _SLURM_STATES.get(code, "unknown")
    if code in ("PENDING", "PD") and reason and reason.strip().strip("()").startswith(_SLURM_HELD_REASONS):
        return "held"
    return normalized


def _split_top_level(expr: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    prefix, rest = name[: m.start()], _expand_one(name[m.end() :])
    hosts = []
    for part in m.group(1).split(","):
        lo, dash, hi = part.strip().partition("-")
        numbers = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)] if dash else [lo]
        hosts.extend(prefix + n + r for n in numbers for r in rest)
    return hosts


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist: "nid[001008-001009,001012],login1" -> ["nid001008", "nid001009",
    "nid001012", "login1"] (zero padding kept). Empty, "(null)" and "None assigned" give []."""
    expr = expr.strip()
    if expr in ("", "(null)", "None assigned"):
        return []
    return _unique(host for item in _split_top_level(expr) for host in _expand_one(item))


def _slurm_exit(exit_code: str) -> int | None:
    """sacct ExitCode "code:signal" -> the code, or 128 + signal when a signal ended it (as a shell shows)."""
    code, _, signal = exit_code.strip().partition(":")
    c, s = _int(code), _int(signal) or 0
    if c is None:
        return None
    return 128 + s if s else c


def _slurm_lines(text: str, fields: int, what: str) -> Iterable[list[str]]:
    for line in text.splitlines():
        if not line.strip() or line.startswith("CLUSTER: "):  # multi-cluster (-M) output names each cluster
            continue
        parts = line.split("|")
        if len(parts) < fields:
            raise ValueError(f"{what}: expected {fields} '|'-separated fields, got {line!r}")
        yield parts


def parse_squeue(text: str) -> list[Job]:
    """Parse ``squeue --noheader --format=SQUEUE_FORMAT`` ("%i|%j|%T|%u|%P|%N|%V|%S|%r").

    A job name may itself hold "|": the fields around it are counted from both ends. A pending job's
    ``%S`` is the scheduler's estimate, not a start: it is reported as start_time None.
    """
    jobs = []
    for parts in _slurm_lines(text, 9, "squeue"):
        state, user, partition, nodelist, submit, start, reason = (p.strip() for p in parts[-7:])
        normalized = normalize_slurm_state(state, reason)
        reason = reason.strip("()")
        jobs.append(
            Job(
                job_id=parts[0].strip(),
                name=_str("|".join(parts[1:-7])),
                state=normalized,
                raw_state=state,
                queue=_str(partition),
                user=_str(user),
                nodes=expand_hostlist(nodelist),
                submit_time=_epoch(submit),
                start_time=None if normalized in ("queued", "held") else _epoch(start),
                exit_status=0 if normalized == "finished" else None,
                comment=None if reason in ("", "None") else reason,
            )
        )
    return jobs


def parse_sacct(text: str) -> list[Job]:
    """Parse ``sacct -n -P -X --format=SACCT_FORMAT`` (JobID|JobName|State|ExitCode|Start|End|NodeList).

    Step lines ("123.batch", present without -X) are skipped. exit_status is set only for jobs that started
    and ended.
    """
    jobs = []
    for parts in _slurm_lines(text, 7, "sacct"):
        job_id = parts[0].strip()
        if "." in job_id:
            continue
        state, exit_code, start, end, nodelist = (p.strip() for p in parts[-5:])
        normalized = normalize_slurm_state(state)
        started = _epoch(start) is not None  # a job cancelled while pending shows ExitCode 0:0
        jobs.append(
            Job(
                job_id=job_id,
                name=_str("|".join(parts[1:-5])),
                state=normalized,
                raw_state=state,
                nodes=expand_hostlist(nodelist),
                start_time=_epoch(start),
                end_time=_epoch(end),
                exit_status=_slurm_exit(exit_code) if normalized in ("finished", "failed") and started else None,
            )
        )
    return jobs


def parse_sinfo(text: str) -> list[Node]:
    """Parse ``sinfo --noheader --format=SINFO_FORMAT`` ("%N|%T|%C"), one Node per host.

    Without ``--Node`` sinfo groups nodes that share a state, and ``%C`` ("allocated/idle/other/total")
    counts the whole group: CPU counts are kept only for lines that name one node. A node listed in
    several partitions is reported once.
    """
    nodes: dict[str, Node] = {}
    for parts in _slurm_lines(text, 3, "sinfo"):
        names = expand_hostlist(parts[0])
        state = parts[1].strip()
        cpus = [_int(c) for c in parts[2].split("/")]
        total = free = None
        if len(names) == 1 and len(cpus) == 4:
            total, free = cpus[3], cpus[1]
        base = state.rstrip(_SLURM_NODE_FLAGS).lower()
        flags = state[len(base) :]
        up = base in _SLURM_NODE_UP and not any(f in flags for f in _SLURM_NODE_DOWN_FLAGS)
        for name in names:
            nodes.setdefault(name, Node(name=name, state=state, up=up, cpus_total=total, cpus_free=free))
    return list(nodes.values())
