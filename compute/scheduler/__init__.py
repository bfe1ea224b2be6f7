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

from compute.scheduler.commands import (
    cancel_command,
    model_job_state,
    parse_submit_output,
    run_command,
    scheduler_status,
    submit_command,
)
from compute.scheduler.jobs import (
    DEFAULT_TIMEOUT_S,
    SACCT_FORMAT,
    SINFO_FORMAT,
    SQUEUE_FORMAT,
    Job,
    JobState,
    ModelJobState,
    Node,
)
from compute.scheduler.pbs import (
    normalize_pbs_state,
    parse_pbsnodes,
    parse_pbsnodes_json,
    parse_qstat_full,
    parse_qstat_json,
)
from compute.scheduler.slurm import expand_hostlist, normalize_slurm_state, parse_sacct, parse_sinfo, parse_squeue

__all__ = [
    "DEFAULT_TIMEOUT_S", "SACCT_FORMAT", "SINFO_FORMAT", "SQUEUE_FORMAT", "Job", "JobState", "ModelJobState", "Node",
    "cancel_command", "expand_hostlist", "model_job_state", "normalize_pbs_state", "normalize_slurm_state",
    "parse_pbsnodes", "parse_pbsnodes_json", "parse_qstat_full", "parse_qstat_json", "parse_sacct", "parse_sinfo",
    "parse_squeue", "parse_submit_output", "run_command", "scheduler_status", "submit_command",
]  # fmt: skip
