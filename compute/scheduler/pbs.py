"""PBS Pro: job states, and the parsers over ``qstat -f`` (text or JSON) and ``pbsnodes``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from compute.scheduler.jobs import Job, JobState, Node, _epoch, _int, _str, _unique

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
