"""An operator's warm-up through the Prefect API: run the `warm-up` deployment as the UI's "Run" button does,
wait for it, and see the model hot through the OpenAI API.

    .venv/bin/python examples/prefect_warm_up.py [MODEL] [CLUSTER]      # default: tiny best

Finds the Prefect server from PREFECT_API_URL (and PREFECT_API_AUTH_STRING, its password), else from `make run`'s
.first/prefect-api-url and .first/prefect-api-auth. Access to the Prefect API is admin access to the fleet.
"""

from __future__ import annotations

import os
import sys
import time

from _connect import FIRST_HOME, api_key, base_url
from openai import OpenAI

if "PREFECT_API_URL" not in os.environ and (FIRST_HOME / "prefect-api-url").exists():
    os.environ["PREFECT_API_URL"] = (FIRST_HOME / "prefect-api-url").read_text().strip()
    os.environ.setdefault("PREFECT_API_AUTH_STRING", (FIRST_HOME / "prefect-api-auth").read_text().strip())

from prefect.deployments import run_deployment  # after the environment names the server

model = sys.argv[1] if len(sys.argv) > 1 else "tiny"
cluster = sys.argv[2] if len(sys.argv) > 2 else "best"

print(f"warm-up of {model} on {cluster} via {os.environ.get('PREFECT_API_URL')} ...")
run = run_deployment("warm-up/warm-up", parameters={"model": model, "cluster": cluster}, timeout=600)
print(f"flow run {run.name}: {run.state.name}")  # the run, its task runs and its artifact are in the UI
if not run.state.is_completed():
    raise SystemExit(f"the warm-up did not complete: {run.state.message}")

# The gateways follow a lifecycle run within about 2 s: the model's state per cluster, as callers see it.
client = OpenAI(base_url=base_url(), api_key=api_key())
for _ in range(20):
    state = client.models.retrieve(model).model_extra.get("state", {})
    if "hot" in state.values():
        break
    time.sleep(0.5)
print(f"{model}: {state}")
