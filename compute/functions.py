"""Functions shipped to clusters. The same code runs in every transport (local, Globus Compute).

Rules, so that they serialize and run on a remote endpoint: each is a plain module-level function;
arguments and results are plain JSON-like values; every import happens inside the function.
"""

from __future__ import annotations

from typing import Any

from compute import cluster_batch

_pools: dict[str, Any] = {}  # urllib3 pools per proxy ("" = direct), per endpoint process, shared by its threads


def _http(url: str) -> Any:
    """The pool for ``url``: direct, or through the site's HTTPS proxy (``HTTPS_PROXY``/``NO_PROXY``, as
    compute nodes that reach out only through a proxy have it set); vLLM on 127.0.0.1 is always direct.

    urllib3 rather than httpx here: the same call costs ~1.1 ms of CPU instead of ~1.8 ms (measured), and
    urllib3 is already in every Globus Compute endpoint's environment (through requests)."""
    import urllib.request
    from urllib.parse import urlsplit

    import urllib3

    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme, "")
    if proxy and (
        parts.hostname in ("127.0.0.1", "localhost", "::1") or urllib.request.proxy_bypass(parts.hostname or "")
    ):
        proxy = ""
    pool = _pools.get(proxy)
    if pool is None:
        pool = _pools[proxy] = (
            urllib3.ProxyManager(proxy, maxsize=64, block=False, retries=False)
            if proxy
            else urllib3.PoolManager(maxsize=64, block=False, retries=False)
        )
    return pool


def expand_cluster_path(value: str, what: str) -> str:
    """Cluster paths may name the endpoint's environment (``${FIRST_HOME}``): expand them there."""
    import os

    expanded = os.path.expandvars(value)
    if "$" in expanded:
        raise ValueError(f"{what} {value!r} names an unset variable: set it in the endpoint's worker_init")
    return expanded


_keys: dict[str, tuple[float, str | None]] = {}  # state file -> (its mtime, the vLLM API key it holds)


def _vllm_headers(instance: dict[str, Any] | None) -> dict[str, str]:
    """The headers of a call to the model's vLLM: its API key, which start_vllm made and keeps in the instance's
    state file on the cluster (0600); it never travels to the gateway. ``instance`` names that file
    (``state_dir``, ``model``); None, or a server started without a key, sends none."""
    import json
    import os

    headers = {"Content-Type": "application/json"}
    if not instance:
        return headers
    path = str(_state_path(instance))
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return headers
    cached = _keys.get(path)
    if cached is None or cached[0] != mtime:
        try:
            key = json.loads(open(path).read()).get("api_key")
        except (OSError, ValueError):
            key = None
        cached = _keys[path] = (mtime, key)
    if cached[1]:
        headers["Authorization"] = f"Bearer {cached[1]}"
    return headers


def _public(state: dict[str, Any]) -> dict[str, Any]:
    """An instance's state as the gateway may see it: without its vLLM API key."""
    return {k: v for k, v in state.items() if k != "api_key"}


def _timeout(seconds: float) -> Any:
    import urllib3

    return urllib3.Timeout(connect=min(10.0, seconds), read=seconds)


def backend_unreachable(base_url: str, exc: Exception, timed_out: bool) -> dict[str, Any]:
    """The answer when vLLM could not be reached or did not answer in time (a value, not an exception,
    so its message survives any serializer)."""
    if timed_out:
        return {"status": 504, "kind": "timeout", "message": f"vLLM at {base_url} timed out: {exc!r}"}
    return {"status": 503, "kind": "unreachable", "message": f"vLLM at {base_url} is unreachable: {exc!r}"}


def _is_timeout(exc: Exception) -> bool:
    from urllib3.exceptions import NewConnectionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    # NewConnectionError (refused, no route) subclasses ConnectTimeoutError for history's sake: not a timeout.
    return isinstance(exc, Urllib3Timeout) and not isinstance(exc, NewConnectionError)


