"""The production topology's files, checked where they cannot run (no Docker daemon, no Kubernetes here): the image
passes hadolint and holds every package; every manifest validates against Kubernetes' schema, strictly; compose and
Kubernetes declare the same gateway environment, each name a real FIRST setting; and the multi-replica e2e test
(tests/e2e/test_replicas_e2e.py) runs the gateways with compose's environment (``compose_gateway_env``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from core.settings import REPO_ROOT, Settings

DEPLOY = REPO_ROOT / "deploy"
BIN = Path(sys.executable).parent


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_gateway_env() -> dict[str, str]:
    """The environment compose gives its gateway replicas (less FIRST_REPLICA, which each sets for itself)."""
    env = dict(compose()["services"]["gateway-1"]["environment"])
    env.pop("FIRST_REPLICA")
    return env


def k8s_docs() -> list[dict]:
    return [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_the_image_passes_hadolint_and_holds_every_package() -> None:
    r = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "warning", str(DEPLOY / "Dockerfile")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    packages = re.search(r"include = \[(.*?)\]", (REPO_ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert f"COPY {pkg} {pkg}" in dockerfile, pkg
    assert "USER 10001" in dockerfile and 'ENTRYPOINT ["first"]' in dockerfile  # non-root; one image for all roles


def test_every_manifest_validates_strictly_and_kustomize_lists_them() -> None:
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    manifests = [f for f in files if f.name != "kustomization.yaml"]
    r = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, manifests)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    listed = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f.name for f in manifests if f.name != "secret.example.yaml")


def test_compose_and_kubernetes_declare_the_same_topology_and_real_settings() -> None:
    services = compose()["services"]
    gateways = [name for name, s in services.items() if s.get("command", [None])[0] == "gateway"]
    assert len(gateways) >= 2 and {"postgres", "redis", "prefect", "worker", "caddy"} <= set(services)
    assert len({services[g]["environment"]["FIRST_REPLICA"] for g in gateways}) == len(gateways)
    docs = k8s_docs()
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway")
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "first-config")["data"]
    k8s_env = set(config) | {e["name"] for e in container["env"]}
    assert k8s_env - {"FIRST_REPLICA"} == set(compose_gateway_env())
    fields = {f"FIRST_{name.upper()}" for name in Settings.model_fields}
    systemd = {line.split("=", 1)[0] for line in (DEPLOY / "systemd" / "first.env.example").read_text().splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    for name in k8s_env | set(compose_gateway_env()) | systemd:
        assert not name.startswith("FIRST_") or name in fields, f"{name} is not a FIRST setting"


def test_deployments_register_for_process_docker_and_kubernetes_pools() -> None:
    """prefect.yaml's deployments, on the pool a site runs; container pools get the image and its /app, a process
    pool the code where FIRST_REPO_ROOT says: no pull step assumes a checkout of this repository."""
    import pytest

    from deployments.local import DEPLOYMENTS, WORK_POOL
    from deployments.register import prefect_file

    original = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    process = prefect_file(WORK_POOL, "process")
    assert process["deployments"] == original["deployments"]  # make run's pool is prefect.yaml as written
    assert process["pull"] == original["pull"]
    k8s = prefect_file("first-k8s", "kubernetes", "registry.example.org/first/gateway:1")
    assert [d["name"] for d in k8s["deployments"]] == [d["name"] for d in original["deployments"]]
    assert len(k8s["deployments"]) == len(DEPLOYMENTS)
    image = "registry.example.org/first/gateway:1"
    assert all(d["work_pool"] == {"name": "first-k8s", "job_variables": {"image": image}} for d in k8s["deployments"])
    assert k8s["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    with pytest.raises(ValueError, match="--image"):
        prefect_file("p", "docker")
