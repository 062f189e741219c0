"""The `data/accounts.yaml` entries that describe a sandbox world's accounts."""

from __future__ import annotations

import polars as pl
import yaml


def account_entries(accounts: pl.DataFrame) -> list[dict]:
    """One settings entry per sandbox account: id, name, HubSpot pipeline, pixel, currency."""
    return [
        {
            "account_id": str(row["account_id"]),
            "name": row["name"],
            "hubspot_pipeline_id": str(row["hubspot_pipeline_id"]),
            "pixel_id": str(row["pixel_id"]),
            "currency": row["currency"],
            "timezone": row["timezone"],
        }
        for row in accounts.sort("account_id").iter_rows(named=True)
    ]


def settings_yaml(accounts: pl.DataFrame, defaults: dict | None = None) -> str:
    """A complete accounts file for a sandbox world (defaults as in the checked-in file)."""
    document = {"defaults": defaults or {}, "accounts": account_entries(accounts)}
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
