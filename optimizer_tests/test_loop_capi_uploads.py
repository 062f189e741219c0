"""CAPI uploads through the real sandbox: a raw identifier stops the run (blocking check), one
bad event is isolated by bisection while the others go, 5xx answers are retried."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import dagster as dg
import polars as pl
import pytest

from optimizer_assets.defs import attribution as attribution_defs
from optimizer_assets.defs import capi as capi_defs
from optimizer_assets.defs import revenue as revenue_defs
from optimizer_assets.defs.ingestion import ingestion_assets
from optimizer_assets.domain import capi as capi_domain
from optimizer_assets.sandbox.server import Faults, SandboxServer
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fixtures_sandbox import point_optimizer_at, sandbox_world

RAW_EMAIL = "jane.roe@example.com"


def run(assets, resources, **kwargs) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    return dg.materialize(assets, resources=resources, instance=instance, **kwargs)


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Ingestion, revenue and attribution done; nothing sent to CAPI yet."""
    tmp = tmp_path_factory.mktemp("capi")
    world = sandbox_world()
    with SandboxServer(world=world) as server, pytest.MonkeyPatch.context() as mp:
        resources = point_optimizer_at(server, tmp, mp)
        day = (world.now - timedelta(days=1)).date().isoformat()
        assets = [*ingestion_assets, *revenue_defs.assets, *attribution_defs.assets]
        assert run(assets, resources, partition_key=day).success
        yield server, resources, Warehouse(tmp / "warehouse.duckdb")


