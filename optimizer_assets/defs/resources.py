"""Dagster resources: the warehouse, the optimizer settings and clock, and the API clients.

Module-level singletons (Dagster refuses two different objects under one key). Secrets come
only through `dg.EnvVar`. ``OPTIMIZER_MODE=sandbox`` (default) points every client at a sandbox
(``OPTIMIZER_SANDBOX_URL``) and fills in the sandbox's public tokens when none are set;
``OPTIMIZER_MODE=live`` refuses to load without the real tokens.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import requests

from optimizer_assets.instance import REPO_ROOT
from optimizer_assets.settings import Settings, load_settings
from optimizer_assets.warehouse import Warehouse

SANDBOX_META_TOKEN = "sandbox-meta-token"
SANDBOX_HUBSPOT_TOKEN = "sandbox-hubspot-token"
DEFAULT_SANDBOX_URL = "http://127.0.0.1:8765"
LIVE_GRAPH_URL = "https://graph.facebook.com"
LIVE_HUBSPOT_URL = "https://api.hubapi.com"
GRAPH_API_VERSION = "v24.0"
REQUIRED_LIVE_SECRETS = ("META_ACCESS_TOKEN", "HUBSPOT_ACCESS_TOKEN")


class ConfigurationError(RuntimeError):
    """The environment does not configure a usable mode; the message says what to set."""


def mode() -> str:
    value = os.environ.get("OPTIMIZER_MODE", "sandbox").strip().lower()
    if value not in {"sandbox", "live"}:
        raise ConfigurationError(f"OPTIMIZER_MODE must be 'sandbox' or 'live', not {value!r}")
    return value


def prepare_environment() -> str:
    """Check the environment for the chosen mode; in sandbox mode default the sandbox tokens."""
    current = mode()
    if current == "sandbox":
        os.environ.setdefault("META_ACCESS_TOKEN", SANDBOX_META_TOKEN)
        os.environ.setdefault("HUBSPOT_ACCESS_TOKEN", SANDBOX_HUBSPOT_TOKEN)
    else:
        missing = [name for name in REQUIRED_LIVE_SECRETS if not os.environ.get(name)]
        if missing:
            raise ConfigurationError(
                "OPTIMIZER_MODE=live needs real API tokens in the environment; missing: "
                + ", ".join(missing)
                + ". Set them, or unset OPTIMIZER_MODE to run on the sandbox."
            )
    return current


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file (default ``data/warehouse.duckdb``)."""

    path: str = str(REPO_ROOT / "data" / "warehouse.duckdb")

    def get(self) -> Warehouse:
        return Warehouse(Path(self.path))


class OptimizerResource(dg.ConfigurableResource):
    """Mode, per-account settings file, and the clock (the sandbox's in sandbox mode)."""

    mode: str = "sandbox"
    sandbox_url: str = DEFAULT_SANDBOX_URL
    accounts_file: str = ""
    meta_token: str = ""  # only to read the sandbox clock; never logged

    def settings(self) -> Settings:
        return load_settings(self.accounts_file or None)

    def now(self) -> datetime:
        """Current time: the sandbox's simulated clock in sandbox mode, else the wall clock."""
        if self.mode != "sandbox":
            return datetime.now(UTC)
        response = requests.get(
            f"{self.sandbox_url.rstrip('/')}/_sandbox/state",
            headers={"Authorization": f"Bearer {self.meta_token}"},
            timeout=(5, 30),
        )
        response.raise_for_status()
        return datetime.fromisoformat(response.json()["now"].replace("Z", "+00:00"))


class HubSpotResource(dg.ConfigurableResource):
    """HubSpot CRM API (or the sandbox's); the token comes from HUBSPOT_ACCESS_TOKEN."""

    base_url: str = LIVE_HUBSPOT_URL
    access_token: str

    def client(self):
        from optimizer_assets.clients.hubspot import HubSpotClient

        return HubSpotClient(self.access_token, base_url=self.base_url)


class MetaResource(dg.ConfigurableResource):
    """Graph API and Conversions API (or the sandbox's); token from META_ACCESS_TOKEN."""

    base_url: str = LIVE_GRAPH_URL
    api_version: str = GRAPH_API_VERSION
    access_token: str

    def graph(self):
        from optimizer_assets.clients.graph import GraphClient

        return GraphClient(self.access_token, base_url=self.base_url, api_version=self.api_version)

    def capi(self):
        from optimizer_assets.clients.capi import CapiClient

        return CapiClient(self.access_token, base_url=self.base_url, api_version=self.api_version)


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources for the current mode (checked: live mode without tokens refuses to load)."""
    current = prepare_environment()
    sandbox_url = os.environ.get("OPTIMIZER_SANDBOX_URL", DEFAULT_SANDBOX_URL)
    warehouse_path = os.environ.get("OPTIMIZER_WAREHOUSE") or WarehouseResource().path
    sandbox = current == "sandbox"
    return {
        "warehouse": WarehouseResource(path=warehouse_path),
        "optimizer": OptimizerResource(
            mode=current,
            sandbox_url=sandbox_url,
            accounts_file=os.environ.get("OPTIMIZER_ACCOUNTS_FILE", ""),
            meta_token=dg.EnvVar("META_ACCESS_TOKEN") if sandbox else "",
        ),
        "hubspot": HubSpotResource(
            base_url=sandbox_url if sandbox else LIVE_HUBSPOT_URL,
            access_token=dg.EnvVar("HUBSPOT_ACCESS_TOKEN"),
        ),
        "meta": MetaResource(
            base_url=sandbox_url if sandbox else LIVE_GRAPH_URL,
            access_token=dg.EnvVar("META_ACCESS_TOKEN"),
        ),
    }
