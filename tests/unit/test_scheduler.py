"""compute.scheduler: parsers over recorded PBS Pro / Slurm outputs, the status cluster function, argv builders.

The fixtures (tests/fixtures/scheduler, see its README) are synthesized to match real outputs; their times
are the login node's local time, read here in US Central time as on Polaris.
"""

from __future__ import annotations

import calendar
import json
import shutil
import time
from pathlib import Path

import pytest

from compute.scheduler import (
    SACCT_FORMAT,
    SQUEUE_FORMAT,
    Job,
    cancel_command,
    expand_hostlist,
    model_job_state,
    normalize_pbs_state,
    normalize_slurm_state,
    parse_pbsnodes,
    parse_pbsnodes_json,
    parse_qstat_full,
    parse_qstat_json,
    parse_sacct,
    parse_sinfo,
    parse_squeue,
    parse_submit_output,
    run_command,
    scheduler_status,
    submit_command,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scheduler"
S = "polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
PBS_IDS = [f"{n}.{S}" for n in ("8412301", "8412302", "8412345", "8412346", "8412347", "8412348", "8412350[]")]
UNKNOWN_PBS = f"8400001.{S}"
SQUEUE_IDS = ["31245676", "31245677", "31245678", "31245679", "31245680", "31245681", "31245682", "31245683"]
SQUEUE_IDS += ["31245690_1", "31245690_2"]
SACCT_IDS = ["31245601", "31245602", "31245603", "31245604", "31245605", "31245610_3", "31999999"]


def fixture(path: str) -> str:
    return (FIXTURES / path).read_text()


def cst(hh: int, mm: int, ss: int) -> int:
    """Epoch seconds of 2026-11-25 hh:mm:ss US Central Standard Time (UTC-6)."""
    return calendar.timegm((2026, 11, 25, hh + 6, mm, ss))


@pytest.fixture(autouse=True)
def central_time(monkeypatch: pytest.MonkeyPatch):
    """The fixtures' local times are the login node's: US Central, like Polaris (POSIX rule: no tzdata)."""
    monkeypatch.setenv("TZ", "CST6CDT,M3.2.0,M11.1.0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class RecordedScheduler:
    """A stand-in for a login node's PBS or Slurm commands: replays outputs recorded under
    tests/fixtures/scheduler, because no PBS or Slurm exists where these tests run.

    ``replies`` maps an exact argv to (exit status, stdout fixture path or None, stderr fixture path, text
    or None). Every call is kept in ``calls``; an argv with no recording answers like a missing command.
    """

    def __init__(self, replies: dict[tuple[str, ...], tuple[int, str | None, str | None]]) -> None:
        self.replies = replies
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        if tuple(argv) not in self.replies:
            return 127, "", f"RecordedScheduler: nothing recorded for {argv}"
        rc, out, err = self.replies[tuple(argv)]
        stderr = fixture(err) if err and err.endswith(".stderr") else (err or "")
        return rc, fixture(out) if out else "", stderr


def qstat_argv(ids: list[str], as_json: bool = True) -> tuple[str, ...]:
    return ("qstat", "-xf", *(("-F", "json") if as_json else ()), *ids)


def squeue_argv(ids: list[str]) -> tuple[str, ...]:
    return ("squeue", "--noheader", f"--format={SQUEUE_FORMAT}", "--states=all", "--array", f"--jobs={','.join(ids)}")


def sacct_argv(ids: list[str]) -> tuple[str, ...]:
    return ("sacct", "-n", "-P", "-X", "-j", ",".join(ids), f"--format={SACCT_FORMAT}")


# ---- PBS parsers ----


def test_cst_helper_matches_a_hand_computed_instant():
    assert cst(10, 21, 3) == 1795623663  # 2026-11-25T16:21:03Z


def test_qstat_full_reads_every_job():
    jobs = {j.job_id: j for j in parse_qstat_full(fixture("pbs/qstat_xf.txt"))}
    assert list(jobs) == PBS_IDS
    summary = {jid.split(".")[0]: (j.name, j.state, j.raw_state, j.nodes, j.exit_status) for jid, j in jobs.items()}
    assert summary == {
        "8412301": ("vllm-llama3-8b", "finished", "F", ["x3005c0s25b0n0"], 0),
        "8412302": ("vllm-deepseek-v3", "failed", "F", ["x3006c0s19b1n0", "x3006c0s31b0n0"], 1),
        "8412345": ("vllm-llama3-8b", "running", "R", ["x3005c0s13b0n0"], None),
        "8412346": ("vllm-mixtral-8x22b", "queued", "Q", [], None),
        "8412347": ("vllm-qwen2-72b", "held", "H", [], None),
        "8412348": ("vllm-llama3-70b", "starting", "R", ["x3005c0s19b0n0", "x3005c0s1b0n0"], None),
        "8412350[]": ("vllm-sweep", "running", "B", [], None),
    }
    assert {(j.user, j.queue) for j in jobs.values()} == {("firstsvc", "demand")}


def test_qstat_full_times():
    jobs = {j.job_id.split(".")[0]: j for j in parse_qstat_full(fixture("pbs/qstat_xf.txt"))}
    done = jobs["8412301"]
    assert (done.submit_time, done.start_time, done.end_time) == (cst(7, 58, 30), cst(8, 2, 11), cst(10, 2, 15))
    running = jobs["8412345"]
    assert (running.submit_time, running.start_time, running.end_time) == (cst(10, 20, 41), cst(10, 21, 3), None)
    queued = jobs["8412346"]  # its estimated.start_time is an estimate, not a start
    assert (queued.submit_time, queued.start_time) == (cst(10, 23, 2), None)


def test_qstat_full_joins_wrapped_lines():
    text = fixture("pbs/qstat_xf.txt")
    assert "ncpus=64:ngpus=\n\t4) and finished" in text  # the recorded output wraps this comment mid-word
    jobs = {j.job_id.split(".")[0]: j for j in parse_qstat_full(text)}
    assert jobs["8412301"].comment == "Job run at Wed Nov 25 at 08:02 on (x3005c0s25b0n0:ncpus=64:ngpus=4) and finished"
    assert jobs["8412302"].comment == (
        "Job run at Wed Nov 25 at 09:10 on (x3006c0s19b1n0:ncpus=64:ngpus=4)+(x3006c0s31b0n0:ncpus=64:ngpus=4)"
        " and failed"
    )
    assert jobs["8412346"].comment == "Not Running: Insufficient amount of resource: ngpus (R: 8 A: 4 T: 2240)"


def test_qstat_full_keeps_spaces_at_a_wrap():
    text = (
        "Job Id: 7.pbs01\n    Job_Name = a\n    job_state = Q\n"
        "    comment = Not Running: Insufficient amount of resource: ngpus (R: 4 A: \n\t0 T: 8)\n"
        "    Exit_status = \n\n"
    )
    (job,) = parse_qstat_full(text)
    assert job.comment == "Not Running: Insufficient amount of resource: ngpus (R: 4 A: 0 T: 8)"
    assert (job.job_id, job.state, job.exit_status) == ("7.pbs01", "queued", None)


def test_qstat_json_and_text_give_the_same_jobs():
    from_json = parse_qstat_json(fixture("pbs/qstat_xf.json"))
    from_text = parse_qstat_full(fixture("pbs/qstat_xf.txt"))
    assert len(from_json) == 7
    assert from_json == from_text
    assert parse_qstat_json("") == parse_qstat_full("") == []


def test_qstat_json_invalid_escape_raises_and_text_reads_it():
    with pytest.raises(ValueError, match="escape"):
        parse_qstat_json(fixture("pbs/qstat_xf_8412360.json"))
    (job,) = parse_qstat_full(fixture("pbs/qstat_xf_8412360.txt"))
    assert (job.job_id, job.state, job.nodes, job.start_time) == (
        f"8412360.{S}",
        "running",
        ["x3006c0s25b1n0"],
        cst(10, 25, 40),
    )


def test_qstat_json_keeps_numbers_as_printed():
    doc = '{"timestamp":1,"Jobs":{"9.pbs01":{"Job_Name":007,"job_state":"F","Exit_status":-2,"substate":92}}}'
    doc = doc.replace("007", '"007"')  # PBS prints a leading-zero value as a string
    (job,) = parse_qstat_json(doc)
    assert (job.name, job.state, job.exit_status) == ("007", "failed", -2)
    (job,) = parse_qstat_json('{"Jobs":{"9.pbs01":{"Job_Name":123,"job_state":"R","substate":71}}}')
    assert (job.name, job.state) == ("123", "starting")
    assert parse_qstat_json('{"timestamp":1,"pbs_version":"2022.1.1","pbs_server":"pbs01"}') == []


@pytest.mark.parametrize(
    ("raw", "exit_status", "substate", "expected"),
    [
        ("Q", None, 10, "queued"),
        ("W", None, 30, "queued"),
        ("T", None, None, "queued"),
        ("S", None, 43, "queued"),
        ("H", None, 20, "held"),
        ("R", None, 42, "running"),
        ("R", None, 41, "starting"),
        ("R", None, 71, "starting"),
        ("B", None, None, "running"),
        ("E", None, 50, "exiting"),
        ("F", 0, 92, "finished"),
        ("F", 271, 92, "failed"),
        ("F", None, 92, "failed"),
        ("X", 0, None, "finished"),
        ("X", -29, None, "failed"),
        ("M", None, None, "unknown"),
        ("Z", None, None, "unknown"),
    ],
)
def test_normalize_pbs_state(raw, exit_status, substate, expected):
    assert normalize_pbs_state(raw, exit_status, substate) == expected


def test_pbsnodes_text_and_json():
    nodes = parse_pbsnodes(fixture("pbs/pbsnodes_a.txt"))
    assert nodes == parse_pbsnodes_json(fixture("pbs/pbsnodes_a.json"))
    by_name = {n.name: n for n in nodes}
    assert list(by_name) == [
        "x3005c0s13b0n0",
        "x3005c0s19b0n0",
        "x3005c0s1b0n0",
        "x3006c0s7b0n0",
        "x3006c0s1b0n0",
        "x3007c0s31b0n0",
        "x3008c0s1b0n0",
    ]
    busy = by_name["x3005c0s13b0n0"]  # 64 "jobid/slot" entries in the text: one job
    assert (busy.state, busy.up, busy.jobs, busy.cpus_total, busy.cpus_free) == (
        "job-exclusive",
        True,
        [f"8412345.{S}"],
        64,
        0,
    )
    assert by_name["x3006c0s7b0n0"].jobs == [f"8412350[1].{S}"]
    free = by_name["x3006c0s1b0n0"]
    assert (free.state, free.up, free.jobs, free.cpus_free) == ("free", True, [], 64)
    offline = by_name["x3007c0s31b0n0"]
    assert (offline.state, offline.up) == ("down,offline", False)
    assert offline.comment == "offlined by ops: XID 79 GPU fell off the bus (INC0041233)"
    assert by_name["x3008c0s1b0n0"].up is False


# ---- Slurm parsers ----


def test_squeue():
    jobs = {j.job_id: j for j in parse_squeue(fixture("slurm/squeue.txt"))}
    assert sorted(jobs) == sorted(SQUEUE_IDS)
    summary = {jid: (j.state, j.raw_state, j.nodes, j.comment, j.exit_status) for jid, j in jobs.items()}
    assert summary == {
        "31245680": ("queued", "PENDING", [], "Resources", None),
        "31245683": ("queued", "PENDING", [], "Priority", None),
        "31245690_2": ("queued", "PENDING", [], "JobArrayTaskLimit", None),
        "31245681": ("held", "PENDING", [], "JobHeldUser", None),
        "31245682": ("starting", "CONFIGURING", ["nid001012"], None, None),
        "31245678": ("running", "RUNNING", ["nid001004"], None, None),
        "31245679": ("running", "RUNNING", ["nid001008", "nid001009"], None, None),
        "31245690_1": ("running", "RUNNING", ["nid001013"], None, None),
        "31245677": ("exiting", "COMPLETING", ["nid001005"], None, None),
        "31245676": ("finished", "COMPLETED", ["nid001006"], None, 0),
    }
    running = jobs["31245678"]
    assert (running.name, running.user, running.queue) == ("vllm-llama3-8b", "firstsvc", "gpu")
    assert (running.submit_time, running.start_time, running.end_time) == (cst(10, 20, 41), cst(10, 21, 3), None)
    assert jobs["31245680"].start_time is None  # %S of a pending job is an estimate (12:00:00)
    assert jobs["31245681"].submit_time == cst(10, 23, 40)


def test_squeue_odd_lines():
    text = (
        "CLUSTER: polaris\n"
        "77|a|b|c|PENDING|bob|debug||2026-11-25T10:00:00|N/A|(JobHeldAdmin)\n"
        "78|x|PENDING|bob|debug|(null)|2026-11-25T10:00:00|N/A|(DependencyNeverSatisfied)\n"
    )
    first, second = parse_squeue(text)
    assert (first.job_id, first.name, first.state, first.comment) == ("77", "a|b|c", "held", "JobHeldAdmin")
    assert (second.state, second.nodes, second.comment) == ("held", [], "DependencyNeverSatisfied")
    with pytest.raises(ValueError, match="squeue"):
        parse_squeue("31245678 vllm RUNNING\n")


def test_sacct():
    jobs = {j.job_id: j for j in parse_sacct(fixture("slurm/sacct.txt"))}
    summary = {jid: (j.name, j.state, j.raw_state, j.nodes, j.exit_status) for jid, j in jobs.items()}
    assert summary == {
        "31245601": ("vllm-llama3-8b", "finished", "COMPLETED", ["nid001004"], 0),
        "31245602": ("vllm-deepseek-v3", "failed", "FAILED", ["nid001016", "nid001017"], 1),
        "31245603": ("vllm-llama3-70b", "failed", "TIMEOUT", ["nid001020", "nid001021"], 0),
        "31245604": ("vllm-mistral-7b", "failed", "CANCELLED by 51234", ["nid001006"], 143),  # SIGTERM
        "31245605": ("vllm-qwen2-7b", "failed", "CANCELLED by 51234", [], None),  # cancelled while pending
        "31245610_3": ("vllm-sweep", "finished", "COMPLETED", ["nid001013"], 0),
    }
    failed = jobs["31245602"]
    assert (failed.start_time, failed.end_time) == (cst(9, 10, 5), cst(9, 13, 47))
    never_ran = jobs["31245605"]
    assert (never_ran.start_time, never_ran.end_time) == (None, cst(9, 41, 30))
    steps = "31245601|vllm|COMPLETED|0:0|None|None|nid001004\n31245601.batch|batch|COMPLETED|0:0|None|None|nid001004\n"
    assert [j.job_id for j in parse_sacct(steps)] == ["31245601"]


def test_sinfo():
    nodes = {n.name: n for n in parse_sinfo(fixture("slurm/sinfo.txt"))}
    assert len(nodes) == 20
    assert {name for name, n in nodes.items() if not n.up} == {"nid001024", "nid001025", "nid001026", "nid001027"}
    assert (nodes["nid001024"].state, nodes["nid001024"].cpus_total, nodes["nid001024"].cpus_free) == ("down*", 64, 0)
    assert (nodes["nid001027"].state, nodes["nid001027"].cpus_free) == ("idle~", 64)  # powered off
    assert (nodes["nid001028"].up, nodes["nid001028"].cpus_total, nodes["nid001028"].cpus_free) == (True, 64, 32)
    assert (nodes["nid001004"].state, nodes["nid001004"].cpus_total) == ("allocated", None)  # a group of 6
    assert nodes["nid001025"].state == "drained"


@pytest.mark.parametrize(
    ("expr", "hosts"),
    [
        ("nid001004", ["nid001004"]),
        ("nid[001008-001009]", ["nid001008", "nid001009"]),
        ("nid[001006,001016-001017],login1", ["nid001006", "nid001016", "nid001017", "login1"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("", []),
        ("None assigned", []),
        ("(null)", []),
    ],
)
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        ("PENDING", "Priority", "queued"),
        ("PENDING", "(Resources)", "queued"),
        ("PENDING", "JobHeldUser", "held"),
        ("PD", "(JobHeldAdmin)", "held"),
        ("REQUEUE_HOLD", None, "held"),
        ("CONFIGURING", None, "starting"),
        ("RUNNING", "None", "running"),
        ("R", None, "running"),
        ("COMPLETING", None, "exiting"),
        ("COMPLETED", None, "finished"),
        ("FAILED", None, "failed"),
        ("CANCELLED by 51234", None, "failed"),
        ("CANCELLED+", None, "failed"),
        ("TIMEOUT", None, "failed"),
        ("NODE_FAIL", None, "failed"),
        ("PREEMPTED", None, "failed"),
        ("OUT_OF_MEMORY", None, "failed"),
        ("SUSPENDED", None, "queued"),
        ("REVOKED", None, "unknown"),
        ("", None, "unknown"),
    ],
)
def test_normalize_slurm_state(state, reason, expected):
    assert normalize_slurm_state(state, reason) == expected


# ---- scheduler_status with recorded outputs ----


def test_pbs_status_reports_known_and_unknown_jobs():
    ids = [*PBS_IDS, UNKNOWN_PBS]
    run = RecordedScheduler({qstat_argv(ids): (153, "pbs/qstat_xf.json", "pbs/qstat_unknown_job.stderr")})
    result = scheduler_status("pbs", ids, run=run)
    assert run.calls == [list(qstat_argv(ids))]
    assert result["error"] is None
    assert result["missing"] == [UNKNOWN_PBS]
    assert list(result["jobs"]) == PBS_IDS
    states = {jid.split(".")[0]: job["state"] for jid, job in result["jobs"].items()}
    assert states == {
        "8412301": "finished",
        "8412302": "failed",
        "8412345": "running",
        "8412346": "queued",
        "8412347": "held",
        "8412348": "starting",
        "8412350[]": "running",
    }
    assert result["jobs"][f"8412345.{S}"] == {
        "job_id": f"8412345.{S}",
        "name": "vllm-llama3-8b",
        "state": "running",
        "raw_state": "R",
        "queue": "demand",
        "user": "firstsvc",
        "nodes": ["x3005c0s13b0n0"],
        "submit_time": cst(10, 20, 41),
        "start_time": cst(10, 21, 3),
        "end_time": None,
        "exit_status": None,
        "comment": "Job run at Wed Nov 25 at 10:21 on (x3005c0s13b0n0:ncpus=64:ngpus=4)",
    }
    assert json.loads(json.dumps(result)) == result  # plain JSON values


def test_pbs_status_matches_short_ids():
    ids = ["8412345", "8412346.polaris-pbs-01"]
    run = RecordedScheduler({qstat_argv(ids): (0, "pbs/qstat_xf.json", None)})
    result = scheduler_status("pbs", ids, run=run)
    assert result["error"] is None and result["missing"] == []
    assert {k: v["job_id"] for k, v in result["jobs"].items()} == {
        "8412345": f"8412345.{S}",
        "8412346.polaris-pbs-01": f"8412346.{S}",
    }


def test_pbs_status_falls_back_to_text_when_json_is_invalid():
    ids = [f"8412360.{S}"]
    run = RecordedScheduler(
        {
            qstat_argv(ids): (0, "pbs/qstat_xf_8412360.json", None),
            qstat_argv(ids, as_json=False): (0, "pbs/qstat_xf_8412360.txt", None),
        }
    )
    result = scheduler_status("pbs", ids, run=run)
    assert run.calls == [list(qstat_argv(ids)), list(qstat_argv(ids, as_json=False))]
    assert result["error"] is None and result["missing"] == []
    assert result["jobs"][ids[0]]["state"] == "running"
    assert result["jobs"][ids[0]]["nodes"] == ["x3006c0s25b1n0"]


def test_pbs_status_asks_again_for_jobs_the_json_left_out():
    ids = [*PBS_IDS, f"8412360.{S}"]  # the JSON answer holds only the first seven, without a word on stderr
    run = RecordedScheduler(
        {
            qstat_argv(ids): (0, "pbs/qstat_xf.json", None),
            qstat_argv([f"8412360.{S}"], as_json=False): (0, "pbs/qstat_xf_8412360.txt", None),
        }
    )
    result = scheduler_status("pbs", ids, run=run)
    assert len(run.calls) == 2
    assert result["error"] is None and result["missing"] == []
    assert list(result["jobs"]) == ids


def test_pbs_status_without_json_support_reads_text():
    ids = PBS_IDS[:2]
    usage = "qstat: invalid option -- 'F'\nusage:\n\tqstat [-f] [-J] [-p] [-t] [-x] [-E] [ job_identifier... ]\n"
    run = RecordedScheduler(
        {
            qstat_argv(ids): (2, None, usage),
            qstat_argv(ids, as_json=False): (0, "pbs/qstat_xf.txt", None),  # holds these two and more
        }
    )
    result = scheduler_status("pbs", ids, run=run)
    assert result["error"] is None
    assert {k: v["state"] for k, v in result["jobs"].items()} == {ids[0]: "finished", ids[1]: "failed"}


def test_pbs_status_server_down_is_an_error_value():
    ids = PBS_IDS[:1]
    run = RecordedScheduler(
        {
            qstat_argv(ids): (1, None, "pbs/qstat_no_server.stderr"),
            qstat_argv(ids, as_json=False): (1, None, "pbs/qstat_no_server.stderr"),
        }
    )
    result = scheduler_status("pbs", ids, run=run)
    assert result["jobs"] == {} and result["missing"] == []  # unknown, not missing
    assert "cannot connect to server" in result["error"] and "exited 1" in result["error"]


def test_slurm_status_uses_squeue_then_sacct():
    ids = [*SQUEUE_IDS, *SACCT_IDS]
    run = RecordedScheduler(
        {
            squeue_argv(ids): (0, "slurm/squeue.txt", None),
            sacct_argv(SACCT_IDS): (0, "slurm/sacct.txt", None),
        }
    )
    result = scheduler_status("slurm", ids, run=run)
    assert run.calls == [list(squeue_argv(ids)), list(sacct_argv(SACCT_IDS))]
    assert result["error"] is None
    assert result["missing"] == ["31999999"]
    assert list(result["jobs"]) == ids[:-1]
    assert {k: v["state"] for k, v in result["jobs"].items() if k in SACCT_IDS} == {
        "31245601": "finished",
        "31245602": "failed",
        "31245603": "failed",
        "31245604": "failed",
        "31245605": "failed",
        "31245610_3": "finished",
    }
    assert result["jobs"]["31245602"]["exit_status"] == 1
    assert result["jobs"]["31245681"]["state"] == "held"
    assert json.loads(json.dumps(result)) == result


def test_slurm_status_single_unknown_id():
    run = RecordedScheduler(
        {
            squeue_argv(["31999999"]): (1, None, "slurm/squeue_invalid_job.stderr"),
            sacct_argv(["31999999"]): (0, None, None),
        }
    )
    assert scheduler_status("slurm", ["31999999"], run=run) == {"jobs": {}, "missing": ["31999999"], "error": None}


def test_slurm_status_controller_down():
    run = RecordedScheduler({squeue_argv(["31245678"]): (1, None, "slurm/squeue_no_controller.stderr")})
    result = scheduler_status("slurm", ["31245678"], run=run)
    assert len(run.calls) == 1  # sacct is not asked
    assert result["jobs"] == {} and result["missing"] == []
    assert "Unable to contact slurm controller" in result["error"]


def test_slurm_status_sacct_down_keeps_what_squeue_said():
    ids = ["31245678", "31245601"]
    run = RecordedScheduler(
        {
            squeue_argv(ids): (0, "slurm/squeue.txt", None),
            sacct_argv(["31245601"]): (1, None, "slurm/sacct_no_dbd.stderr"),
        }
    )
    result = scheduler_status("slurm", ids, run=run)
    assert list(result["jobs"]) == ["31245678"]
    assert result["missing"] == ["31245601"]  # it left the queue; how it ended is unknown
    assert "Problem talking to the database" in result["error"]


def test_status_rejects_bad_input_without_running_anything():
    run = RecordedScheduler({})
    assert scheduler_status("slurm", [], run=run) == {"jobs": {}, "missing": [], "error": None}
    bad = scheduler_status("pbs", ["-u", "root"], run=run)
    assert bad["jobs"] == {} and "invalid job ids" in bad["error"]
    assert "invalid job ids: ['1,2']" in scheduler_status("slurm", ["1,2"], run=run)["error"]
    assert "unknown scheduler kind 'lsf'" in scheduler_status("lsf", ["1"], run=run)["error"]
    assert "list of strings" in scheduler_status("pbs", "8412345", run=run)["error"]
    assert run.calls == []


def test_status_turns_a_runner_exception_into_an_error_value():
    def broken(argv: list[str]) -> tuple[int, str, str]:
        raise RuntimeError("endpoint lost its mind")

    result = scheduler_status("slurm", ["1"], run=broken)
    assert result == {"jobs": {}, "missing": [], "error": "RuntimeError: endpoint lost its mind"}


@pytest.mark.skipif(shutil.which("squeue") is not None, reason="this machine has Slurm")
def test_status_with_the_real_runner_and_no_scheduler():
    result = scheduler_status("slurm", ["31245678"], timeout_s=5)
    assert result["jobs"] == {} and result["missing"] == []
    assert "exited 127" in result["error"] and "squeue: command not found" in result["error"]


def test_run_command():
    assert run_command(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\n", "err\n")
    assert run_command(["sh", "-c", 'echo "$SLURM_TIME_FORMAT"'])[1] == "standard\n"
    assert run_command(["no-such-scheduler-command"])[0] == 127
    rc, _, err = run_command(["sleep", "5"], timeout_s=0.2)
    assert rc == 124 and "no answer within 0.2 s" in err


# ---- model view ----


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("queued", "queued"),
        ("held", "held"),
        ("starting", "starting"),
        ("running", "starting"),
        ("exiting", "gone"),
        ("finished", "gone"),
        ("failed", "gone"),
        ("unknown", "unknown"),
        ("bogus", "unknown"),
    ],
)
def test_model_job_state(state, expected):
    assert model_job_state({"state": state}) == expected


def test_model_job_state_of_missing_and_parsed_jobs():
    assert model_job_state(None) == "gone"
    assert model_job_state(Job("1", "a", "running", "R")) == "starting"
    result = scheduler_status(
        "slurm",
        ["31245678", "31999999"],
        run=RecordedScheduler(
            {
                squeue_argv(["31245678", "31999999"]): (0, "slurm/squeue.txt", None),
                sacct_argv(["31999999"]): (0, None, None),
            }
        ),
    )
    assert [model_job_state(result["jobs"].get(i)) for i in ("31245678", "31999999")] == ["starting", "gone"]


# ---- submit / cancel ----


def test_submit_command():
    assert submit_command("pbs", "/home/firstsvc/first/jobs/llama.pbs", "vllm-llama3-8b") == [
        "qsub",
        "-N",
        "vllm-llama3-8b",
        "/home/firstsvc/first/jobs/llama.pbs",
    ]
    argv = submit_command("pbs", Path("/j/a.pbs"), "vllm-a", queue="demand", account="proj", walltime=21600)
    assert argv == ["qsub", "-N", "vllm-a", "-q", "demand", "-A", "proj", "-l", "walltime=06:00:00", "/j/a.pbs"]
    assert submit_command("slurm", "/j/llama.sh", "vllm-llama3-8b", queue="gpu", account="m1234", walltime=90061) == [
        "sbatch",
        "--parsable",
        "--job-name=vllm-llama3-8b",
        "--partition=gpu",
        "--account=m1234",
        "--time=1-01:01:01",
        "/j/llama.sh",
    ]
    assert submit_command("pbs", "/j/x.pbs", "x", walltime=30 * 3600)[-2] == "walltime=30:00:00"
    assert submit_command("slurm", "/j/x.sh", "x", walltime="02:00:00")[-2] == "--time=02:00:00"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": "lsf"}, ValueError),
        ({"name": "two words"}, ValueError),
        ({"name": ""}, ValueError),
        ({"script_path": "-W"}, ValueError),
        ({"walltime": 0}, ValueError),
        ({"walltime": "6 hours"}, ValueError),
        ({"walltime": 1.5}, TypeError),
    ],
)
def test_submit_command_rejects(kwargs, error):
    args = {"kind": "pbs", "script_path": "/j/x.pbs", "name": "x", **kwargs}
    with pytest.raises(error):
        submit_command(**args)


def test_cancel_command():
    assert cancel_command("pbs", f"8412345.{S}") == ["qdel", f"8412345.{S}"]
    assert cancel_command("slurm", "31245690_1") == ["scancel", "31245690_1"]
    with pytest.raises(ValueError):
        cancel_command("slurm", "--signal=KILL")


def test_parse_submit_output():
    assert parse_submit_output("pbs", f"8412345.{S}\n") == f"8412345.{S}"
    assert parse_submit_output("pbs", f"8412350[].{S}\n") == f"8412350[].{S}"
    assert parse_submit_output("slurm", "31245678\n") == "31245678"
    assert parse_submit_output("slurm", "31245678;perlmutter\n") == "31245678"
    assert parse_submit_output("slurm", "Submitted batch job 31245678\n") == "31245678"
    with pytest.raises(ValueError, match="no slurm job id"):
        parse_submit_output("slurm", "sbatch: error: Batch job submission failed: Invalid account\n")
    with pytest.raises(ValueError):
        parse_submit_output("pbs", "")
