"""Shared fixtures: every test gets its own FIRST home, so nothing leaks between tests or into .first/."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import FlowTracking, Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", flow_tracking=FlowTracking.off, request_timeout_s=2.0)
