"""What every scheduler reader returns: jobs and nodes in normalized states, and the small value readers
they share (times, integers, strings)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

JobState = Literal["queued", "held", "starting", "running", "exiting", "finished", "failed", "unknown"]
ModelJobState = Literal["queued", "held", "starting", "gone", "unknown"]
Runner = Callable[[list[str]], tuple[int, str, str]]
"""Runs one command: argv -> (exit status, stdout, stderr). ``run_command`` is the real one."""

SQUEUE_FORMAT = "%i|%j|%T|%u|%P|%N|%V|%S|%r"
"""squeue --format: job id, name, state, user, partition, nodes, submit time, start time, reason."""
SACCT_FORMAT = "JobID,JobName,State,ExitCode,Start,End,NodeList"
"""sacct --format, read with -n -P -X (no header, '|'-separated, allocations only)."""
SINFO_FORMAT = "%N|%T|%C"
"""sinfo --format: node list, state, CPUs as allocated/idle/other/total."""
DEFAULT_TIMEOUT_S = 30.0


@dataclass
class Job:
    """One batch job as the scheduler reports it."""

    job_id: str  # as the scheduler prints it (PBS: the full "123.server" form)
    name: str | None
    state: JobState  # normalized: see the module docstring
    raw_state: str  # as the scheduler prints it: "R", "PENDING", "CANCELLED by 51234"
    queue: str | None = None  # PBS queue, Slurm partition
    user: str | None = None
    nodes: list[str] = field(default_factory=list)  # hostnames, when the scheduler has placed the job
    submit_time: int | None = None  # epoch seconds
    start_time: int | None = None  # epoch seconds; None until it starts (Slurm's estimates are dropped)
    end_time: int | None = None  # epoch seconds, when known (PBS obittime, sacct End)
    exit_status: int | None = None  # PBS Exit_status; Slurm exit code, or 128 + signal
    comment: str | None = None  # PBS comment, Slurm pending reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Node:
    """One compute node as ``pbsnodes`` or ``sinfo`` reports it."""

    name: str
    state: str  # as printed: "job-exclusive", "down,offline", "mixed", "down*", "idle~"
    up: bool  # the node is up (it may be busy): not down, offline, drained, powered off or unreachable
    jobs: list[str] = field(default_factory=list)  # job ids on the node (PBS only: sinfo does not list them)
    cpus_total: int | None = None
    cpus_free: int | None = None  # None when unknown (a sinfo line that groups several nodes)
    comment: str | None = None


_MONTHS = {
    m: i for i, m in enumerate(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)
}
_NO_TIME = {"", "0", "n/a", "none", "unknown", "(null)"}
_ISO_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})$")


def _epoch(value: Any) -> int | None:
    """Epoch seconds from a scheduler time: "Wed Nov 25 10:21:03 2026" (PBS, ctime format),
    "2026-11-25T10:21:03" (Slurm), or a number of seconds; None for N/A, Unknown, None and the like."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value) if value > 0 else None
    text = str(value).strip()
    if text.lower() in _NO_TIME:
        return None
    if text.isdigit():
        return int(text)
    try:
        if m := _ISO_TIME.match(text):
            year, month, day, hour, minute, second = (int(g) for g in m.groups())
        else:  # "Wed Nov 25 10:21:03 2026"; ctime pads a one-digit day with a space, which split() absorbs
            _weekday, mon, day_s, clock, year_s = text.split()
            hour, minute, second = (int(x) for x in clock.split(":"))
            year, month, day = int(year_s), _MONTHS[mon], int(day_s)
        return int(time.mktime((year, month, day, hour, minute, second, 0, 0, -1)))
    except (ValueError, KeyError, OverflowError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _str(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))
