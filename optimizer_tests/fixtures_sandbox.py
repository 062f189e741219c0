"""Sandbox fixtures: a small world served over loopback HTTP on a free port.

Import into conftest.py (``from optimizer_tests.fixtures_sandbox import *``) or a test module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import requests

from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, META_TOKEN, World, WorldConfig

__all__ = [
    "SANDBOX_TEST_CONFIG",
    "SANDBOX_TEST_DAYS",
    "sandbox",
    "sandbox_accounts",
    "sandbox_session",
    "sandbox_fresh",
    "sandbox_world",
]

# 2 accounts x 12 ads, run for 12 simulated days before the tests start
SANDBOX_TEST_CONFIG = WorldConfig(seed=11, accounts=2, ads_per_account=12)
SANDBOX_TEST_DAYS = 12


_TEMPLATES: dict[tuple[WorldConfig, int], World] = {}


def sandbox_world(
    config: WorldConfig = SANDBOX_TEST_CONFIG, days: int = SANDBOX_TEST_DAYS
) -> World:
    """A private copy of ``config``'s world advanced ``days`` days (simulated once per process)."""
    key = (config, days)
    if key not in _TEMPLATES:
        world = World(config)
        world.advance(24 * days)
        _TEMPLATES[key] = world
    return copy.deepcopy(_TEMPLATES[key])


def _started(config: WorldConfig, days: int) -> SandboxServer:
    return SandboxServer(world=sandbox_world(config, days))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    """A running sandbox (module-scoped): 2 accounts x 12 ads, 12 simulated days in.

    Tests that change faults or limits must restore them (``set_faults(Faults())``).
    """
    with _started(SANDBOX_TEST_CONFIG, SANDBOX_TEST_DAYS) as server:
        yield server


@pytest.fixture
def sandbox_fresh() -> Iterator[SandboxServer]:
    """A private sandbox for one test (same world as ``sandbox``), for tests that mutate."""
    with _started(SANDBOX_TEST_CONFIG, SANDBOX_TEST_DAYS) as server:
        yield server


@pytest.fixture(scope="module")
def sandbox_accounts(sandbox: SandboxServer) -> list[dict]:
    """The sandbox's accounts: account_id, pixel_id, hubspot_pipeline_id, ... (control route)."""
    response = requests.get(
        f"{sandbox.base_url}/_sandbox/accounts", params={"access_token": META_TOKEN}, timeout=10
    )
    response.raise_for_status()
    return response.json()["data"]


@pytest.fixture
def sandbox_session() -> Iterator[requests.Session]:
    """A session that authenticates everywhere: the Meta token as ``access_token`` query
    parameter (Graph, CAPI, control) and the HubSpot token as ``Authorization: Bearer``."""
    with requests.Session() as session:
        session.params = {"access_token": META_TOKEN}  # type: ignore[assignment]
        session.headers["Authorization"] = f"Bearer {HUBSPOT_TOKEN}"
        yield session


def point_optimizer_at(server: SandboxServer, folder, monkeypatch) -> dict:
    """Point the Dagster resources at ``server``: a settings file for its accounts and a private
    warehouse under ``folder``; returns ``build_resources()`` (env set through ``monkeypatch``)."""
    from optimizer_assets.defs.resources import build_resources
    from optimizer_assets.sandbox.settings_file import settings_yaml

    accounts_file = folder / "accounts.yaml"
    accounts_file.write_text(settings_yaml(server.world.accounts()))
    monkeypatch.setenv("OPTIMIZER_MODE", "sandbox")
    monkeypatch.setenv("OPTIMIZER_SANDBOX_URL", server.base_url)
    monkeypatch.setenv("OPTIMIZER_ACCOUNTS_FILE", str(accounts_file))
    monkeypatch.setenv("OPTIMIZER_WAREHOUSE", str(folder / "warehouse.duckdb"))
    return build_resources()
