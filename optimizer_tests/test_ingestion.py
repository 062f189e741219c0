"""Ingestion assets against the sandbox over loopback HTTP, through the production clients."""

from __future__ import annotations

import datetime as dt
import re

import dagster as dg
import polars as pl
import pytest

from optimizer_assets.defs.ingestion import ingestion_assets
from optimizer_assets.defs.resources import ConfigurationError, build_resources
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fixtures_sandbox import point_optimizer_at, sandbox_world

UNPARTITIONED = [a for a in ingestion_assets if a.key.path[0] != "meta_ad_insights"]
INSIGHTS = [a for a in ingestion_assets if a.key.path[0] == "meta_ad_insights"]


@pytest.fixture
def loop_env(tmp_path, monkeypatch):
    """A private sandbox, settings file and warehouse; yields (server, resources, warehouse)."""
    world = sandbox_world()
    with SandboxServer(world=world) as server:
        resources = point_optimizer_at(server, tmp_path, monkeypatch)
        yield server, resources, Warehouse(tmp_path / "warehouse.duckdb")


def materialize(assets, resources, **kwargs):
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(assets, resources=resources, instance=instance, **kwargs)
    assert result.success
    return {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_ingestion_fills_warehouse_like_the_world(loop_env):
    server, resources, wh = loop_env
    world = server.world
    meta = materialize(UNPARTITIONED, resources)
    deals, contacts = wh.read("hubspot_deals"), wh.read("hubspot_contacts")
    assert deals.height == world.deals().height == meta["hubspot_deals"]["row_count"]
    assert set(deals["deal_id"]) == set(world.deals()["deal_id"])
    assert deals["account_id"].null_count() == 0  # every pipeline maps to its ad account
    assert set(contacts["contact_id"]) == set(world.deal_contacts()["contact_id"])
    assert set(wh.read("meta_leads")["lead_id"]) == set(world.leads()["lead_id"])
    assert wh.read("meta_ads").height == world.ads().height
    # every deal has its creation event; the stage of its latest event is its current stage
    events = wh.read("deal_stage_events")
    latest = events.sort("occurred_at").group_by("deal_id").last()
    joined = latest.join(deals, on="deal_id")
    assert joined.height == deals.height
    assert (joined["to_stage"] == joined["dealstage"]).all()
    # contacts that kept the click id carry fbclid and the fbc built from it
    with_click = contacts.filter(pl.col("fbclid").is_not_null())
    assert with_click.height > 0
    assert with_click["fbc"].str.ends_with(with_click["fbclid"]).all()


def test_rerun_adds_nothing_and_later_changes_become_events(loop_env):
    server, resources, wh = loop_env
    materialize(UNPARTITIONED, resources)
    before = wh.read("deal_stage_events").height
    again = materialize(UNPARTITIONED, resources)
    assert again["deal_stage_events"]["new_events"] == 0
    assert wh.read("deal_stage_events").height == before
    server.world.advance(48)
    later = materialize(UNPARTITIONED, resources)
    assert later["deal_stage_events"]["new_events"] > 0
    assert wh.read("hubspot_deals").height == server.world.deals().height
    assert wh.read("deal_stage_events")["event_key"].is_unique().all()


def test_insights_partition_rerun_replaces_that_day_only(loop_env):
    server, resources, wh = loop_env
    world = server.world
    days = [world.config.start.date() + dt.timedelta(days=i) for i in (2, 3)]
    for day in days:
        materialize(INSIGHTS, resources, partition_key=day.isoformat())
    first = wh.read("meta_ad_insights").sort("date", "ad_id")
    materialize(INSIGHTS, resources, partition_key=days[0].isoformat())
    assert wh.read("meta_ad_insights").sort("date", "ad_id").equals(first)
    truth = pl.concat([world.insights(a, days[0], days[1]) for a in world.accounts()["account_id"]])
    assert first.height == truth.height
    assert first["spend"].sum() == pytest.approx(truth["spend"].sum(), abs=0.01 * truth.height)
    assert first["clicks"].sum() == truth["clicks"].sum()


def test_no_raw_pii_anywhere_in_the_warehouse(loop_env):
    server, resources, wh = loop_env
    materialize(UNPARTITIONED, resources)
    world = server.world
    raw = set()
    for frame, columns in (
        (world.contacts(), ["email", "phone", "firstname", "lastname"]),
        (world.leads(), ["email", "phone", "full_name"]),
    ):
        for column in columns:
            raw |= {v.strip().lower() for v in frame[column].drop_nulls() if len(v.strip()) > 3}
    assert raw, "the world should have raw identities to look for"
    email = re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I)
    for table in wh.tables():
        frame = wh.read(table)
        for column, dtype in frame.schema.items():
            if dtype != pl.Utf8:
                continue
            values = {v.strip().lower() for v in frame[column].drop_nulls()}
            assert not (values & raw), f"raw identity in {table}.{column}"
            assert not any(email.search(v) for v in values), f"email-like text in {table}.{column}"


def test_live_mode_refuses_without_tokens(monkeypatch):
    monkeypatch.setenv("OPTIMIZER_MODE", "live")
    monkeypatch.delenv("META_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("HUBSPOT_ACCESS_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="META_ACCESS_TOKEN, HUBSPOT_ACCESS_TOKEN"):
        build_resources()


