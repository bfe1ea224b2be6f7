"""Which way a batch's lines run: through a gateway, line by line, or in chunks on a cluster with vLLM's own batch
runner (``vllm run-batch``, ``compute/cluster_batch.py``).

The gateway path serves every endpoint and model, with routing, warm-up and failover per line; it suits the
batches that most callers send. vLLM's runner suits a large batch on a batch-scheduled cluster: the lines run
next to the model, in a job, without an HTTP round trip each. The rule (docs/architecture.md, "Batches"):

- the endpoint must be one vLLM's runner serves (``/v1/chat/completions``, ``/v1/embeddings``);
- it runs on the first of the model's clusters (in the model's order) that the owner may use, that is not in
  maintenance, that runs cluster functions (not transport ``http``) and that takes it: ``batch_runner: vllm``
  always, ``gateway`` never, ``auto`` (the default) when the cluster has a scheduler and the batch has at least
  ``FIRST_BATCH_CLUSTER_MIN_LINES`` lines. No such cluster: the gateway path.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.registry import Registry
from core.principal import Principal
from serving.visibility import allowed

VLLM_RUNNER_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")


@dataclass(frozen=True)
class BatchPath:
    """Where a batch's lines run: ``cluster`` None is the gateway path; ``why`` says why, for the run's log."""

    cluster: str | None
    why: str


def choose_path(
    endpoint: str, lines: int, model: str | None, registry: Registry, owner: Principal, min_lines: int
) -> BatchPath:
    if endpoint not in VLLM_RUNNER_ENDPOINTS:
        return BatchPath(None, f"through the gateway: vLLM's batch runner does not serve {endpoint}")
    spec = registry.resolve(model) if model else None
    if spec is None:
        return BatchPath(None, f"through the gateway: model {model!r} is not in the registry")
    passed_over = []
    for name in spec.clusters:
        cluster = registry.clusters.get(name)
        if cluster is None or cluster.maintenance or cluster.transport == "http" or not allowed(owner, cluster):
            continue
        if cluster.batch_runner == "vllm":
            return BatchPath(name, f"on cluster {name} with vLLM's batch runner (its batch_runner is 'vllm')")
        if cluster.batch_runner == "auto" and cluster.scheduler != "none" and lines >= min_lines:
            return BatchPath(name, f"on cluster {name} with vLLM's batch runner: {lines} lines (at least "
                             f"{min_lines}) on a {cluster.scheduler} cluster")  # fmt: skip
        passed_over.append(f"{name}: batch_runner '{cluster.batch_runner}', scheduler '{cluster.scheduler}'")
    if not passed_over:
        return BatchPath(None, "through the gateway: no cluster of the model can run vLLM's batch runner")
    return BatchPath(None, f"through the gateway: {lines} lines, threshold {min_lines} ({'; '.join(passed_over)})")
