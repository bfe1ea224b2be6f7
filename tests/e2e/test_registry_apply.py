"""`first apply` against the session's real Prefect server: a dry run changes nothing, applying saves the
blocks, `first registry show` prints them, and a file with a mistake is refused with its problems named.
(Runs after the other e2e modules: it adds a cluster and a model to the shared registry.)"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

DECLARED = """
clusters:
  - name: local
    transport: local
  - name: polaris
    transport: globus-compute
    endpoint_id: 4b116d3c-1703-4f8f-9f6f-39921e5864df
    scheduler: pbs
models:
  - name: llama-70b
    aliases: [llama]
    path: /eagle/models/llama-70b
    clusters: [polaris]
    limits: {rpm: 60, tpm: 200000}
"""


def test_apply_saves_the_declared_registry(stack: Stack, tmp_path) -> None:
    f = tmp_path / "registry.yaml"
    f.write_text(DECLARED)
    dry = stack.first("apply", str(f), "--dry-run")
    assert "create" in dry.stderr and "polaris" in dry.stderr
    before = json.loads(stack.first("registry", "show").stdout)
    assert "polaris" not in before["clusters"]  # a dry run saves nothing

    applied = stack.first("apply", str(f))
    assert "llama-70b" in applied.stderr
    shown = json.loads(stack.first("registry", "show").stdout)
    assert shown["clusters"]["polaris"]["scheduler"] == "pbs"
    assert shown["models"]["llama-70b"]["limits"] == {"rpm": 60, "tpm": 200000}
    assert "tiny" in shown["models"]  # not in the file, kept (no --prune)
    again = stack.first("apply", str(f), "--dry-run")
    assert "create" not in again.stderr and "unchanged" in again.stderr

    f.write_text(DECLARED.replace("clusters: [polaris]", "clusters: [aurora]"))
    bad = stack.first("apply", str(f), check=False)
    assert bad.returncode == 1 and "undeclared cluster(s) ['aurora']" in bad.stderr
