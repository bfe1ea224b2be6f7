"""Clusters and models: Prefect Blocks that operators edit in the UI, and the in-memory snapshot
(``Registry``) the gateway routes with, so that no request waits on a block load.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from pydantic import BaseModel, Field, PositiveFloat

from blocks.projects import ProjectBlock, ProjectSpec
from core.settings import Settings
from core.strict_keys import unknown_keys

log = logging.getLogger("first.registry")

Transport = Literal["local", "http", "globus-compute"]


class RateLimits(BaseModel):
    """Per-user limits (0 = no limit). Tokens count prompt + completion."""

    rpm: int = Field(default=0, ge=0, description="Requests per minute, per user")
    tpm: int = Field(default=0, ge=0, description="Tokens per minute, per user (reserved from max_tokens up front)")


class AccessRules(BaseModel):
    """Who may use a cluster or a model, and how much. Shared by clusters and models."""

    allowed_groups: list[str] = Field(
        default_factory=list, description="Group ids (Globus) or names (local keys); empty: everyone"
    )
    allowed_domains: list[str] = Field(
        default_factory=list, description="Identity-provider domains, e.g. anl.gov; empty: any"
    )
    limits: RateLimits = Field(default_factory=RateLimits)
    group_limits: dict[str, RateLimits] = Field(
        default_factory=dict, description="Overrides for members of a group (the most generous one applies)"
    )

    def allows(self, groups: tuple[str, ...], domains: tuple[str, ...]) -> bool:
        if self.allowed_groups and not set(self.allowed_groups) & set(groups):
            return False
        return not self.allowed_domains or bool({d.lower() for d in self.allowed_domains} & set(domains))

    def limits_for(self, groups: tuple[str, ...]) -> RateLimits:
        """The model's limits, unless a group the user is in overrides them (0 = unlimited wins)."""
        overrides = [self.group_limits[g] for g in groups if g in self.group_limits]
        if not overrides:
            return self.limits

        def generous(values: list[int]) -> int:
            return 0 if 0 in values else max(values)

        return RateLimits(rpm=generous([o.rpm for o in overrides]), tpm=generous([o.tpm for o in overrides]))


class ClusterSpec(AccessRules):
    name: str
    transport: Transport = "local"
    base_url: str | None = Field(default=None, description="For transport 'http': an OpenAI-compatible URL")
    api_key_secret: str | None = Field(
        default=None,
        description="For transport 'http': the name of a Prefect Secret block holding the upstream API's key (sent as "
        "a bearer token); the key itself is never in this block",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="For transport 'http': extra headers sent upstream (e.g. an organisation id)"
    )
    health_path: str = Field(
        default="/health",
        description="For transport 'http': the path that answers 200 when it is ready (vLLM: /health; a hosted "
        "OpenAI-compatible API: /v1/models)",
    )
    endpoint_id: str | None = Field(default=None, description="For transport 'globus-compute': the endpoint's id")
    function_ids: dict[str, str] = Field(
        default_factory=dict,
        description="Registered cluster functions, name -> Globus Compute function id (`first functions register`)",
    )
    user_endpoint_config: dict[str, Any] = Field(
        default_factory=dict, description="For a multi-user endpoint: the values its config template takes"
    )
    login_endpoint_id: str | None = Field(
        default=None, description="A login-node endpoint that reads and cancels batch jobs (qstat/squeue, qdel/scancel)"
    )
    first_home: str = Field(
        default="${FIRST_HOME}", description="Remote clusters: FIRST's state folder there (expanded on the endpoint)"
    )
    vllm_python: str = Field(
        default="${FIRST_VLLM_PYTHON}", description="Remote clusters: the Python that has vLLM (expanded there)"
    )
    scheduler: Literal["none", "pbs", "slurm"] = "none"
    batch_runner: Literal["auto", "gateway", "vllm"] = Field(
        default="auto",
        description="How batches run here: 'gateway' sends each line through a gateway; 'vllm' runs chunks of "
        "lines with vLLM's own batch runner on the cluster; 'auto' uses vLLM's runner for a large batch "
        "(FIRST_BATCH_CLUSTER_MIN_LINES) on a cluster with a scheduler, else the gateway",
    )
    max_instances: int = Field(default=4, ge=1, description="Model instances the cluster runs at once")
    max_concurrency: int = Field(
        default=32, ge=1, description="Concurrent requests per model instance; beyond it the instance counts as full"
    )
    expected_start_s: float = Field(
        default=60.0, ge=0, description="Typical wait from cold to hot (batch queue + load); routing then learns it"
    )
    maintenance: bool = Field(default=False, description="Route nothing here (drain-cluster sets it)")
    maintenance_message: str = ""
    direct_host: str | None = Field(
        default=None,
        description="Compute clusters whose nodes the gateway can reach (the site network, or a tunnel the site "
        "runs): the address vLLM listens on there, or 'node' for each node's own host name. Inference then goes "
        "straight to the node's vLLM with the instance's key; the lifecycle still goes through the endpoint, and a "
        "node that cannot be reached falls back to it (docs/architecture.md, the direct data path)",
    )
    direct_scheme: Literal["http", "https"] = Field(
        default="https", description="With direct_host: https needs vLLM started with --ssl-certfile/--ssl-keyfile "
        "(the model's vllm_args there); http only where the network itself is private",
    )  # fmt: skip
    direct_ca_file: str | None = Field(
        default=None, description="With direct_host and https: the CA bundle, on the gateway, that signed the nodes' "
        "certificates (default: the system's)",
    )  # fmt: skip


