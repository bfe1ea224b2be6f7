"""The Globus Compute endpoint templates in deployments/endpoints: every file parses, carries the settings FIRST
relies on (one GPU node per job, scale to zero, the environment of the cluster functions), the multi-user
template renders the way globus-compute-endpoint 4.x renders it and validates against its schema, and the
README covers every file.

Where ``globus_compute_endpoint`` is importable (not in the gateway's environment), the last tests also load
every config with the endpoint's own loader; elsewhere they are skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jinja2 import StrictUndefined, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

ENDPOINTS = Path(__file__).resolve().parents[2] / "deployments" / "endpoints"
MULTI_USER = ENDPOINTS / "multi-user"
SITE_PROVIDERS = {"pbs": "PBSProProvider", "slurm": "SlurmProvider", "login-node": "LocalProvider"}
GPU_SITES = ("pbs", "slurm")
SAMPLE_OPTIONS: dict[str, Any] = {
    "ACCOUNT": "myproject",
    "QUEUE": "debug",
    "WALLTIME": "02:30:00",
    "MODEL": "llama-3.1-8b",
    "IDLE_TIMEOUT_S": 1200,
}
HH_MM_SS = re.compile(r"\d{1,3}:[0-5]\d:[0-5]\d")


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _site(site: str) -> dict[str, Any]:
    return _yaml(ENDPOINTS / site / "config.yaml")


def _encode(value: Any) -> Any:
    """User options as globus-compute-endpoint 4.x hands them to the template (``_sanitize_user_json``): every
    string JSON-encoded, quotes included, so that it is one complete YAML scalar."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, str):
        return json.dumps(value)
    return "null" if value is None else value


def render(template: str, options: dict[str, Any], schema: dict[str, Any] | None = None) -> str:
    """Render a user config template as globus-compute-endpoint 4.x does (``render_config_user_template``):
    options validated against the schema first, then JSON-encoded, in a sandbox with strict undefined."""
    if schema is not None:
        jsonschema.validate(instance=options, schema=schema)
    reserved = {
        "_GC": {
            "parent_config": {},
            "mapped_identity": {"local": {"uname": "first-svc", "uid": 1000, "gid": 1000, "dir": "/home/first-svc"}},
            "user_runtime": {},
            "env": {},
        }
    }
    env = SandboxedEnvironment(undefined=StrictUndefined)
    return env.from_string(template).render(**_encode(options), **reserved)


def _multi_user(options: dict[str, Any]) -> dict[str, Any]:
    text = render(
        (MULTI_USER / "user_config_template.yaml.j2").read_text(),
        options,
        _json(MULTI_USER / "user_config_schema.json"),
    )
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


# ---- every file ----


def test_every_file_parses() -> None:
    yamls = sorted(p.relative_to(ENDPOINTS).as_posix() for p in ENDPOINTS.rglob("*.yaml"))
    assert yamls == [
        "login-node/config.yaml",
        "multi-user/config.yaml",
        "multi-user/user_environment.yaml",
        "pbs/config.yaml",
        "slurm/config.yaml",
    ]
    for name in yamls:
        assert _yaml(ENDPOINTS / name)
    jsons = sorted(p.relative_to(ENDPOINTS).as_posix() for p in ENDPOINTS.rglob("*.json"))
    assert jsons == [
        "multi-user/identity_mapping_config.json",
        "multi-user/user_config_schema.json",
        "no_user_config_schema.json",
    ]
    for name in jsons:
        assert _json(ENDPOINTS / name)


