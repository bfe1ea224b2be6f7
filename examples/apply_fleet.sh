#!/usr/bin/env bash
# `first apply` with a fleet file: show the plan, apply it, and see the result in the registry.
#
#     examples/apply_fleet.sh [FILE]        # default examples/fleet.yaml; needs `make run` (or PREFECT_API_URL)
#
# Running gateways follow within FIRST_REGISTRY_REFRESH_S (5 s); the lifecycle deployments' model and cluster
# drop-downs in the Prefect UI follow at once.
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST=${FIRST:-.venv/bin/first}
FILE=${1:-examples/fleet.yaml}

"$FIRST" apply "$FILE" --dry-run      # what would change; nothing is saved
"$FIRST" apply "$FILE"                # saves a FIRST Cluster / Model / Project block per entry
"$FIRST" registry show | .venv/bin/python -c '
import json, sys
registry = json.load(sys.stdin)
for kind in ("clusters", "models", "projects"):
    print(kind + ": " + ", ".join(sorted(registry[kind])))'