class ClusterModelArgs(BaseModel):
    """How a model runs on one particular cluster, where that differs from the model's defaults."""

    path: str | None = Field(default=None, description="Model folder or hub id there")
    port: int | None = None
    vllm_args: list[str] | None = Field(default=None, description="Replaces the model's vllm_args there")
    vllm_env: dict[str, str] = Field(default_factory=dict, description="Added to the model's vllm_env there")
    gpus: int | None = Field(default=None, ge=0, description="GPUs one instance holds there (default: the model's)")
    min_instances: int | None = Field(default=None, ge=0, description="Instances kept up there (default: the model's)")
    max_instances: int | None = Field(default=None, ge=1, description="Instances allowed there (default: the model's)")


ModelKind = Literal["generate", "embed"]
# The endpoints each kind of model serves (as usage rows name them).
ENDPOINTS_BY_KIND: dict[str, tuple[str, ...]] = {
    "generate": ("chat.completions", "completions", "responses", "messages"),
    "embed": ("embeddings",),
}


class ModelSpec(AccessRules):
    name: str
    aliases: list[str] = Field(default_factory=list)
    clusters: list[str] = Field(default_factory=lambda: ["local"])
    served_name: str | None = Field(default=None, description="Name vLLM serves it under (default: name)")
    path: str = Field(description="Model folder or hub id that vLLM loads")
    port: int = 8100
    vllm_args: list[str] = Field(default_factory=list)
    vllm_env: dict[str, str] = Field(default_factory=dict)
    per_cluster: dict[str, ClusterModelArgs] = Field(
        default_factory=dict, description="Per-cluster path, port, vLLM arguments and environment"
    )
    context_length: int = 512
    gpus: int = Field(
        default=1, ge=0, description="GPUs one instance holds (what allocations are charged: GPUs x wall time)"
    )
    min_instances: int = Field(
        default=0, ge=0, description="autoscale keeps at least this many instances up on each of its clusters (the "
        "always-hot tier: 1 or more)",
    )  # fmt: skip
    max_instances: int = Field(
        default=1, ge=1, description="autoscale runs at most this many instances on each of its clusters (1: "
        "never more than one; the cluster's own max_instances bounds all its models together)",
    )  # fmt: skip
    replica: int = Field(
        default=0, ge=0, exclude=True, description="Which instance of the model on a cluster this spec is for "
        "(0: the first, warmed by requests; 1 and up: started by autoscale). Not stored in the block",
    )  # fmt: skip
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The largest max_tokens a request may ask for (default: the context length). A request sized "
        "to run into the gateway's timeout must not be able to make the cluster look faulty to everyone.",
    )
    hidden: bool = Field(
        default=False,
        description="Callers who may not use it get 404, as for an unknown model (default: 403, access denied)",
    )
    idle_timeout_s: int = Field(default=3600, ge=0, description="scale-down-idle stops it after this long unused")
    warm_ahead: Literal["auto", "off"] = Field(
        default="auto",
        description="predictive-warm-up: 'auto' warms it ahead of the demand its usage history "
        "predicts (and keeps it through predicted busy hours); 'off' leaves it to requests and operators",
    )
    warm_ahead_min_per_hour: float = Field(
        default=10.0,
        gt=0,
        description="predictive-warm-up: the requests per hour, predicted from past weeks, that "
        "make it worth warming ahead",
    )
    group_weights: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="Fair share once the model is full: caller group -> weight (default 1). A group of weight 2 gets "
        "twice the slots of a group of weight 1 while both wait",
    )
    nice: int = Field(
        default=0, ge=0, le=19, description="Run vLLM at this niceness (for a machine shared with the gateway)"
    )
    owned_by: str = "first"
    kind: ModelKind = Field(
        default="generate",
        description="generate: a text model (chat, completions); embed: an embedding model (vLLM pooling, embeddings)",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM's tool-call parser for this model (hermes, llama3_json, mistral, ...): turns tool calling on "
        "(vLLM runs with --enable-auto-tool-choice --tool-call-parser <it>); vLLM also needs it for a tool_choice "
        "that names a function",
    )
    structured_output: bool = Field(
        default=True, description="response_format with a JSON schema (vLLM's guided decoding) is offered"
    )

    @property
    def served(self) -> str:
        return self.served_name or self.name

    @property
    def instance_name(self) -> str:
        """The model's name for this replica on a cluster: its state file, lock and log there ("m", "m@1")."""
        return self.name if self.replica == 0 else f"{self.name}@{self.replica}"

    def as_replica(self, n: int) -> ModelSpec:
        return self if n == self.replica else self.model_copy(update={"replica": n})

    def instance_bounds(self, cluster: str) -> tuple[int, int]:
        """(min, max) instances of this model on ``cluster``, its per-cluster settings applied."""
        o = self.per_cluster.get(cluster) or ClusterModelArgs()
        low = self.min_instances if o.min_instances is None else o.min_instances
        high = self.max_instances if o.max_instances is None else o.max_instances
        return min(low, high), high

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The gateway's endpoints this model serves (the names usage rows carry)."""
        return ENDPOINTS_BY_KIND[self.kind]

    def capabilities(self) -> dict[str, Any]:
        """What agent and configuration tools ask of a model (on /v1/models)."""
        generate = self.kind == "generate"
        return {
            "kind": self.kind, "endpoints": list(self.endpoints), "context_length": self.context_length,
            "max_output_tokens": (self.max_output_tokens or self.context_length) if generate else None,
            "tools": generate and self.tool_call_parser is not None,
            "structured_output": generate and self.structured_output,
        }  # fmt: skip

    def vllm_args_on(self, cluster: str) -> list[str]:
        """vLLM's arguments on ``cluster``: its own, and what the model's kind and tool parser need."""
        args = list(self.on(cluster).vllm_args or [])
        if self.tool_call_parser and "--tool-call-parser" not in args:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.kind == "embed" and "--runner" not in args and "--task" not in args:
            args += ["--runner", "pooling"]
        return args

    def on(self, cluster: str) -> ClusterModelArgs:
        """Path, port, arguments and environment of this model on ``cluster`` (its overrides applied)."""
        o = self.per_cluster.get(cluster) or ClusterModelArgs()
        return ClusterModelArgs(
            path=o.path or self.path, port=o.port or self.port,
            vllm_args=self.vllm_args if o.vllm_args is None else o.vllm_args, vllm_env={**self.vllm_env, **o.vllm_env},
            gpus=self.gpus if o.gpus is None else o.gpus, min_instances=o.min_instances, max_instances=o.max_instances,
        )  # fmt: skip