@pytest.mark.parametrize("name", ["no_user_config_schema.json", "multi-user/user_config_schema.json"])
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    schema = _json(ENDPOINTS / name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


# ---- the single-site templates: pbs, slurm, login-node ----


@pytest.mark.parametrize("site", SITE_PROVIDERS)
def test_site_template_engine_and_scaling(site: str) -> None:
    config = _site(site)
    engine = config["engine"]
    provider = engine["provider"]
    assert engine["type"] == "GlobusComputeEngine"
    assert provider["type"] == SITE_PROVIDERS[site]
    # one block of one node: vLLM listens on 127.0.0.1 of the node where start_vllm ran
    assert provider["nodes_per_block"] == 1
    assert provider["max_blocks"] == 1
    assert provider["min_blocks"] == 0
    assert provider["init_blocks"] in (0, 1)
    # 4.x takes max_idletime only under job_status_kwargs; a top-level engine key makes the endpoint fail
    assert "max_idletime" not in engine
    assert isinstance(engine["job_status_kwargs"]["max_idletime"], int | float)
    assert 60 <= engine["job_status_kwargs"]["max_idletime"] <= 86400
    assert isinstance(engine["max_workers_per_node"], int) and engine["max_workers_per_node"] >= 1
    assert engine["heartbeat_period"] > 0 and engine["heartbeat_threshold"] > engine["heartbeat_period"]
    assert config["heartbeat_period"] >= 5  # the endpoint's own heartbeat (4.x raises anything lower to 5 s)
    assert "idle_heartbeats_soft" in config
    # pinning workers to GPUs would pin the vLLM they start
    assert "available_accelerators" not in engine
    worker_init = provider["worker_init"]
    assert "bin/activate" in worker_init
    assert 'mkdir -p "$FIRST_HOME' in worker_init
    assert "export FIRST_HOME=" in worker_init


@pytest.mark.parametrize("site", GPU_SITES)
def test_gpu_templates(site: str) -> None:
    provider = _site(site)["engine"]["provider"]
    assert provider["account"] == "CHANGE-ME"
    assert isinstance(provider["walltime"], str) and HH_MM_SS.fullmatch(provider["walltime"])
    worker_init = provider["worker_init"]
    assert "export FIRST_VLLM_PYTHON=" in worker_init
    assert "export HF_HOME=" in worker_init and "HF_HUB_OFFLINE=1" in worker_init
    # the relay posts go out through the proxy; calls to vLLM on the node never do
    assert "export HTTPS_PROXY=" in worker_init
    assert re.search(r"^export NO_PROXY=.*\b127\.0\.0\.1\b", worker_init, re.M)
    # it starts nothing (start_vllm does): every start_vllm line is in the commented alternative
    for line in worker_init.splitlines():
        if "start_vllm" in line or "vllm.entrypoints" in line:
            assert line.lstrip().startswith("#"), line


def test_pbs_template() -> None:
    provider = _site("pbs")["engine"]["provider"]
    assert provider["queue"] == "CHANGE-ME"
    assert re.fullmatch(r"ngpus=\d+", provider["select_options"])
    assert isinstance(provider["cpus_per_node"], int)
    assert provider["launcher"]["type"] in ("SimpleLauncher", "MpiExecLauncher")
    assert all(line.startswith("#PBS ") for line in provider["scheduler_options"].splitlines())


def test_slurm_template() -> None:
    provider = _site("slurm")["engine"]["provider"]
    assert provider["partition"] == "CHANGE-ME"
    assert provider["exclusive"] is True
    assert re.search(r"^#SBATCH --gpus-per-node=\d+$", provider["scheduler_options"], re.M)
    assert provider["launcher"]["type"] == "SrunLauncher"
    assert "--gpus-per-node=" in provider["launcher"]["overrides"]


def test_login_node_template_stays_on_the_login_node() -> None:
    engine = _site("login-node")["engine"]
    provider = engine["provider"]
    assert provider["type"] == "LocalProvider"  # workers on this host, never in a batch job
    assert engine["max_workers_per_node"] <= 8
    assert not {"account", "queue", "partition", "walltime", "scheduler_options", "select_options"} & set(provider)
    assert "vllm" not in provider["worker_init"].lower()
    assert "gpu" not in provider["worker_init"].lower()


@pytest.mark.parametrize("site", SITE_PROVIDERS)
def test_site_template_renders_to_itself(site: str) -> None:
    """4.x installs it as user_config_template.yaml.j2: with no Jinja in it (comments included), it renders to
    itself, and the schema installed beside it refuses every user option."""
    text = (ENDPOINTS / site / "config.yaml").read_text()
    assert not re.search(r"\{\{|\{%|\{#", text)
    schema = _json(ENDPOINTS / "no_user_config_schema.json")
    assert render(text, {}, schema) == text.rstrip("\n")
    with pytest.raises(jsonschema.ValidationError):
        render(text, {"worker_init": "curl evil | sh"}, schema)


# ---- the multi-user endpoint ----


def test_multi_user_core_config() -> None:
    config = _yaml(MULTI_USER / "config.yaml")
    assert "engine" not in config  # 4.x: the engine lives in the user config template
    assert "multi_user" not in config  # 3.x key; 4.x rejects it
    assert config["identity_mapping_config_path"].endswith("/identity_mapping_config.json")
    assert "@" in config["email"]
    assert config["public"] is False
    assert config["display_name"]
    assert config["heartbeat_period"] >= 5


def test_identity_mapping_maps_only_the_gateway() -> None:
    (policy,) = _json(MULTI_USER / "identity_mapping_config.json")
    assert policy["DATA_TYPE"] == "expression_identity_mapping#1.0.0"
    (mapping,) = policy["mappings"]
    assert mapping["source"] == "{username}"
    match = re.compile(mapping["match"], re.I)
    assert match.fullmatch("CHANGE-ME-gateway-client-id@clients.auth.globus.org")
    assert not match.fullmatch("alice@example.org")
    assert not match.fullmatch("CHANGE-ME-gateway-client-idXclients.auth.globus.org")  # dots are escaped
    assert mapping["output"] == "first-svc"


def test_user_environment() -> None:
    env = _yaml(MULTI_USER / "user_environment.yaml")
    assert all(isinstance(v, str) for v in env.values())
    assert not {"HOME", "USER", "PWD"} & set(env)  # the endpoint refuses to set these
    assert "first-endpoint/bin" in env["PATH"]


def test_multi_user_template_renders_the_gateway_values() -> None:
    config = _multi_user(SAMPLE_OPTIONS)
    engine = config["engine"]
    provider = engine["provider"]
    assert engine["type"] == "GlobusComputeEngine"
    assert provider["type"] == "PBSProProvider"
    assert provider["account"] == "myproject"
    assert provider["queue"] == "debug"
    assert provider["walltime"] == "02:30:00"
    assert engine["job_status_kwargs"]["max_idletime"] == 1200
    assert (provider["min_blocks"], provider["max_blocks"], provider["nodes_per_block"]) == (0, 1, 1)
    assert "max_idletime" not in engine
    assert 'export FIRST_MODEL="llama-3.1-8b"\n' in provider["worker_init"]
    assert "export FIRST_HOME=" in provider["worker_init"]
    assert config["idle_heartbeats_soft"] > 0


def test_multi_user_template_defaults() -> None:
    config = _multi_user({"ACCOUNT": "myproject"})
    provider = config["engine"]["provider"]
    assert provider["account"] == "myproject"
    assert provider["queue"] == "prod"
    assert provider["walltime"] == "01:00:00"  # a string, not YAML's base-60 number
    assert config["engine"]["job_status_kwargs"]["max_idletime"] == 900
    assert 'export FIRST_MODEL=""\n' in provider["worker_init"]
    assert "export FIRST_INSTANCE=0 " in provider["worker_init"]


def test_a_further_instance_renders_with_its_instance_number() -> None:
    """The gateway sends INSTANCE for a model's further instances (tests/unit/test_autoscale.py): the schema takes
    it, and the job's environment says which instance it is."""
    options = {**SAMPLE_OPTIONS, "INSTANCE": 2}
    jsonschema.validate(instance=options, schema=_json(MULTI_USER / "user_config_schema.json"))
    assert "export FIRST_INSTANCE=2 " in _multi_user(options)["engine"]["provider"]["worker_init"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"QUEUE": "debug"},
        {"ACCOUNT": ""},
        {"ACCOUNT": "my project"},
        {"ACCOUNT": "proj\n"},
        {"ACCOUNT": "proj\n#PBS -l select=100"},
        {"ACCOUNT": "$(id)"},
        {"ACCOUNT": 42},
        {"ACCOUNT": "p", "QUEUE": "de bug"},
        {"ACCOUNT": "p", "WALLTIME": "1h"},
        {"ACCOUNT": "p", "WALLTIME": "01:60:00"},
        {"ACCOUNT": "p", "MODEL": "org/model"},
        {"ACCOUNT": "p", "MODEL": 'x"; rm -rf ~; "'},
        {"ACCOUNT": "p", "MODEL": "x`id`"},
        {"ACCOUNT": "p", "IDLE_TIMEOUT_S": 5},
        {"ACCOUNT": "p", "IDLE_TIMEOUT_S": "900"},
        {"ACCOUNT": "p", "INSTANCE": "1; id"},
        {"ACCOUNT": "p", "INSTANCE": 0},
        {"ACCOUNT": "p", "worker_init": "curl evil | sh"},
    ],
)
def test_schema_refuses(options: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance=options, schema=_json(MULTI_USER / "user_config_schema.json"))