def _json_or_error(data: bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError:
        return {"error": {"message": data[:500].decode(errors="replace"), "type": "backend_error"}}


def openai_request(
    base_url: str, path: str, body: dict[str, Any], timeout: float, instance: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One non-streaming OpenAI call to the vLLM server near this function (``instance``: where its key is).

    Returns {"status": http status, "body": json} or {"status": 503|504, "kind", "message"} when vLLM
    could not be reached.
    """
    import json

    from urllib3.exceptions import HTTPError

    try:
        r = _http(base_url).request(
            "POST", base_url + path, body=json.dumps(body).encode(), headers=_vllm_headers(instance),
            timeout=_timeout(timeout),
        )  # fmt: skip
    except HTTPError as exc:
        return backend_unreachable(base_url, exc, _is_timeout(exc))
    return {"status": r.status, "body": _json_or_error(r.data)}


def _pieces_in_background(response: Any) -> Any:
    """A queue that a thread fills with the response's HTTP chunks as they arrive, then None (or the exception
    that ended the read). The batching loop waits on the queue with a timeout: bytes the HTTP reader has already
    buffered are in the queue at once, where a select on the socket would not see them and would wait out the
    whole batch window for each chunk of a burst (20 ms per chunk; docs/benchmarks.md, issue 18)."""
    import queue
    import threading

    pieces: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for piece in response.stream(None):  # each HTTP chunk as it arrives: vLLM sends one SSE event per chunk
                pieces.put(piece)
            pieces.put(None)
        except BaseException as exc:  # the stream broke, or was closed because the caller left
            pieces.put(exc)

    threading.Thread(target=read, daemon=True, name="first-stream-reader").start()
    return pieces


def _is_content(chunk: dict[str, Any]) -> bool:
    """Generated content (what time to first token waits for), in any of the streams vLLM serves: OpenAI's chunks
    (choices), the Responses API's ``*.delta`` events, Anthropic's ``content_block_delta``."""
    choices = chunk.get("choices")
    if choices:
        return any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)
    kind = str(chunk.get("type") or "")
    return (kind.endswith(".delta") and bool(chunk.get("delta"))) or kind == "content_block_delta"


def openai_stream(
    base_url: str,
    path: str,
    body: dict[str, Any],
    timeout: float,
    relay_url: str,
    relay_token: str,
    batch_chunks: int = 16,
    batch_ms: int = 20,
    instance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream one OpenAI call from vLLM and post the chunks, in batches, to the gateway's relay.

    The first chunk is posted at once (time to first token); later ones at most ``batch_chunks`` per
    post or every ``batch_ms``. Returns a summary; errors are also posted so the caller sees them.
    """
    import contextlib
    import json
    import queue
    import time

    from urllib3.exceptions import HTTPError

    http, relay_http = _http(base_url), _http(relay_url)
    r: Any = None
    headers = {"Content-Type": "application/json"}
    seq = 0
    sent = 0

    class StreamGone(Exception):
        """The gateway no longer wants this stream (its caller left, or it refused the token): stop generating."""

    def post(chunks: list[Any], done: bool = False, error: dict[str, Any] | None = None) -> None:
        nonlocal seq
        doc = json.dumps({"seq": seq, "chunks": chunks, "done": done, "error": error}).encode()
        status = None
        for attempt in range(5):  # reposts are idempotent: the gateway drops duplicate sequence numbers
            try:
                r = relay_http.request(
                    "POST",
                    relay_url,
                    body=doc,
                    headers={**headers, "X-Relay-Token": relay_token},
                    timeout=_timeout(30.0),
                )
                status = r.status
                if status == 409 and attempt:  # a repost of a batch whose answer was lost: delivered already
                    break
                if status in (401, 404, 409):
                    raise StreamGone(f"the gateway answered {status} to batch {seq}")
                if status < 500:
                    break
            except HTTPError:
                if attempt == 4:
                    raise
            time.sleep(0.05 * 2**attempt)
        else:  # never skip a sequence number: the gateway would wait for it until its idle timeout
            raise RuntimeError(f"the gateway's relay answered {status} to batch {seq} five times")
        seq += 1

    try:
        r = http.request(
            "POST",
            base_url + path,
            body=json.dumps(body).encode(),
            headers=_vllm_headers(instance),
            timeout=_timeout(timeout),
            preload_content=False,
        )
        if r.status != 200:
            post([], done=True, error={"status": r.status, "body": _json_or_error(r.read())})
            r.release_conn()
            return {"status": r.status, "chunks": 0}
        batch: list[Any] = []
        content_sent = False  # the first token goes out at once (time to first token), with the role chunk
        deadline = 0.0
        pending = b""
        pieces = _pieces_in_background(r)
        while True:
            # (Before the first token, the role chunk waits for it: they go out together.)
            wait = max(0.0, deadline - time.monotonic()) if batch and content_sent else None
            try:
                piece = pieces.get(timeout=wait)
            except queue.Empty:  # the model went quiet with chunks waiting: don't hold them past their window
                post(batch)
                sent += len(batch)
                batch, deadline = [], time.monotonic() + batch_ms / 1000
                continue
            if piece is None:
                break
            if isinstance(piece, BaseException):
                raise piece
            *lines, pending = (pending + piece).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                chunk = json.loads(data)
                batch.append(chunk)
                now = time.monotonic()
                if content_sent:
                    flush = len(batch) >= batch_chunks or now >= deadline
                else:
                    flush = content_sent = _is_content(chunk)
                if flush:
                    post(batch)
                    sent += len(batch)
                    # The window starts when the post is done: under load a post can outlast batch_ms, and a
                    # window counted from before it would already be over (one chunk per post at 200 streams).
                    batch, deadline = [], time.monotonic() + batch_ms / 1000
        r.release_conn()
        sent += len(batch)
        post(batch, done=True)
    except StreamGone as gone:
        with contextlib.suppress(Exception):
            r.close()  # vLLM sees the disconnect and stops generating
        return {"status": 499, "chunks": sent, "stopped": str(gone)}
    except HTTPError as exc:
        err = backend_unreachable(base_url, exc, _is_timeout(exc))
        post([], done=True, error=err)
        return {"status": err["status"], "chunks": sent}
    return {"status": 200, "chunks": sent, "posts": seq}


# ---- model lifecycle on a cluster without a batch scheduler (the local cluster) ----


def _state_path(spec: dict[str, Any]) -> Any:
    from pathlib import Path

    return Path(expand_cluster_path(spec["state_dir"], "state_dir")) / f"{spec['model']}.json"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive, nor is a process on its way out
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(") ", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    except (OSError, IndexError, ValueError):
        return True
    pf_exiting = 0x4  # the kernel's task flag (field 9 of /proc/PID/stat) set as exit begins
    sigkill_bit = 1 << 8  # SIGKILL (9) in /proc/PID/status's pending-signal masks
    if fields[0] in ("Z", "X") or int(fields[6]) & pf_exiting:
        return False
    return not any(mask & sigkill_bit for mask in pending)  # killed, not yet scheduled to die


def _proc_identity(pid: int) -> str | None:
    """Who holds ``pid``: this boot's id and the process's start time (clock ticks after boot). A pid freed by a
    crash and handed to another process has the same number and another identity."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{start}"


def _recorded_process_runs(state: dict[str, Any]) -> tuple[bool, str]:
    """Whether the vLLM a state file recorded still runs: (runs, why not). A state file from before identities
    were recorded is judged by its pid alone."""
    pid = state["pid"]
    if not _pid_alive(pid):
        return False, f"vLLM process {pid} exited"
    recorded = state.get("identity")
    if recorded is not None and _proc_identity(pid) != recorded:
        return False, f"process {pid} is no longer the vLLM this state recorded (it died, and its pid was reused)"
    return True, ""


def _end_orphans_of(spec: dict[str, Any]) -> list[int]:
    """Before a fresh start over a dead instance's state: its vLLM was killed (a crash, the OOM killer) but its
    engine and worker processes, in the same process group and each holding the model's memory, may live on.
    SIGKILL those of that group that name themselves vLLM (never another process that reused the number)."""
    import json
    import os
    import signal

    try:
        state = json.loads(_state_path(spec).read_text())
        pgid = int(state.get("pgid") or state["pid"])
    except (OSError, ValueError, KeyError):
        return []
    if _pid_alive(pgid) and _proc_identity(pgid) == state.get("identity"):
        return []  # the server itself lives: stop_vllm's business, not an orphan
    ended = []
    for pid in _live_group_members(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"vllm" not in f.read().lower():
                    continue
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return ended


def _live_group_members(pgid: int) -> list[int]:
    """The non-zombie processes of this process group (Linux /proc)."""
    import os

    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _group_has_live_members(pgid: int) -> bool:
    """True if a non-zombie process of this process group still runs."""
    return bool(_live_group_members(pgid))


def vllm_status(spec: dict[str, Any]) -> dict[str, Any]:
    """Is the model's vLLM server cold, starting, hot or failed? Reads its state file and /health."""
    import json

    from urllib3.exceptions import HTTPError

    path = _state_path(spec)
    if not path.exists():
        return {"state": "cold"}
    state = json.loads(path.read_text())
    runs, why = _recorded_process_runs(state)
    if not runs:  # never waited on: a warm-up that finds this starts afresh
        tail = ""
        try:
            with open(state["log"], "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 2000))
                tail = f.read().decode(errors="replace")
        except OSError:
            pass
        return {**_public(state), "state": "failed", "detail": f"{why}. Log tail:\n{tail}"}
    try:
        ok = _own_server(state["base_url"]).request("GET", state["base_url"] + "/health", timeout=2.0).status == 200
    except HTTPError:
        ok = False
    return {**_public(state), "state": "hot" if ok else "starting"}


def _own_server(url: str) -> Any:
    """The pool a node probes its own vLLM with: an https one (the direct data path) has the site's certificate,
    which names the address the gateway uses; the node asks its own server, so it does not check it."""
    if not url.startswith("https:"):
        return _http(url)
    import urllib3

    pool = _pools.get("own-tls")
    if pool is None:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # this pool's requests are meant so
        pool = _pools["own-tls"] = urllib3.PoolManager(maxsize=8, retries=False, cert_reqs="CERT_NONE",
                                                       assert_hostname=False)  # fmt: skip
    return pool


def vllm_access(spec: dict[str, Any]) -> dict[str, Any]:
    """For the direct data path: the URL and API key of the model's vLLM, when it is hot. Only the gateway calls
    this (through the cluster's endpoint, as it calls every function), to reach the node itself."""
    import json

    status = vllm_status(spec)
    if status["state"] != "hot":
        return {"state": status["state"]}
    try:
        state = json.loads(_state_path(spec).read_text())
    except (OSError, ValueError) as exc:
        return {"state": "failed", "detail": repr(exc)}
    return {"state": "hot", "base_url": state["base_url"], "api_key": state.get("api_key")}


def start_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """Start vLLM for one model unless it already runs; returns at once (warm-up polls vllm_status).

    A file lock makes concurrent starts on one machine start one server. Each server gets its own API key
    (``VLLM_API_KEY``, in its environment rather than on its command line, which every account can read), kept
    in the instance's state file (0600): no one else on the host or the node can call it around the gateway.
    """
    import fcntl
    import json
    import os
    import secrets
    import socket
    import subprocess
    import time
    from pathlib import Path

    state_dir = Path(expand_cluster_path(spec["state_dir"], "state_dir"))
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f"{spec['model']}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = vllm_status(spec)
        if current["state"] in ("starting", "hot"):
            return current
        _end_orphans_of(spec)
        port = int(spec["port"]) or _free_port()  # 0: another instance of a model, on a port of its own
        # Where vLLM listens: the node's loopback, or (the direct data path) where the gateway reaches it.
        host = spec.get("host") or "127.0.0.1"
        bind, advertised = ("0.0.0.0", socket.getfqdn()) if host == "node" else (host, host)
        log_path = state_dir / f"{spec['model']}.log"
        # On a machine it shares with the gateway, vLLM's busy threads yield the CPU to it first (`nice`).
        nice = ["nice", "-n", str(spec["nice"])] if spec.get("nice") else []
        cmd = [
            *nice, expand_cluster_path(spec["python"], "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", spec["model_path"], "--served-model-name", spec["served_name"],
            "--host", bind, "--port", str(port), *spec.get("args", []),
        ]  # fmt: skip
        api_key = secrets.token_urlsafe(32)
        env = {**os.environ, **spec.get("env", {}), "VLLM_API_KEY": api_key}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # its own process group: stop_vllm ends vLLM and its workers together
            )  # fmt: skip
        state = {
            "pid": proc.pid, "port": port, "base_url": f"{spec.get('scheme') or 'http'}://{advertised}:{port}",
            "log": str(log_path),
            "started": time.time(), "model": spec["model"], "cmd": cmd, "host": socket.gethostname(),
            # On a batch cluster this runs inside the endpoint's block: its job is the one holding the node.
            "job_id": os.environ.get("PBS_JOBID") or os.environ.get("SLURM_JOB_ID"),
            "api_key": api_key,
            "identity": _proc_identity(proc.pid),  # a pid reused after a crash is not taken for this vLLM
        }  # fmt: skip
        tmp = _state_path(spec).with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(json.dumps(state))
        tmp.replace(_state_path(spec))
        return {**_public(state), "state": "starting"}


def stop_vllm(spec: dict[str, Any], grace_s: float = 20.0) -> dict[str, Any]:
    """Stop the model's vLLM server: SIGTERM to its process group, SIGKILL after ``grace_s``."""
    import json
    import os
    import signal
    import time

    path = _state_path(spec)
    if not path.exists():
        return {"state": "cold", "stopped": False}
    state = json.loads(path.read_text())
    pid = state["pid"]
    if state.get("identity") is not None and _pid_alive(pid) and _proc_identity(pid) != state["identity"]:
        path.unlink(missing_ok=True)  # its pid now belongs to another process: signal nothing
        return {"state": "cold", "stopped": False, "pid": pid}

    def group_alive() -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _pid_alive(pid) or _group_has_live_members(pid)

    stopped = False
    if group_alive():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
            try:  # reap it if this process started it
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if group_alive():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped = True
    try:  # reap it if this process started it
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    path.unlink(missing_ok=True)
    return {"state": "cold", "stopped": stopped, "pid": pid}


# ---- what gets registered with Globus Compute (`first functions register`) ----


def scheduler_status(kind: str, job_ids: list[str]) -> dict[str, Any]:
    """On a login-node endpoint: what PBS or Slurm says of these jobs (compute/scheduler/)."""
    from compute.scheduler import scheduler_status as read

    return read(kind, job_ids)


def cancel_job(kind: str, job_id: str) -> dict[str, Any]:
    """On a login-node endpoint: cancel a batch job (qdel / scancel). Returns {"cancelled", "error"}."""
    from compute.scheduler import cancel_command, run_command

    try:
        argv = cancel_command(kind, job_id)
    except ValueError as exc:
        return {"cancelled": False, "error": str(exc)}
    rc, _out, err = run_command(argv)
    return {"cancelled": rc == 0, "error": None if rc == 0 else (err.strip() or f"{argv[0]} exited {rc}")}


CLUSTER_FUNCTIONS: dict[str, Any] = {
    "openai_request": openai_request,
    "openai_stream": openai_stream,
    "vllm_status": vllm_status,
    "vllm_access": vllm_access,
    "start_vllm": start_vllm,
    "stop_vllm": stop_vllm,
    "scheduler_status": scheduler_status,
    "cancel_job": cancel_job,
    "run_vllm_batch": cluster_batch.run_vllm_batch,
    "cancel_vllm_batch": cluster_batch.cancel_vllm_batch,
}