def test_definitions_load():
    from optimizer_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.path[0] for k in graph.get_all_asset_keys()}
    assert {a.key.path[0] for a in ingestion_assets} <= keys
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert {"crm", "ads"} <= groups


def test_cli_backfill_equals_day_by_day(loop_env, tmp_path):
    """`dagster asset materialize --partition-range` (one run) stores what daily runs store."""
    import os
    import subprocess
    import sys

    server, resources, wh = loop_env
    start = server.world.config.start.date()
    days = [start + dt.timedelta(days=i) for i in range(5)]
    for day in days:
        materialize(INSIGHTS, resources, partition_key=day.isoformat())
    daily = wh.read("meta_ad_insights").sort("date", "ad_id")

    backfill_wh = tmp_path / "backfill.duckdb"
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "OPTIMIZER_WAREHOUSE": str(backfill_wh), "DAGSTER_HOME": str(home)}
    command = [
        os.path.join(os.path.dirname(sys.executable), "dagster"),
        "asset",
        "materialize",
        "-m",
        "optimizer_assets.definitions",
        "--select",
        "meta_ad_insights",
        "--partition-range",
        f"{days[0]}...{days[-1]}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    backfilled = Warehouse(backfill_wh).read("meta_ad_insights").sort("date", "ad_id")
    assert backfilled.height > 0
    assert backfilled.equals(daily)


def test_deals_are_stored_chunk_by_chunk_with_the_same_result(loop_env, monkeypatch):
    """Small chunks (so a crash loses at most one) store exactly what one big write stores."""
    import optimizer_assets.defs.ingestion as ingestion

    server, resources, wh = loop_env
    deals_asset = [a for a in UNPARTITIONED if a.key.path[0] == "hubspot_deals"]
    monkeypatch.setattr(ingestion, "DEAL_CHUNK", 7)
    meta = materialize(deals_asset, resources)["hubspot_deals"]
    world_deals = server.world.deals()
    assert world_deals.height > 3 * 7  # several chunks
    assert meta["fetched"] == meta["row_count"] == world_deals.height
    assert meta["new_states"] == world_deals.height
    stored = wh.read("hubspot_deals").sort("deal_id")
    monkeypatch.setattr(ingestion, "DEAL_CHUNK", 10**9)
    for table in ("hubspot_deals", "hubspot_deal_snapshots"):
        wh.replace(table, wh.read(table).clear())
    materialize(deals_asset, resources)
    assert wh.read("hubspot_deals").sort("deal_id").equals(stored)


def test_contacts_are_stored_chunk_by_chunk_with_the_same_result(loop_env, monkeypatch):
    """Deals -> associations -> contacts in small chunks, written and logged per chunk, store
    what one big chunk stores; a re-run adds nothing; contacts whose association was stored but
    whose record was not (a crash between the two writes) are read on the next run."""
    import optimizer_assets.defs.ingestion as ingestion

    server, resources, wh = loop_env
    crm_assets = [
        a for a in UNPARTITIONED if a.key.path[0] in ("hubspot_deals", "hubspot_contacts")
    ]
    materialize([a for a in crm_assets if a.key.path[0] == "hubspot_deals"], resources)
    contacts_asset = [a for a in crm_assets if a.key.path[0] == "hubspot_contacts"]
    monkeypatch.setattr(ingestion, "CONTACT_DEAL_CHUNK", 7)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(contacts_asset, resources=resources, instance=instance)
    assert result.success
    meta = {
        k: v.value
        for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    n_deals = wh.read("hubspot_deals").height
    assert meta["chunks"] == -(-n_deals // 7) >= 3
    progress = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.user_message.startswith("hubspot_contacts: ")
    ]
    assert len(progress) == meta["chunks"]
    assert progress[-1].startswith(f"hubspot_contacts: {n_deals:,} of {n_deals:,} deals done")
    world_links = server.world.deal_contacts()
    stored = wh.read("hubspot_contacts").sort("contact_id")
    links = wh.read("deal_contacts").sort("deal_id", "contact_id")
    assert meta["new_contacts"] == meta["row_count"] == stored.height
    assert set(stored["contact_id"]) == set(world_links["contact_id"])
    assert meta["new_associations"] == links.height == world_links.height

    again = materialize(contacts_asset, resources)["hubspot_contacts"]
    assert (again["new_contacts"], again["new_associations"], again["chunks"]) == (0, 0, 0)
    assert wh.read("hubspot_contacts").sort("contact_id").equals(stored)

    # a crash after storing associations but before their contacts: the next run reads them
    wh.replace("hubspot_contacts", stored.head(stored.height // 2))
    resumed = materialize(contacts_asset, resources)["hubspot_contacts"]
    assert resumed["new_contacts"] == stored.height - stored.height // 2
    assert wh.read("hubspot_contacts").sort("contact_id").equals(stored)

    monkeypatch.setattr(ingestion, "CONTACT_DEAL_CHUNK", 10**9)
    for table in ("hubspot_contacts", "deal_contacts"):
        wh.replace(table, wh.read(table).clear())
    one = materialize(contacts_asset, resources)["hubspot_contacts"]
    assert one["chunks"] == 1
    assert wh.read("hubspot_contacts").sort("contact_id").equals(stored)
    assert wh.read("deal_contacts").sort("deal_id", "contact_id").equals(links)
