"""Gateway settings: only what must be known before Prefect is reachable.

Everything here comes from environment variables prefixed ``FIRST_`` (or a ``.env`` file).
Clusters and models themselves live in Prefect Blocks (see ``blocks/``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class FlowTracking(StrEnum):
    """How many hot-path inferences become recorded Prefect flow runs (design decision 1)."""

    off = "off"  # never record hot-path inferences (lifecycle flows are always recorded)
    sample = "sample"  # record failures, lifecycle work, and a random sample of the rest
    all = "all"  # every request awaits a real Prefect flow run (slow: see docs/benchmarks.md)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIRST_", env_file=".env", extra="ignore")

    home: Path = Field(default=REPO_ROOT / ".first", description="State folder: keys, spool, usage db, models")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(
        default=None, description="URL at which cluster functions reach the gateway's relay endpoint"
    )
    auth_mode: Literal["local", "globus"] = Field(
        default="local", description="local: API keys (`first keys`); globus: Globus access tokens"
    )
    globus_block: str = Field(default="default", description="Name of the FIRST Globus Auth block (globus mode)")
    globus_block_refresh_s: float = Field(default=60.0, description="How often the gateway re-reads that block")

    flow_tracking: FlowTracking = FlowTracking.sample
    flow_sample_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    inference_events: bool = Field(
        default=True, description="A Prefect event per request (first.inference.*), when a Prefect server is set"
    )
    event_budget_per_s: float = Field(
        default=100.0,
        gt=0,
        description="Inference events a second a gateway posts one per request; above it, successful, warm, fast "
        "requests are folded into one first.inference.summary event per model and cluster",
    )
    event_summary_s: float = Field(default=10.0, gt=0, description="Seconds each summary event covers")
    event_slow_s: float = Field(
        default=30.0, gt=0, description="A request slower than this keeps its own event, whatever the budget"
    )

    warm_wait_s: float = Field(default=120.0, description="How long a request waits for a cold model")
    max_tries: int = Field(default=3, ge=1, description="Clusters one request may try before its first byte")
    breaker_failures: int = Field(default=3, ge=1, description="Consecutive failures that open a cluster's breaker")
    breaker_cooldown_s: float = Field(default=30.0, description="How long an open breaker waits before one probe")
    slowest_tokens_per_s: float = Field(
        default=20.0,
        gt=0,
        description="The slowest generation a healthy model server keeps up: a request asking for more tokens than "
        "that rate makes within the request timeout may time out by its own size, which is then no cluster fault",
    )
    registry_refresh_s: float = Field(default=5.0, description="How often the gateway re-reads cluster/model blocks")
    state_sync_s: float = Field(default=2.0, description="How often the gateway exchanges live state with flows")
    gateway_id: str | None = Field(default=None, description="This gateway's name in its state reports (host_port)")
    session_header: str = Field(
        default="X-Session-Id",
        description="A request header naming the caller's session: its requests go to the "
        "same instance while it is hot and has room, so vLLM's prefix cache is reused (agents, chats)",
    )
    session_from_user: bool = Field(
        default=False, description="Without the session header, use the OpenAI `user` field as the session key"
    )
    # ---- several gateway replicas (docs/admin/production.md): their shared state in Redis ----
    redis_url: str | None = Field(
        default=None,
        description="Redis that gateway replicas share (rate limits, caps, relay, warm-ups), e.g. "
        "redis://redis:6379/0; unset: this process's own state (one gateway)",
    )
    redis_prefix: str = Field(default="first", description="Prefix of every Redis key FIRST writes")
    workers: int = Field(
        default=1, ge=1, le=64,
        description="Gateway worker processes on this host (uvicorn --workers), each a replica of the others: more "
        "than 1 needs FIRST_REDIS_URL, where they share limits, caps, warm-ups, load and streams. One per core, "
        "less the cores the host's other work needs (docs/admin/production.md)",
    )  # fmt: skip
    replica: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="This gateway replica's (or worker's) name: its usage spool is FIRST_USAGE_SPOOL_DIR/<name>",
    )
    usage_spool_dir: Path | None = Field(
        default=None,
        description="The usage spools of every replica (shared storage that supports flock, e.g. "
        "NFSv4, Lustre mounted with flock, GPFS); default FIRST_HOME/spool",
    )
    keys_url: str | None = Field(
        default=None,
        description="Local API keys in a database every replica reads (postgresql+psycopg://user@host"
        "/first); unset: FIRST_HOME/keys.sqlite",
    )
    keys_refresh_s: float = Field(default=1.0, gt=0, description="How often a replica re-reads FIRST_KEYS_URL: "
                                  "a revoked key is refused everywhere within this")  # fmt: skip
    keys_max_stale_s: float = Field(default=300.0, gt=0, description="While FIRST_KEYS_URL cannot be read, how long "
                                    "the keys last read stay valid; then every key is refused (503)")  # fmt: skip
    redis_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description="A Redis call slower than this counts as Redis being down (a burst opens "
        "connections on a busy host: not tighter than this)",
    )
    redis_retry_s: float = Field(
        default=2.0,
        gt=0,
        description="While Redis is down, how long a replica uses its own state before it tries Redis again",
    )
    warm_up_timeout_s: float = Field(default=300.0, description="Bound on one warm-up before it fails")
    request_timeout_s: float = Field(default=300.0, description="Bound on one backend call")
    relay_idle_timeout_s: float = Field(default=120.0, description="Silence that ends a relayed stream")
    relay_batch_chunks: int = 16
    relay_batch_ms: int = 20

    vllm_python: Path = Field(default=REPO_ROOT / ".venv-vllm" / "bin" / "python")
    vllm_kv_cache_gib: int = 1
    vllm_port_base: int = 8100
    local_workers: int = Field(default=64, description="Threads in the local compute endpoint")
    usage_rpm: int = Field(default=60, ge=0, description="GET /v1/usage calls per minute per caller (0 = no limit)")
    max_inflight_per_caller: int = Field(
        default=64, ge=0, description="Requests (streams included) one caller may have in flight per model (0 = no cap)"
    )
    header_timeout_s: float = Field(
        default=10.0, ge=0, description="A connection that has not sent a request's headers by then is closed"
    )
    max_connections: int = Field(
        default=8192,
        ge=1,
        description="Connections and requests uvicorn takes at once before it answers 503 (its --limit-concurrency)",
    )
    stop_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="On SIGTERM or Ctrl-C, seconds the gateway gives requests under way (streams) to finish before "
        "it cuts them (uvicorn's --timeout-graceful-shutdown); a warm-up under way ends at once, as Cancelled",
    )
    auth_failures_per_min: int = Field(
        default=30,
        ge=0,
        description="Failed authentications per minute one client address may make before it gets 429 for unknown "
        "credentials (0 = no throttle). Behind a reverse proxy, run uvicorn with --proxy-headers",
    )
    default_rpm: int = Field(default=0, description="Requests per minute per API key when the key sets none (0 = none)")
    audit_mode: bool = Field(
        default=False,
        description="Keep each request's prompt and completion text in FIRST_HOME/audit/<day>.jsonl (never in usage)",
    )
    audit_retention_days: int = Field(default=30, ge=0, description="Days of audit files audit-retention keeps")
    # ---- files and batches (/v1/files, /v1/batches, the run-batch flow) ----
    batch_dir: Path | None = Field(
        default=None, description="Where uploaded files, batches and their results live (default FIRST_HOME/batches;"
        " a shared file system when gateways and workers run on several hosts)",
    )  # fmt: skip
    max_file_bytes: int = Field(default=200 * 2**20, ge=1, description="Largest file one upload may be (bytes)")
    file_quota_bytes: int = Field(default=2 * 2**30, ge=1, description="Bytes of files one user may keep at once")
    max_batch_lines: int = Field(default=150_000, ge=1, description="Lines one batch input file may have")
    max_active_batches: int = Field(default=4, ge=1, description="Batches one user may have not yet finished")
    max_queued_lines: int = Field(
        default=300_000, ge=1, description="Lines of one user's unfinished batches, all together"
    )
    batch_concurrency: int = Field(default=8, ge=1, description="Lines of one batch in flight at once")
    batch_chunk_lines: int = Field(default=500, ge=1, description="Lines per chunk task of a run-batch flow run")
    batch_share: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Share of an instance's request slots (its cluster's "
        "max_concurrency) that batch lines may hold; interactive requests never wait for them",
    )  # fmt: skip
    instance_events: Path | None = Field(
        default=None, description="Where lifecycle runs log each model instance's state changes, the instance time "
        "allocations are charged from (default FIRST_HOME/instance-events; a shared folder when workers run "
        "elsewhere)",
    )  # fmt: skip
    allocation_idle_owner: str = Field(
        default="facility", description="Who is charged the GPU-hours of instances nobody used (allocations)"
    )
    allocation_check_s: float = Field(
        default=60.0, gt=0, description="How often a gateway recomputes the projects' GPU-hour burn (to refuse or "
        "demote a project whose budget is spent)",
    )  # fmt: skip
    fair_queue: bool = Field(
        default=True, description="Once an instance is full, requests wait in the gateway in a weighted fair queue "
        "per caller group, interactive before batch (off: they go on to vLLM's own first-come-first-served queue)",
    )  # fmt: skip
    queue_wait_s: float = Field(
        default=30.0, ge=0.0, description="The longest a request waits for a slot at a full instance before a 503 "
        "(or a 429 for the group that floods it) with a Retry-After from the queue",
    )  # fmt: skip
    batch_gateway_url: str | None = Field(
        default=None, description="The gateway batch lines go through (default: the one that took the batch). A "
        "replica of its own keeps batch work off the event loops that serve interactive callers",
    )  # fmt: skip
    batch_nice: int = Field(
        default=10, ge=0, le=19, description="Niceness of a run-batch flow run's process: on a host it shares with a "
        "gateway, batch work yields the CPU to interactive requests first",
    )  # fmt: skip
    batch_retention_days: int = Field(default=30, ge=1, description="Days batch-retention keeps finished batches")
    batch_cluster_min_lines: int = Field(
        default=10_000,
        ge=1,
        description="A batch this large, on a cluster with a batch scheduler (and a runner of "
        "'auto'), runs on the cluster with vLLM's own batch runner instead of through the gateway",
    )
    batch_cluster_chunk_lines: int = Field(
        default=5_000,
        ge=1,
        description="Lines per run of vLLM's batch runner on a cluster (each run loads the "
        "model once; its input and output travel inline, under Globus Compute's 10 MB payload limit)",
    )
    batch_cluster_timeout_s: float = Field(
        default=6 * 3600,
        gt=0,
        description="How long one run of vLLM's batch runner on a cluster may take, "
        "including its wait in the cluster's queue",
    )

    @property
    def gateway_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def batches_root(self) -> Path:
        return self.batch_dir or self.home / "batches"

    @property
    def batch_secret_path(self) -> Path:
        """The secret batch credentials are signed with: beside the batches, where every gateway and worker
        reads them."""
        return self.batches_root / ".batch-secret"

    @property
    def keys_db(self) -> Path:
        return self.home / "keys.sqlite"

    @property
    def spool_root(self) -> Path:
        """Where every process's usage spool lives: what ``ingest-usage`` reads (each replica's folder in it)."""
        return self.usage_spool_dir or self.home / "spool"

    @property
    def spool_dir(self) -> Path:
        """This process's spool: a folder of its own under the root when it is one of several replicas."""
        return self.spool_root / self.replica if self.replica else self.spool_root

    @property
    def instance_events_dir(self) -> Path:
        """Each model instance's state changes, written by lifecycle runs, read by allocation reports."""
        return self.instance_events or self.home / "instance-events"

    @property
    def usage_db(self) -> Path:
        return self.home / "usage.duckdb"

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def instances_dir(self) -> Path:
        return self.home / "instances"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def make_home(self) -> Path:
        """Create the state folder readable by its owner only (0700): it holds the key store, the usage spool and
        database, logs and, in the embedded default, Prefect's database with the blocks' secrets."""
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)  # mkdir's mode is filtered by the umask, and the folder may predate us
        return self.home

    @property
    def prefect_auth_path(self) -> Path:
        return self.home / "prefect-api-auth"

    def prefect_auth_string(self) -> str:
        """The embedded Prefect server's API password (HTTP basic auth), made on first use and kept 0600.

        The Prefect API is the fleet's control plane (it holds the blocks' secrets and the live state the gateways
        route by): without this, every account on the host could steer the fleet."""
        path = self.prefect_auth_path
        if not path.exists():
            self.make_home()
            secret = "first:" + secrets.token_urlsafe(32)
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secret + "\n")
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()


def prefect_env(settings: Settings, prefect_port: int) -> dict[str, str]:
    """The environment every process of the embedded default shares (set before Prefect is imported): the local
    Prefect server, and its API password for the server (``PREFECT_SERVER_API_AUTH_STRING``) and every client."""
    auth = settings.prefect_auth_string()
    return {
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_API_AUTH_STRING": auth,
        "FIRST_HOME": str(settings.home),
        "FIRST_REPO_ROOT": str(REPO_ROOT),
        "PREFECT_HOME": str(settings.home / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # SQLite's "database is locked" retries are hidden by default: an overloaded server shows in its log.
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "2",
        "PYTHONUNBUFFERED": "1",
    }
