"""Running the scheduler's commands on a login node: the ``scheduler_status`` cluster function, the model's view
of its job (``model_job_state``), and the argv builders for submit and cancel."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from compute.scheduler.jobs import DEFAULT_TIMEOUT_S, SACCT_FORMAT, SQUEUE_FORMAT, Job, ModelJobState, Runner
from compute.scheduler.pbs import parse_qstat_full, parse_qstat_json
from compute.scheduler.slurm import parse_sacct, parse_squeue


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
