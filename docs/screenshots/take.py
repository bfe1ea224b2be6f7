"""Screenshots of the Prefect UI for the README's operator section, taken with headless Chromium.

Needs a running local Prefect server with FIRST's state in it (`make run`, or `first run`: the warm-up flow
run, its artifact and the FIRST Cluster blocks), the system Chromium, and Playwright in a venv of its own
(not the project's .venv: Playwright is not a dependency of FIRST). Playwright's own browser download is not
used: it drives /usr/bin/chromium.

    apt-get install -y chromium
    python3 -m venv /tmp/shots-venv && /tmp/shots-venv/bin/pip install playwright
    /tmp/shots-venv/bin/python docs/screenshots/take.py --ui http://127.0.0.1:4200 --out docs/screenshots

Without Playwright (or with --cli) it falls back to Chromium's own `--headless --screenshot` with a virtual
time budget; that needs nothing but the standard library (any python3 runs it), but waits for a fixed budget
instead of for the page's content.

`--site URL` takes the documentation site's instead (`make docs-screenshots` builds and serves it):
    site-home.png, site-api-reference.png (1440 wide).

Writes, at 1440x900:
    deployments.png       /deployments
    warm-up-run.png       /runs/flow-run/<id>                (the latest warm-up run, Logs tab)
    warm-up-task-runs.png /runs/flow-run/<id>?tab=Task%20Runs (that run's steps, one task run each)
    warm-up-artifact.png  /artifacts/artifact/<id>           (that run's markdown artifact;
                          /runs/flow-run/<id>?tab=Artifacts when the run made none)
    blocks.png            /blocks
    cluster-block.png     /blocks/block/<id>                 (a FIRST Cluster block, "local" first)
    batch-task-runs.png   /runs/flow-run/<id>?tab=Task%20Runs (the latest finished run-batch run)
    batch-progress.png    /artifacts/artifact/<id>           (its progress artifact)
    event-feed-model.png  /events?resource=first.model.tiny  (the Event Feed filtered by a model)
The Prefect API's password is read from --auth-file (`make run` writes FIRST_HOME/prefect-api-auth) and given to
the UI as its login does (localStorage "prefect-password"). --only NAME,... takes only those screenshots.
The ids come from the server's REST API (POST /api/flow_runs/filter, /api/artifacts/filter,
/api/block_documents/filter).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WIDTH, HEIGHT = 1440, 900
AUTH: str | None = None  # the Prefect API's "user:password", when it has one


def api(ui: str, path: str, body: dict) -> list[dict]:
    headers = {"Content-Type": "application/json"}
    if AUTH:
        headers["Authorization"] = "Basic " + base64.b64encode(AUTH.encode()).decode()
    req = urllib.request.Request(f"{ui}/api{path}", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def find_pages(ui: str) -> list[tuple[str, str, list[str]]]:
    """(file name, UI path, texts that show the page has rendered) for each screenshot."""
    pages: list[tuple[str, str, list[str]]] = []
    deps = api(ui, "/deployments/filter", {"limit": 50})
    pages.append(("deployments.png", "/deployments", [d["name"] for d in deps[:1]]))

    runs = api(
        ui,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": ["warm-up"]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 20},
    )
    if not runs:
        sys.exit(f"no warm-up flow run on {ui}: start the stack (`first run`) and let the warm-up finish")
    # The latest finished run that made an artifact (a run that found the model already hot makes none).
    arts = api(
        ui,
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [r["id"] for r in runs]}}, "sort": "CREATED_DESC", "limit": 50},
    )
    by_run = {a["flow_run_id"]: a for a in arts}
    done = [r for r in runs if (r.get("state") or {}).get("type") == "COMPLETED"] or runs
    run = next((r for r in done if r["id"] in by_run), done[0])
    pages.append(("warm-up-run.png", f"/runs/flow-run/{run['id']}", [run["name"], "is hot at"]))
    pages.append(("warm-up-task-runs.png", f"/runs/flow-run/{run['id']}?tab=Task%20Runs", ["check-status"]))
    art = by_run.get(run["id"])
    if art:
        pages.append(("warm-up-artifact.png", f"/artifacts/artifact/{art['id']}", ["Warm-up of"]))
    else:
        print(f"  run {run['name']} made no artifact: taking its Artifacts tab", file=sys.stderr)
        pages.append(("warm-up-artifact.png", f"/runs/flow-run/{run['id']}?tab=Artifacts", [run["name"]]))

    batches = api(ui, "/flow_runs/filter", {"flows": {"name": {"any_": ["run-batch"]}},
                                             "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                             "sort": "EXPECTED_START_TIME_DESC", "limit": 1})  # fmt: skip
    if batches:
        run = batches[0]
        pages.append(("batch-task-runs.png", f"/runs/flow-run/{run['id']}?tab=Task%20Runs", ["finalize"]))
        arts = api(ui, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        if arts:
            pages.append(("batch-progress.png", f"/artifacts/artifact/{arts[0]['id']}", [arts[0]["key"] or ""]))
    else:
        print("  no finished run-batch run: skipping the batch screenshots", file=sys.stderr)

    blocks = api(ui, "/block_documents/filter", {"block_types": {"slug": {"any_": ["first-cluster"]}}})
    pages.append(("blocks.png", "/blocks", [b["name"] for b in blocks[:1]]))
    if blocks:
        block = next((b for b in blocks if b["name"] == "local"), blocks[0])
        pages.append(("cluster-block.png", f"/blocks/block/{block['id']}", [block["name"]]))
    else:
        print("  no FIRST Cluster block: skipping cluster-block.png", file=sys.stderr)
    # The Event Feed filtered by a model: every request's first.inference.* event (flows/inference_events.py).
    pages.append(("event-feed-model.png", "/events?resource=first.model.tiny", ["first.inference"]))
    return pages


def shoot_playwright(ui: str, out: Path, pages, chromium: str, settle_s: float) -> None:
    from playwright.sync_api import TimeoutError as PWTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
        if AUTH:  # what the UI's login page stores
            token = base64.b64encode(AUTH.encode()).decode()
            ctx.add_init_script(f"window.localStorage.setItem('prefect-password', '{token}')")
        page = ctx.new_page()
        for name, path, texts in pages:
            t0 = time.monotonic()
            page.goto(ui + path, wait_until="domcontentloaded")
            # The SPA polls the API, so network idle may never come: bounded waits, then the texts.
            try:
                page.wait_for_load_state("networkidle", timeout=15_000)
            except PWTimeout:
                pass
            for text in texts:
                try:
                    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=15_000)
                except PWTimeout:
                    print(f"  {name}: {text!r} did not show within 15 s", file=sys.stderr)
            page.wait_for_timeout(settle_s * 1000)  # let charts, markdown and log lines settle
            page.screenshot(path=str(out / name))
            print(f"  {name}  {ui}{path}  ({time.monotonic() - t0:.1f} s)")
        browser.close()


def _shot(chromium: str, url: str, file: Path, height: int, budget_ms: int) -> None:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={WIDTH},{height}", f"--virtual-time-budget={budget_ms}",
           f"--screenshot={file}", url]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"  {file.name}  {url}")


def shoot_cli(ui: str, out: Path, pages, chromium: str, budget_ms: int) -> None:
    for name, path, _ in pages:
        _shot(chromium, ui + path, out / name, HEIGHT, budget_ms)


# The documentation site's pages (`--site URL`, a server over site/ after `make docs`): file, path, window height.
SITE_PAGES = (("site-home.png", "/", 1000), ("site-api-reference.png", "/users/api/", 2100))


def shoot_site(site: str, out: Path, chromium: str, budget_ms: int) -> None:
    for name, path, height in SITE_PAGES:
        _shot(chromium, site + path, out / name, height, budget_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ui", default="http://127.0.0.1:4200", help="Prefect UI/API base URL")
    ap.add_argument("--out", default=str(Path(__file__).parent), help="folder for the PNGs")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--cli", action="store_true", help="use chromium --screenshot instead of Playwright")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the page has rendered")
    ap.add_argument("--budget-ms", type=int, default=15_000, help="virtual time budget for --cli")
    ap.add_argument(
        "--auth-file",
        default=str(Path(__file__).resolve().parents[2] / ".first" / "prefect-api-auth"),
        help="the Prefect API password file (`make run`: FIRST_HOME/prefect-api-auth)",
    )
    ap.add_argument("--only", help="comma-separated file names to take (default: all)")
    ap.add_argument("--site", help="instead: the documentation site's home and API reference, served at this URL")
    args = ap.parse_args()
    if args.site:
        shoot_site(args.site.rstrip("/"), Path(args.out), args.chromium, min(args.budget_ms, 5000))
        return
    global AUTH
    if Path(args.auth_file).exists():
        AUTH = Path(args.auth_file).read_text().strip()
    ui = args.ui.rstrip("/")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pages = find_pages(ui)
    if args.only:
        wanted = set(args.only.split(","))
        pages = [p for p in pages if p[0] in wanted]
    use_cli = args.cli
    if not use_cli:
        try:
            import playwright  # noqa: F401
        except ImportError:
            print("playwright is not installed here: falling back to chromium --screenshot", file=sys.stderr)
            use_cli = True
    if use_cli:
        shoot_cli(ui, out, pages, args.chromium, args.budget_ms)
    else:
        shoot_playwright(ui, out, pages, args.chromium, args.settle)


if __name__ == "__main__":
    main()
