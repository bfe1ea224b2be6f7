"""Read the batch scheduler on an HPC login node: PBS Pro and Slurm.

On a batch cluster a model's vLLM runs inside a batch job: the Globus Compute endpoint's block that ran
``start_vllm`` (which reports the job id). ``scheduler_status`` runs on the cluster's login-node endpoint and
reports what the scheduler says about jobs; ``model_job_state`` turns that into the gateway's model
lifecycle words; ``cancel_command`` ends a job at scale-down. ``submit_command`` and
``parse_submit_output`` are for sites that submit a vLLM job themselves instead. The parsers are pure
functions over the commands' text, tested against recorded outputs in ``tests/fixtures/scheduler``.

Like ``compute.functions``, this module is shipped to endpoints: it uses the standard library only, so it
imports on any endpoint (``compute/__init__.py`` imports nothing), and its results are plain JSON-like
values. Failures come back as values (``"error"``), never as exceptions, so their messages survive any
serializer.

Normalized job states
---------------------

=========  ================================================  ==============================================
state      PBS Pro ``job_state``                             Slurm ``squeue %T`` / ``sacct State``
=========  ================================================  ==============================================
queued     Q; W (waits for its ``-a`` time); T (in transit);  PENDING (other reasons: Priority, Resources,
           S, U (suspended: the scheduler resumes them)       ...); REQUEUED; REQUEUE_FED; SUSPENDED;
                                                              STOPPED
held       H                                                 PENDING with reason JobHeldUser, JobHeldAdmin
                                                              (``JobHeld*``) or DependencyNeverSatisfied;
                                                              REQUEUE_HOLD; RESV_DEL_HOLD
starting   R with substate 41 (PRERUN: sent to the           CONFIGURING (nodes booting or being set up)
           execution host) or 71 (PROVISION)
running    R; B (array job: a subjob has begun)              RUNNING; RESIZING; SIGNALING
exiting    E                                                 COMPLETING; STAGE_OUT
finished   F or X (finished subjob) with Exit_status 0       COMPLETED
failed     F or X with a non-zero Exit_status, or none       FAILED; CANCELLED; TIMEOUT; NODE_FAIL;
           (deleted before it ran)                           PREEMPTED; BOOT_FAIL; DEADLINE;
                                                              OUT_OF_MEMORY; SPECIAL_EXIT
unknown    M (moved to another server); anything else        REVOKED; anything else
=========  ================================================  ==============================================

Slurm's short codes (PD, R, CF, CG, CD, F, CA, TO, NF, ...) are read too. These are the scheduler's
states only: a running job's vLLM may still be loading weights. Whether a model is hot is vLLM's
``/health``, which the caller checks (see ``model_job_state``).

Times are epoch seconds. qstat (``ctime(3)``) and squeue/sacct (``localtime(3)``) print times in the
local time zone of the machine that runs them, so reading them back with the same machine's local time
(``time.mktime``) gives the exact instant; ``scheduler_status`` parses where it runs the commands.
``run_command`` sets ``SLURM_TIME_FORMAT=standard`` so that a user's setting cannot change the format.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# ---- small value readers ----

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


# ---- PBS Pro ----

_PBS_STATES: dict[str, JobState] = {
    "Q": "queued", "W": "queued", "T": "queued", "S": "queued", "U": "queued",
    "H": "held", "R": "running", "B": "running", "E": "exiting", "M": "unknown",
}  # fmt: skip
_PBS_STARTING_SUBSTATES = {41, 71}  # PBS Pro: PRERUN (sent to the execution host), PROVISION
_PBS_ATTR = re.compile(r"^ +(\S+) = (.*)$")
_PBS_NODE_DOWN = {"down", "offline", "state-unknown", "unknown", "stale", "maintenance", "unresolvable", "sleep"}


def normalize_pbs_state(job_state: str, exit_status: int | None = None, substate: int | None = None) -> JobState:
    """PBS ``job_state`` (with ``Exit_status`` and ``substate``) -> normalized state (module docstring)."""
    code = job_state.strip().upper()
    if code in ("F", "X"):
        return "finished" if exit_status == 0 else "failed"
    if code == "R" and substate in _PBS_STARTING_SUBSTATES:
        return "starting"
    return _PBS_STATES.get(code, "unknown")


def _pbs_blocks(text: str, header: str | None) -> list[tuple[str, dict[str, str]]]:
    """Split ``qstat -f`` / ``pbsnodes -a`` text into (name, {attribute: value}).

    A record starts at an unindented line ("Job Id: <id>" for qstat, the node name for pbsnodes); its
    attributes are indented "name = value" lines. qstat wraps values longer than a 78-column line onto
    continuation lines that start with a tab, breaking after a comma where it can and anywhere otherwise,
    so a continuation is joined to the value as it is, without a separator (spaces at either side of the
    break belong to the value).
    """
    blocks: list[tuple[str, dict[str, str]]] = []
    attrs: dict[str, str] | None = None
    key: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t"):
            if attrs is not None and key is not None:
                attrs[key] += line[1:]
            continue
        if line.startswith(" "):
            if attrs is not None and (m := _PBS_ATTR.match(line)):
                key = m.group(1)
                attrs[key] = m.group(2)
            continue
        key = None
        if header is None:
            attrs = {}
            blocks.append((line.strip(), attrs))
        elif line.startswith(header):
            attrs = {}
            blocks.append((line[len(header) :].strip(), attrs))
        else:  # an unexpected unindented line: not part of any record
            attrs = None
    return blocks


def _flatten(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """{"Resource_List": {"ncpus": 64}} (JSON) -> {"Resource_List.ncpus": 64} (as in the text format)."""
    flat: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, Mapping):
            flat.update({f"{k}.{rk}": rv for rk, rv in v.items()})
        else:
            flat[k] = v
    return flat


def _exec_hosts(value: Any) -> list[str]:
    """exec_host "x3005c0s13b0n0/0*64+x3005c0s19b0n0/0*64" -> ["x3005c0s13b0n0", "x3005c0s19b0n0"]."""
    if not value:
        return []
    return _unique(part.strip().split("/", 1)[0] for part in str(value).split("+"))


def _pbs_job(job_id: str, a: Mapping[str, Any]) -> Job:
    raw = str(a.get("job_state") or "").strip()
    exit_status = _int(a.get("Exit_status"))
    owner = _str(a.get("Job_Owner"))
    return Job(
        job_id=job_id,
        name=_str(a.get("Job_Name")),
        state=normalize_pbs_state(raw, exit_status, _int(a.get("substate"))),
        raw_state=raw,
        queue=_str(a.get("queue")),
        user=owner.split("@", 1)[0] if owner else None,
        nodes=_exec_hosts(a.get("exec_host")),
        submit_time=_epoch(a.get("qtime")) or _epoch(a.get("ctime")),
        start_time=_epoch(a.get("stime")),
        end_time=_epoch(a.get("obittime")),
        exit_status=exit_status,
        comment=_str(a.get("comment")),
    )


def _pbs_json(text: str, what: str) -> dict[str, Any]:
    """A PBS ``-F json`` document's ``what`` object ("Jobs", "nodes"); numbers are kept as the text PBS
    printed (PBS prints any value that reads as a number as one: a job named 007 stays "007")."""
    if not text.strip():
        return {}
    doc = json.loads(text, parse_int=str, parse_float=str)  # ValueError on invalid JSON
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    found = doc.get(what) or {}
    if not isinstance(found, dict):
        raise ValueError(f"expected {what!r} to be an object")
    return found


def parse_qstat_full(text: str) -> list[Job]:
    """Parse ``qstat -xf [ids]`` (PBS Pro full text format, wrapped lines included)."""
    return [_pbs_job(job_id, attrs) for job_id, attrs in _pbs_blocks(text, "Job Id:")]


def parse_qstat_json(text: str) -> list[Job]:
    """Parse ``qstat -xf -F json [ids]`` (PBS Pro 19+): {"Jobs": {"123.server": {"job_state": "R", ...}}}.

    Raises ValueError when the text is not valid JSON: PBS escapes values only partly, and a backslash
    in a job's attributes yields an invalid escape (seen on Polaris: argonne-lcf/balsam#324).
    """
    jobs = _pbs_json(text, "Jobs")
    return [_pbs_job(job_id, _flatten(attrs)) for job_id, attrs in jobs.items() if isinstance(attrs, Mapping)]


def _pbs_node(name: str, a: Mapping[str, Any]) -> Node:
    state = _str(a.get("state")) or "unknown"
    jobs = a.get("jobs") or []
    if isinstance(jobs, str):  # text: "123.server/0, 123.server/1"; JSON: ["123.server"]
        jobs = jobs.split(",")
    total = _int(a.get("resources_available.ncpus"))
    assigned = _int(a.get("resources_assigned.ncpus")) or 0  # JSON leaves out zero values
    return Node(
        name=name,
        state=state,
        up=not any(s.strip() in _PBS_NODE_DOWN for s in state.split(",")),
        jobs=_unique(str(j).strip().split("/", 1)[0] for j in jobs),
        cpus_total=total,
        cpus_free=None if total is None else total - assigned,
        comment=_str(a.get("comment")),
    )


def parse_pbsnodes(text: str) -> list[Node]:
    """Parse ``pbsnodes -a`` (text)."""
    return [_pbs_node(name, attrs) for name, attrs in _pbs_blocks(text, None)]


def parse_pbsnodes_json(text: str) -> list[Node]:
    """Parse ``pbsnodes -a -F json``: {"nodes": {"x3005c0s13b0n0": {"state": ..., "jobs": [...]}}}."""
    nodes = _pbs_json(text, "nodes")
    return [_pbs_node(name, _flatten(attrs)) for name, attrs in nodes.items() if isinstance(attrs, Mapping)]


# ---- Slurm ----

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


# ---- the cluster function ----


def run_command(argv: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, str, str]:
    """Run one scheduler command (no shell) -> (exit status, stdout, stderr); never raises.

    A missing command answers 127, a command that could not start 126, and one that ran past
    ``timeout_s`` 124 (it is killed), each with a message on stderr.
    """
    argv = [str(a) for a in argv]
    env = {**os.environ, "SLURM_TIME_FORMAT": "standard"}
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout_s,
            stdin=subprocess.DEVNULL, env=env, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]}: no answer within {timeout_s:g} s"
    except OSError as exc:
        return 126, "", f"{argv[0]}: {exc}"
    return proc.returncode, proc.stdout, proc.stderr


_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\[\]+-]*$")


def _check_ids(job_ids: Sequence[str]) -> list[str]:
    if isinstance(job_ids, str) or not all(isinstance(i, str) for i in job_ids):
        raise TypeError("job_ids must be a list of strings")
    bad = [i for i in job_ids if not _ID_OK.match(i)]
    if bad:  # an id like "-x" would be read as an option; a comma would split Slurm's --jobs list
        raise ValueError(f"invalid job ids: {bad}")
    return list(dict.fromkeys(job_ids))


def _pbs_same_job(requested: str, reported: str) -> bool:
    """Ids "8412345" and "8412345.polaris-pbs-01" name the job qstat prints as "8412345.polaris-pbs-01.hsn..."."""
    return reported == requested or reported.startswith(requested + ".")


def _assign(ids: Sequence[str], jobs: Sequence[Job], same: Callable[[str, str], bool]) -> dict[str, Job]:
    """The job each requested id names: an exact match first, then one that ``same`` accepts."""
    found = {}
    for i in ids:
        job = next((j for j in jobs if j.job_id == i), None) or next((j for j in jobs if same(i, j.job_id)), None)
        if job is not None:
            found[i] = job
    return found


def _failure(argv: Sequence[str], rc: int, stderr: str) -> str:
    return f"`{' '.join(argv[:4])}` exited {rc}: {stderr.strip()[-2000:] or '(no message)'}"


def _qstat(run: Runner, ids: Sequence[str], as_json: bool) -> tuple[list[Job] | None, list[str], str | None]:
    """One qstat call -> (jobs, ids qstat calls unknown, error); jobs is None when the output is unreadable."""
    argv = ["qstat", "-xf", *(["-F", "json"] if as_json else []), *ids]
    rc, out, err = run(argv)
    unknown, problems = [], []
    for line in err.splitlines():
        if m := re.match(r"^qstat: Unknown Job Id (\S+)\s*$", line.strip()):
            unknown.append(m.group(1))  # unknown, or gone from the history (job_history_duration)
        elif line.strip():
            problems.append(line.strip())
    error = _failure(argv, rc, "\n".join(problems)) if rc != 0 and (problems or not unknown) else None
    try:
        jobs = parse_qstat_json(out) if as_json else parse_qstat_full(out)
    except ValueError as exc:
        return None, unknown, error or f"`{' '.join(argv[:4])}` printed unreadable output: {exc}"
    return jobs, unknown, error


def _pbs_status(ids: list[str], run: Runner, result: dict[str, Any]) -> None:
    jobs, unknown, error = _qstat(run, ids, as_json=True)
    as_text = jobs is None or (error is not None and not jobs)
    if as_text:
        # Invalid JSON (PBS leaves some backslashes unescaped) or a qstat without -F json (PBS < 19):
        # the text format says the same.
        jobs, unknown, error = _qstat(run, ids, as_json=False)
    found = _assign(ids, jobs or [], _pbs_same_job)

    def named_unknown(i: str) -> bool:
        return any(_pbs_same_job(i, u) or _pbs_same_job(u, i) for u in unknown)

    rest = [i for i in ids if i not in found and not named_unknown(i)]
    if rest and error is None and not as_text:  # -F json can leave jobs out silently (openpbs/openpbs#2672)
        more, more_unknown, error = _qstat(run, rest, as_json=False)
        found.update(_assign(rest, more or [], _pbs_same_job))
        unknown += more_unknown
    result["jobs"] = {i: found[i].to_dict() for i in ids if i in found}
    result["missing"] = [i for i in ids if i not in found and (error is None or named_unknown(i))]
    result["error"] = error


def _slurm_status(ids: list[str], run: Runner, result: dict[str, Any]) -> None:
    argv = ["squeue", "--noheader", f"--format={SQUEUE_FORMAT}", "--states=all", "--array", f"--jobs={','.join(ids)}"]
    rc, out, err = run(argv)
    if rc != 0 and "Invalid job id specified" not in err:  # that one: a single id slurmctld no longer holds
        result["error"] = _failure(argv, rc, err)
        return
    found = _assign(ids, parse_squeue(out) if rc == 0 else [], lambda requested, reported: False)
    rest = [i for i in ids if i not in found]
    if rest:  # gone from the queue: accounting knows how it ended
        argv = ["sacct", "-n", "-P", "-X", "-j", ",".join(rest), f"--format={SACCT_FORMAT}"]
        rc, out, err = run(argv)
        if rc == 0:
            found.update(_assign(rest, parse_sacct(out), lambda requested, reported: False))
        else:
            result["error"] = _failure(argv, rc, err)
    result["jobs"] = {i: found[i].to_dict() for i in ids if i in found}
    result["missing"] = [i for i in ids if i not in found]


def scheduler_status(
    kind: str, job_ids: list[str], run: Runner | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """What the scheduler says about ``job_ids``; the cluster function the gateway's status checks call.

    kind: "pbs" or "slurm". run: runs one command, argv -> (exit status, stdout, stderr); by default
    ``run_command`` with ``timeout_s``. Returns, as JSON-like values, never raising::

        {"jobs": {requested id: Job fields}, "missing": [ids], "error": None or a message}

    PBS: ``qstat -xf -F json IDS`` (history included, so finished jobs are found until the server's
    job_history_duration drops them); if that output is not valid JSON, or qstat has no ``-F json``, the
    same question in the text format; ids the JSON left out silently are asked again in text. An id may be
    short ("8412345"): it is matched to qstat's full "8412345.server..." form. Slurm: ``squeue`` (all
    states, array tasks one per line); ids it does not list are looked up with ``sacct``.

    ``missing`` lists ids the scheduler does not know (PBS: "Unknown Job Id"; Slurm: in neither squeue nor
    sacct). ``error`` is set when a command failed; then ``jobs`` and ``missing`` hold only what is known:
    if qstat or squeue failed, the other ids are in neither. If only sacct failed, ids absent from squeue
    are still listed as missing: they have left the queue, and only how they ended is unknown.
    """
    result: dict[str, Any] = {"jobs": {}, "missing": [], "error": None}
    try:
        ids = _check_ids(job_ids)
        if kind not in ("pbs", "slurm"):
            raise ValueError(f"unknown scheduler kind {kind!r}: expected 'pbs' or 'slurm'")
        if ids:
            runner: Runner = run or functools.partial(run_command, timeout_s=timeout_s)
            (_pbs_status if kind == "pbs" else _slurm_status)(ids, runner, result)
    except Exception as exc:  # a failure travels as a value
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


_MODEL_STATES: dict[str, ModelJobState] = {
    "queued": "queued",
    "held": "held",
    "starting": "starting",
    "running": "starting",
    "exiting": "gone",
    "finished": "gone",
    "failed": "gone",
}


def model_job_state(job: Mapping[str, Any] | Job | None) -> ModelJobState:
    """A model's lifecycle word, from its job as ``scheduler_status`` reports it (None: the job is missing).

    - ``queued``: waiting for nodes.
    - ``held``: waiting, but it will not start until someone releases it (a user or admin hold, or a
      dependency that can never be met), so waiting on it is pointless: report it, or submit anew.
    - ``starting``: the job runs (or its nodes are being set up); vLLM may not answer yet. Whether the
      model is hot is vLLM's ``/health``, which the caller checks.
    - ``gone``: the job is ending, has ended (finished or failed), or the scheduler no longer knows it: a new
      warm-up needs a new job.
    - ``unknown``: the scheduler reports a state this module does not map (e.g. a PBS job moved to
      another server); neither route to it nor resubmit on its account.
    """
    if job is None:
        return "gone"
    state = job.state if isinstance(job, Job) else job.get("state")
    return _MODEL_STATES.get(str(state), "unknown")


# ---- submit and cancel ----


def _check_kind(kind: str) -> None:
    if kind not in ("pbs", "slurm"):
        raise ValueError(f"unknown scheduler kind {kind!r}: expected 'pbs' or 'slurm'")


def _walltime(kind: str, walltime: str | int | None) -> str | None:
    """Seconds -> "HH:MM:SS" (PBS; hours may pass 24) or "D-HH:MM:SS" from a day on (Slurm); text as is."""
    if walltime is None:
        return None
    if isinstance(walltime, bool) or not isinstance(walltime, int | str):
        raise TypeError("walltime must be seconds (int) or the scheduler's own text, e.g. '06:00:00'")
    if isinstance(walltime, str):
        if not walltime.strip() or any(c.isspace() for c in walltime.strip()):
            raise ValueError(f"invalid walltime {walltime!r}")
        return walltime.strip()
    if walltime <= 0:
        raise ValueError(f"walltime must be positive, got {walltime}")
    minutes, seconds = divmod(walltime, 60)
    hours, minutes = divmod(minutes, 60)
    if kind == "slurm" and hours >= 24:
        days, hours = divmod(hours, 24)
        return f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def submit_command(
    kind: str,
    script_path: str | os.PathLike[str],
    name: str,
    queue: str | None = None,
    account: str | None = None,
    walltime: str | int | None = None,
) -> list[str]:
    """argv that submits ``script_path`` as job ``name``: qsub (PBS) or ``sbatch --parsable`` (Slurm).

    queue is the PBS queue or Slurm partition; account the PBS project (-A) or Slurm account; walltime
    seconds or the scheduler's own text. ``parse_submit_output`` reads the job id from its stdout.
    """
    _check_kind(kind)
    if not name or any(c.isspace() for c in name) or name.startswith("-"):
        raise ValueError(f"invalid job name {name!r}")
    script = os.fspath(script_path)
    if not script or script.startswith("-"):
        raise ValueError(f"invalid script path {script!r}")
    wall = _walltime(kind, walltime)
    if kind == "pbs":
        argv = ["qsub", "-N", name]
        argv += ["-q", queue] if queue else []
        argv += ["-A", account] if account else []
        argv += ["-l", f"walltime={wall}"] if wall else []
    else:
        argv = ["sbatch", "--parsable", f"--job-name={name}"]
        argv += [f"--partition={queue}"] if queue else []
        argv += [f"--account={account}"] if account else []
        argv += [f"--time={wall}"] if wall else []
    return [*argv, script]


def cancel_command(kind: str, job_id: str) -> list[str]:
    """argv that cancels a job: qdel (PBS) or scancel (Slurm)."""
    _check_kind(kind)
    (job_id,) = _check_ids([job_id])
    return ["qdel" if kind == "pbs" else "scancel", job_id]


_PBS_SUBMITTED = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?$")
_SLURM_SUBMITTED = re.compile(r"^(?:Submitted batch job )?(\d+)(?:;\S+)?$")


def parse_submit_output(kind: str, stdout: str) -> str:
    """The job id from qsub's stdout ("8412345.polaris-pbs-01...") or ``sbatch --parsable``'s ("31245678",
    or "31245678;cluster" in a federation). Raises ValueError when there is none."""
    _check_kind(kind)
    for line in reversed([ln.strip() for ln in stdout.splitlines() if ln.strip()]):
        if kind == "pbs" and _PBS_SUBMITTED.match(line):
            return line
        if kind == "slurm" and (m := _SLURM_SUBMITTED.match(line)):
            return m.group(1)
    raise ValueError(f"no {kind} job id in the submit output {stdout[:200]!r}")