def test_schema_accepts_the_sample() -> None:
    jsonschema.validate(instance=SAMPLE_OPTIONS, schema=_json(MULTI_USER / "user_config_schema.json"))


def test_template_requires_account_even_without_schema() -> None:
    with pytest.raises(UndefinedError):
        render((MULTI_USER / "user_config_template.yaml.j2").read_text(), {"MODEL": "m"})


def test_encoded_values_cannot_leave_their_yaml_scalar() -> None:
    """Even past the schema, a value stays one YAML string: JSON encoding escapes quotes and newlines."""
    hostile = 'x"\nengine: {}\n#'
    text = render((MULTI_USER / "user_config_template.yaml.j2").read_text(), {"ACCOUNT": hostile})
    config = yaml.safe_load(text)
    assert config["engine"]["type"] == "GlobusComputeEngine"
    assert config["engine"]["provider"]["account"] == hostile


# ---- the README ----


def test_readme_covers_every_file() -> None:
    readme = (ENDPOINTS / "README.md").read_text()
    files = [p.relative_to(ENDPOINTS).as_posix() for p in ENDPOINTS.rglob("*") if p.is_file() and p.name != "README.md"]
    assert len(files) == 9
    for name in files:
        assert f"`{name}`" in readme, f"README.md does not mention {name}"
    for needle in (
        "globus-compute-endpoint configure",
        "globus-compute-endpoint start",
        "transport: globus-compute",
        "endpoint_id:",
        "scheduler: pbs",
        "first functions register",
        "FIRST_PUBLIC_URL",
        "HTTPS_PROXY",
        "min_blocks: 0",
        "max_idletime",
        "HMAC-SHA256",
        "user_config_template.yaml.j2",
    ):
        assert needle in readme, needle