class ClusterBlock(Block):
    """A cluster FIRST can run models on."""

    _block_type_name = "FIRST Cluster"
    _block_type_slug = "first-cluster"
    _description = "A compute cluster: how to reach it (local, direct HTTP or Globus Compute) and who may use it."

    spec: ClusterSpec


class ModelBlock(Block):
    """A model FIRST serves, and how vLLM runs it on each cluster."""

    _block_type_name = "FIRST Model"
    _block_type_slug = "first-model"
    _description = "A model: which clusters serve it, the vLLM arguments, and who may use it."

    spec: ModelSpec


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


class Registry(BaseModel):
    """A snapshot of clusters, models and project allocations. The gateway holds one and refreshes it from the
    blocks."""

    clusters: dict[str, ClusterSpec] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    projects: dict[str, ProjectSpec] = Field(default_factory=dict)

    def project_of(self, groups: tuple[str, ...] | list[str]) -> ProjectSpec | None:
        """The project a caller's work is charged to: the first declared project naming one of its groups."""
        for project in self.projects.values():
            if any(g in project.groups for g in groups):
                return project
        return None

    def resolve(self, name: str) -> ModelSpec | None:
        model = self.models.get(name)
        if model is not None:
            return model
        for m in self.models.values():
            if name in m.aliases:
                return m
        return None

    @classmethod
    def embedded_default(cls, settings: Settings) -> Registry:
        """One local cluster, the tiny demo model and the tiny embedding model that `first model build-tiny` writes
        (the embedding model is warmed on first use)."""
        tiny = ModelSpec(
            name="tiny",
            aliases=["first-tiny"],
            clusters=["local"],
            path=str(settings.models_dir / "tiny"),
            port=settings.vllm_port_base,
            # float32: on this CPU kind vLLM's default bfloat16 path killed the worker on the first request.
            # Structured output without free whitespace: with random weights a JSON grammar that allows it fills
            # max_tokens with blanks before it closes.
            vllm_args=[
                "--max-model-len",
                "512",
                "--enforce-eager",
                "--dtype",
                "float32",
                "--structured-outputs-config",
                '{"backend": "xgrammar", "disable_any_whitespace": true}',
            ],
            tool_call_parser="hermes",
            vllm_env={
                "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kv_cache_gib),
                "VLLM_HOST_IP": "127.0.0.1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            },
            context_length=512,
            idle_timeout_s=3600,
            # vLLM CPU's threads keep every core busy; at niceness 10 the gateway and the local endpoint get a
            # core when they need one: the endpoint hop fell from ~2.7 to ~1.1 ms (docs/benchmarks.md).
            nice=10,
        )
        # The embedding model beside it (`first model build-tiny --kind embed`): a BERT encoder, mean pooling.
        embed = tiny.model_copy(update={
            "name": "tiny-embed", "aliases": [], "path": str(settings.models_dir / "tiny-embed"),
            "port": settings.vllm_port_base + 1, "kind": "embed", "idle_timeout_s": 1800, "tool_call_parser": None,
            "vllm_args": ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32"],
        })  # fmt: skip
        return cls(
            clusters={"local": ClusterSpec(name="local", transport="local")}, models={"tiny": tiny, "tiny-embed": embed}
        )

    async def save_blocks(self) -> None:
        for c in self.clusters.values():
            await ClusterBlock(spec=c).save(_slug(c.name), overwrite=True)
        for m in self.models.values():
            await ModelBlock(spec=m).save(_slug(m.name), overwrite=True)
        for p in self.projects.values():
            await ProjectBlock(spec=p).save(_slug(p.name), overwrite=True)

    @classmethod
    async def load_blocks(cls) -> Registry:
        """Read every cluster and model block from the Prefect API."""
        from prefect.client.orchestration import get_client

        reg = cls()
        async with get_client() as client:
            kinds = ((ClusterBlock, reg.clusters), (ModelBlock, reg.models), (ProjectBlock, reg.projects))
            for block_cls, target in kinds:
                try:
                    docs = await client.read_block_documents_by_type(block_cls.get_block_type_slug())
                except (ObjectNotFound, PrefectHTTPStatusError) as exc:
                    if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code != 404:
                        raise
                    continue  # a block type nobody registered yet (projects, before `first registry init`)
                for doc in docs:
                    spec = block_cls.model_validate(doc.data).spec  # type: ignore[attr-defined]
                    target[spec.name] = spec
        return reg

    @classmethod
    async def load(cls, settings: Settings) -> Registry:
        """Blocks when Prefect has them; else the embedded default (and say so)."""
        try:
            reg = await cls.load_blocks()
        except Exception as exc:
            log.warning("could not read cluster/model blocks from Prefect (%s); using the embedded default", exc)
            return cls.embedded_default(settings)
        if not reg.models:
            log.info("no model blocks in Prefect yet; using the embedded default")
            return cls.embedded_default(settings)
        return reg

    def describe(self) -> dict[str, Any]:
        return self.model_dump()

    # ---- declared in a file (`first apply`) ----

    @classmethod
    def from_yaml(cls, text: str) -> Registry:
        """A registry declared in YAML: ``clusters:``, ``models:`` and (optional) ``projects:``, each a list of
        specs (the block fields).
        Raises ``ValueError`` naming every problem: unknown keys, duplicates, models on undeclared clusters."""
        import yaml
        from pydantic import ValidationError

        doc = yaml.safe_load(text) or {}
        keys = {"clusters", "models", "projects"}
        if not isinstance(doc, dict) or set(doc) - keys:
            extra = sorted(set(doc) - keys) if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"a registry file has the lists clusters:, models: and projects: (found {extra})")
        problems: list[str] = []
        reg = cls()
        lists = (("clusters", ClusterSpec, reg.clusters), ("models", ModelSpec, reg.models),
                 ("projects", ProjectSpec, reg.projects))  # fmt: skip
        for key, spec_cls, target in lists:
            for i, item in enumerate(doc.get(key) or []):
                label = f"{key}[{i}] ({item.get('name', '?') if isinstance(item, dict) else '?'})"
                stray = unknown_keys(spec_cls, item)
                problems += [f"{label}: {p}" for p in stray]
                try:
                    spec = spec_cls.model_validate(item)
                except ValidationError as exc:
                    for e in exc.errors():
                        where = ".".join(str(x) for x in e["loc"])
                        problems.append(f"{label}: {where}: {e['msg']}")
                    continue
                if spec.name in target:
                    problems.append(f"{key}: {spec.name!r} is declared twice")
                target[spec.name] = spec  # type: ignore[assignment]
        for m in reg.models.values():
            missing = [c for c in m.clusters if c not in reg.clusters]
            if missing:
                problems.append(f"models: {m.name!r} runs on undeclared cluster(s) {missing}")
            stray = [c for c in m.per_cluster if c not in m.clusters]
            if stray:
                problems.append(f"models: {m.name!r} has per_cluster settings for {stray}, not in its clusters")
        charged: dict[str, str] = {}
        for p in reg.projects.values():
            for g in p.groups:
                if g in charged:
                    problems.append(f"projects: group {g!r} is in both {charged[g]!r} and {p.name!r}")
                charged.setdefault(g, p.name)
        if problems:
            raise ValueError("the registry file has problems:\n  " + "\n  ".join(problems))
        return reg

    def plan(self, desired: Registry, prune: bool = False) -> list[tuple[str, str, str]]:
        """What applying ``desired`` over this registry does: (action, kind, name), action one of create,
        update, unchanged, delete (only with ``prune``)."""
        out: list[tuple[str, str, str]] = []
        kinds = (("cluster", self.clusters, desired.clusters), ("model", self.models, desired.models),
                 ("project", self.projects, desired.projects))  # fmt: skip
        for kind, have, want in kinds:
            for name, spec in want.items():
                action = "create" if name not in have else ("unchanged" if have[name] == spec else "update")
                out.append((action, kind, name))
            out += [("delete" if prune else "keep", kind, name) for name in have if name not in want]
        return out

    async def apply(self, desired: Registry, prune: bool = False) -> list[tuple[str, str, str]]:
        """Make the blocks match ``desired`` (this registry being what the blocks hold now)."""
        from prefect.client.orchestration import get_client

        steps = self.plan(desired, prune)
        for action, kind, name in steps:
            if action in ("create", "update"):
                if kind == "cluster":
                    await ClusterBlock(spec=desired.clusters[name]).save(_slug(name), overwrite=True)
                elif kind == "model":
                    await ModelBlock(spec=desired.models[name]).save(_slug(name), overwrite=True)
                else:
                    await ProjectBlock(spec=desired.projects[name]).save(_slug(name), overwrite=True)
        deletions = [(kind, name) for action, kind, name in steps if action == "delete"]
        if deletions:
            async with get_client() as client:
                for kind, name in deletions:
                    block_cls = {"cluster": ClusterBlock, "model": ModelBlock, "project": ProjectBlock}[kind]
                    doc = await client.read_block_document_by_name(_slug(name), block_cls.get_block_type_slug())
                    await client.delete_block_document(doc.id)
        return steps
