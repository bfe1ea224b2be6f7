"""The documentation site (issue 19): it builds in strict mode (a broken link, a missing page or anchor fails),
the API reference holds every route the gateway serves, the examples page every example, and no text in the
repository points at a file that is not in it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import REPO_ROOT

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-3000:]
    return out


def test_every_page_of_the_layout_is_built(site):
    pages = ["index.html", "quickstart/index.html", "users/guide/index.html", "users/api/index.html",
             "users/examples/index.html", "analysts/usage-schema/index.html", "analysts/reports/index.html",
             "architecture/index.html", "benchmarks/index.html"]  # fmt: skip
    admin = ("globus", "docker", "bare-metal", "backends", "kubernetes", "fleet", "security", "production",
             "resources", "settings")  # fmt: skip
    pages += [f"admin/{p}/index.html" for p in admin]
    missing = [p for p in pages if not (site / p).is_file()]
    assert not missing, missing


def test_the_api_reference_has_every_route_and_status(site):
    sys.path.insert(0, str(REPO_ROOT / "docs" / "_build"))
    try:
        from api_reference import openapi_document
    finally:
        sys.path.pop(0)
    html = (site / "users" / "api" / "index.html").read_text()
    doc = openapi_document()
    for path, operations in doc["paths"].items():
        for method in operations:
            assert f"{method.upper()} {path}" in html, (method, path)
    assert "The model did not answer within the gateway" in html  # 504's meaning, from the document


def test_the_examples_page_shows_every_example_whole(site):
    html = (site / "users" / "examples" / "index.html").read_text()
    for example in (REPO_ROOT / "examples").iterdir():
        if example.suffix in (".py", ".sh", ".yaml"):
            assert f"examples/{example.name}" in html, example.name


# Paths the texts name that look like repository paths and are not: a kubectl resource, "first/last request".
NOT_PATHS = {"deploy/gateway", "first/last"}
TOP = "docs|compute|api|serving|flows|blocks|core|analytics|deployments|first|bench|tests|deploy|examples|shared|notes"
PATH = re.compile(rf"(?<![\w./<>{{$~-])((?:{TOP})/[\w./*-]*[\w/*])")  # a glob (deploy/systemd/*.service) too


def _texts() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "mkdocs.yml", REPO_ROOT / "Makefile", REPO_ROOT / "prefect.yaml"]
    for pattern in ("docs/**/*.md", "docs/_build/*.py", "examples/*", "deployments/**/*.md", "deploy/**/*"):
        files += REPO_ROOT.glob(pattern)
    for package in TOP.split("|"):
        files += (REPO_ROOT / package).glob("**/*.py")
    return [f for f in files if f.is_file() and f.suffix not in (".png", ".pyc")]


def test_no_text_points_at_a_file_that_is_not_in_the_repository():
    """README, the site, examples, deploy files, and every docstring and comment: each path they name exists
    (issue 19 found pages pointing at the design document and the notes, which are not in the repository)."""
    dangling = {}
    for f in _texts():
        for m in PATH.finditer(f.read_text(errors="ignore")):
            p = m.group(1).rstrip(".")
            exists = any(REPO_ROOT.glob(p)) if "*" in p else (REPO_ROOT / p).exists()
            if p not in NOT_PATHS and not exists:
                dangling.setdefault(p, []).append(str(f.relative_to(REPO_ROOT)))
    assert not dangling, dangling