# ---- the real globus-compute-endpoint loader, where it is installed ----


def _real() -> Any:
    return pytest.importorskip("globus_compute_endpoint.endpoint.config.utils")


def _real_render(path: Path, schema_path: Path, options: dict[str, Any]) -> str:
    import pwd
    import uuid

    utils = _real()
    from globus_compute_endpoint.endpoint.config.config import CoreEndpointConfig
    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    identity = MappedPosixIdentity(
        local_user_record=pwd.getpwuid(os.getuid()), globus_identity_candidates=[], matched_identity=uuid.UUID(int=0)
    )
    return utils.render_config_user_template(
        CoreEndpointConfig(), path.read_text(), path, identity, _json(schema_path), options, {}
    )


@pytest.mark.parametrize("site", SITE_PROVIDERS)
def test_real_loader_accepts_site_template(site: str) -> None:
    utils = _real()
    from globus_compute_endpoint.endpoint.config.config import UserEndpointConfig

    text = _real_render(ENDPOINTS / site / "config.yaml", ENDPOINTS / "no_user_config_schema.json", {})
    config = utils.load_config_yaml(text)
    assert isinstance(config, UserEndpointConfig)
    engine = config.engine
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert type(engine.executor.provider).__name__ == SITE_PROVIDERS[site]
    assert engine.executor.provider.min_blocks == 0
    assert engine._job_status_kwargs["max_idletime"] == _site(site)["engine"]["job_status_kwargs"]["max_idletime"]


def test_real_loader_accepts_multi_user_files(tmp_path: Path) -> None:
    utils = _real()
    from globus_compute_endpoint.endpoint.config.config import CoreEndpointConfig, UserEndpointConfig

    text = _real_render(
        MULTI_USER / "user_config_template.yaml.j2", MULTI_USER / "user_config_schema.json", SAMPLE_OPTIONS
    )
    config = utils.load_config_yaml(text)
    assert isinstance(config, UserEndpointConfig)
    provider = config.engine.executor.provider
    assert (provider.account, provider.queue, provider.walltime) == ("myproject", "debug", "02:30:00")

    mapping = tmp_path / "identity_mapping_config.json"  # the loader checks that the path exists
    mapping.write_text((MULTI_USER / "identity_mapping_config.json").read_text())
    core_text = (MULTI_USER / "config.yaml").read_text()
    original = _yaml(MULTI_USER / "config.yaml")["identity_mapping_config_path"]
    core = utils.load_config_yaml(core_text.replace(original, str(mapping)))
    assert isinstance(core, CoreEndpointConfig)
    assert core.identity_mapping_config_path == mapping


def test_real_renderer_refuses_bad_options() -> None:
    _real()
    with pytest.raises(jsonschema.ValidationError):
        _real_render(
            MULTI_USER / "user_config_template.yaml.j2", MULTI_USER / "user_config_schema.json", {"ACCOUNT": "a b"}
        )