def test_blocking_check_stops_a_payload_with_a_raw_email(env, monkeypatch) -> None:
    server, resources, wh = env
    real = capi_domain.build_events

    def leaky(*args, **kwargs):  # a bug that would put a raw email into one payload
        events, rejected = real(*args, **kwargs)
        first = json.loads(events["payload"][0])
        first["user_data"]["em"] = [RAW_EMAIL]
        payloads = [json.dumps(first), *events["payload"][1:].to_list()]
        return events.with_columns(payload=pl.Series(payloads)), rejected

    monkeypatch.setattr(capi_defs.capi_domain, "build_events", leaky)
    result = run(
        [capi_defs.capi_events, capi_defs.capi_uploads, capi_defs.capi_payloads_hashed],
        resources,
        raise_on_error=False,
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["events_with_problems"].value == 1
    assert RAW_EMAIL not in check.metadata["problems"].value  # reported without the value
    assert set(materialized(result)) == {"capi_events"}  # capi_uploads never ran
    assert server.request_counts["capi"] == 0
    assert not wh.has_table("capi_ledger")


def test_payload_problems_on_plain_frames() -> None:
    clean = {"event_name": "Lead", "user_data": {"em": ["a" * 64], "fbc": "fb.1.1700000000000.x"}}
    dirty = {"event_name": "Lead", "user_data": {"ph": ["+1 650 555 1212"]}}
    frame = pl.DataFrame(
        {"event_id": ["clean", "dirty"], "payload": [json.dumps(clean), json.dumps(dirty)]}
    )
    problems = capi_defs.payload_problems(frame)
    assert problems["event_id"].to_list() == ["dirty"]
    assert "555" not in problems["problem"][0]


def test_one_bad_event_is_isolated_and_the_rest_goes(env) -> None:
    server, resources, wh = env
    assert run([capi_defs.capi_events], resources).success
    events = wh.read("capi_events")
    n = events.height
    assert n >= 8
    # Meta rejects a "website" event without event_source_url: the whole request fails
    bad_id = events["event_id"][n // 2]
    broken = events.with_columns(
        payload=pl.when(pl.col("event_id") == bad_id)
        .then(pl.col("payload").str.replace('"system_generated"', '"website"'))
        .otherwise(pl.col("payload"))
    )
    wh.replace("capi_events", broken)
    server.set_faults(Faults(rate_5xx=0.25, seed=3))  # transient errors are retried
    try:
        meta = materialized(run([capi_defs.capi_uploads], resources))["capi_uploads"]
    finally:
        server.set_faults(Faults())
    assert server.request_counts["fault_5xx"] > 0
    assert meta["accepted"] == n - 1 and meta["rejected"] == 1
    ledger = wh.read("capi_ledger")
    rejected = ledger.filter(pl.col("status") == "rejected")
    assert rejected["event_id"].to_list() == [bad_id]
    assert "event_source_url" in rejected["reason"][0]
    received = set(server.world.capi_events()["event_id"])
    assert received == set(events["event_id"]) - {bad_id}
    pixels = events["pixel_id"].n_unique()  # one bisection per pixel batch at most
    assert server.request_counts["capi"] - server.request_counts["fault_5xx"] <= pixels + 2 * (
        math.ceil(math.log2(n)) + 1
    )
    # nothing goes twice: neither the accepted nor the rejected event is sent again
    calls = server.request_counts["capi"]
    again = materialized(run([capi_defs.capi_events, capi_defs.capi_uploads], resources))
    assert again["capi_uploads"]["events_sent"] == 0
    assert server.request_counts["capi"] == calls


def test_later_stage_changes_are_sent_once(env) -> None:
    server, resources, wh = env
    before = wh.read("capi_ledger")
    server.world.advance(24)
    unpartitioned = [a for a in ingestion_assets if a.key.path[0] != "meta_ad_insights"]
    stage = [*revenue_defs.assets, *attribution_defs.assets, *capi_defs.assets]
    later = materialized(run([*unpartitioned, *stage], resources))
    new_changes = later["deal_stage_events"]["new_events"]
    assert new_changes > 0
    assert 0 < later["capi_uploads"]["accepted"] <= new_changes
    ledger = wh.read("capi_ledger")
    assert ledger.height == before.height + later["capi_uploads"]["events_sent"]
    received = server.world.capi_events()
    assert received["event_id"].is_unique().all()  # nothing was ever sent twice
    assert set(received["event_id"]) == set(
        ledger.filter(pl.col("status") == "accepted")["event_id"]
    )


def test_crm_stage_changes_join_identity_value_and_lead() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 11, 10, 12, tzinfo=UTC)
    h = {"email": "e" * 64, "phone": "a" * 64}  # stand-ins for SHA-256 digests
    revenue = pl.DataFrame(
        {
            "deal_id": ["d1", "d1", "d2"],
            "account_id": ["1", "1", "1"],
            "pipeline": ["p", "p", "p"],
            "from_stage": [None, "s1", None],
            "to_stage": ["s1", "s9", "s1"],
            "occurred_at": [t, t + timedelta(days=1), t],
            "value_after": [0.0, 12_000.0, 0.0],
            "currency": ["USD"] * 3,
        }
    )
    stages = pl.DataFrame(
        {"pipeline": ["p", "p"], "stage_id": ["s1", "s9"], "label": ["Lead", "Closed won"]}
    ).with_columns(stage=pl.Series(["lead", "closed_won"]))
    attribution = pl.DataFrame({"deal_id": ["d1", "d1"], "contact_id": ["c1", "c1"]})
    contacts = pl.DataFrame(
        {
            "contact_id": ["c1"],
            "created_at": [t - timedelta(hours=1)],
            "email_sha256": [None],
            "phone_sha256": [h["phone"]],
            "fbclid": ["IwAR1"],
            "lead_id": ["123456789012345"],
        }
    )
    leads = pl.DataFrame(
        {
            "lead_id": ["123456789012345"],
            "created_at": [t - timedelta(hours=2)],
            "email_sha256": [h["email"]],
            "phone_sha256": ["0" * 64],
        }
    )
    out = capi_domain.crm_stage_changes(revenue, stages, attribution, contacts, leads)
    assert out.height == 3
    d1 = out.filter(pl.col("deal_id") == "d1").sort("occurred_at")
    assert d1["stage_name"].to_list() == ["Lead", "Closed won"]
    assert d1["is_won"].to_list() == [False, True]
    assert d1["value"].to_list() == [0.0, 12_000.0]
    assert d1["email_sha256"].to_list() == [h["email"]] * 2  # filled from the lead
    assert d1["phone_sha256"].to_list() == [h["phone"]] * 2  # the contact's own wins
    assert d1["contact_created_at"].to_list() == [t - timedelta(hours=2)] * 2  # the lead's
    assert d1["event_id"].to_list() == [
        capi_domain.event_id("d1", None, "s1", t),
        capi_domain.event_id("d1", "s1", "s9", t + timedelta(days=1)),
    ]
    d2 = out.filter(pl.col("deal_id") == "d2")  # no attribution yet: no identity
    assert d2["email_sha256"].to_list() == [None] and d2["lead_id"].to_list() == [None]
    events, rejected = capi_domain.build_events(out, now=t + timedelta(days=2), currency="USD")
    assert set(events["event_name"]) == {"Lead", "Purchase"}
    assert rejected["reason"].to_list() == ["no_user_data"]
