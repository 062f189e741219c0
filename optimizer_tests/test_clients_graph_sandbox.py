"""GraphClient and CapiClient against the real sandbox server over loopback HTTP, with faults.

Results are compared with the World's own frames. Waiting is simulated: the clients get a fake
clock whose `sleep` only moves the clock, so usage blocks of minutes cost no real time while
the order of calls (never during a block) stays checkable from `request_log`.
"""

from __future__ import annotations

import hashlib
import random
from datetime import date, timedelta

import polars as pl
import pytest

from optimizer_assets.clients import (
    BatchItem,
    BudgetEditLimitError,
    CapiClient,
    CapiRejectedError,
    GraphAPIError,
    GraphClient,
    RetriesExhaustedError,
    RetryPolicy,
    ThrottledError,
    TooManyItemsError,
)
from optimizer_assets.clients.graph import AD_FIELDS_WITH_TRAITS
from optimizer_assets.sandbox.server import Faults, SandboxServer
from optimizer_assets.sandbox.world import META_TOKEN, World, WorldConfig
from optimizer_tests.fake_clock import FakeClock

DAYS = 10


@pytest.fixture
def sandbox():
    world = World(WorldConfig(seed=21))
    world.advance(24 * DAYS)
    with SandboxServer(world=world) as server:
        yield server


def kwargs(clock: FakeClock, *, read_timeout: float = 5.0, **policy) -> dict:
    retry = RetryPolicy(**{"max_attempts": 10, "max_total_wait_s": 7200.0, **policy})
    return {
        "base_url": "",
        "retry": retry,
        "rng": random.Random(5),
        "sleep": clock.sleep,
        "clock": clock,
        "timeout": (2.0, read_timeout),
    }


def graph(sandbox: SandboxServer, clock: FakeClock, **kw) -> GraphClient:
    args = kwargs(clock, **kw)
    args["base_url"] = sandbox.base_url
    return GraphClient(META_TOKEN, **args)


def accounts(sandbox: SandboxServer) -> list[str]:
    with sandbox.lock:
        return sandbox.world.accounts()["account_id"].to_list()


def test_catalog_matches_the_world(sandbox) -> None:
    client = graph(sandbox, FakeClock())
    for acct in accounts(sandbox):
        with sandbox.lock:
            w_camp = sandbox.world.campaigns().filter(pl.col("account_id") == acct)
            w_adsets = sandbox.world.adsets().filter(pl.col("account_id") == acct)
            w_ads = sandbox.world.ads().filter(pl.col("account_id") == acct)
        camp = client.campaigns(f"act_{acct}", limit=5)  # small pages: exercises the cursors
        assert sorted(camp["campaign_id"]) == sorted(w_camp["campaign_id"])
        adsets = client.adsets(acct, limit=7)
        joined = w_adsets.join(adsets, on="adset_id", suffix="_got")
        assert joined.height == w_adsets.height == adsets.height
        assert adsets.schema["daily_budget"] == pl.Int64
        assert (joined["daily_budget"] == joined["daily_budget_got"]).all()
        ads = client.ads(acct, fields=AD_FIELDS_WITH_TRAITS)
        joined = w_ads.join(ads, on="ad_id", suffix="_got")
        assert joined.height == w_ads.height == ads.height
        for world_col, got_col in [
            ("hook_type", "creative_hook_type"),
            ("emotion", "creative_emotion"),
            ("format", "creative_format"),
            ("cta", "creative_call_to_action_type"),
            ("title", "creative_title"),
            ("adset_id", "adset_id_got"),
        ]:
            assert joined[world_col].eq_missing(joined[got_col]).all(), world_col
        assert (joined["account_id"] == acct).all()
        minimum = client.minimum_budgets(acct)
        with sandbox.lock:  # never hold the lock across a call: the server needs it to answer
            assert minimum == sandbox.world.minimum_budgets(acct)


def test_insights_survive_5xx_throttles_and_slow_answers(sandbox) -> None:
    sandbox.set_faults(
        Faults(rate_5xx=0.15, rate_throttle=0.15, slow_share=0.08, slow_seconds=1.0, seed=11)
    )
    clock = FakeClock()
    client = graph(sandbox, clock, read_timeout=0.5)
    since = date(2026, 11, 1)
    until = since + timedelta(days=DAYS - 1)
    for acct in accounts(sandbox):
        got = client.insights(acct, since, until, limit=40)
        with sandbox.lock:
            truth = sandbox.world.insights(acct, since, until)
        assert got.height == truth.height
        joined = truth.join(got, on=["date_start", "ad_id"], suffix="_got")
        assert joined.height == truth.height
        assert ((joined["spend"] - joined["spend_got"]).abs() < 0.006).all()
        for col in ("impressions", "reach", "clicks", "inline_link_clicks", "leads"):
            assert (joined[col] == joined[f"{col}_got"]).all(), col
    counts = sandbox.request_counts
    assert counts["fault_5xx"] > 0 and counts["fault_throttle"] > 0 and counts["fault_slow"] > 0
    # stop calling while a block lasts: after each throttle answer the next call waits it out
    log = list(client.request_log)
    throttled = [i for i, r in enumerate(log) if r.status == 400]
    assert throttled
    for i in throttled:
        if i + 1 < len(log):
            assert log[i + 1].at - log[i].at >= client.usage_pause_s - 1e-6


def test_leads_match_the_world(sandbox) -> None:
    client = graph(sandbox, FakeClock())
    acct = accounts(sandbox)[0]
    ads = client.ads(acct, fields=AD_FIELDS_WITH_TRAITS)
    forms = ads["creative_lead_gen_form_id"].drop_nulls().unique().to_list()
    with sandbox.lock:
        truth = sandbox.world.leads().filter(pl.col("account_id") == acct)
    assert forms and truth.height > 0
    got = [lead for form in forms for lead in client.leads(form, limit=10)]
    assert sorted(g["lead_id"] for g in got) == sorted(truth["lead_id"].to_list())
    by_id = {g["lead_id"]: g for g in got}
    for row in truth.iter_rows(named=True):
        lead = by_id[row["lead_id"]]
        assert lead["fields"]["email"] == row["email"] and lead["ad_id"] == row["ad_id"]
        assert lead["created_time"] == row["created_time"].replace(microsecond=0)
    since = truth["created_time"].sort()[truth.height // 2]
    recent = [lead for form in forms for lead in client.leads(form, since=since)]
    expected = truth.filter(pl.col("created_time").dt.epoch("s") > int(since.timestamp()))
    assert sorted(r["lead_id"] for r in recent) == sorted(expected["lead_id"].to_list())
    by_ad = client.leads(ad_id=truth["ad_id"][0])
    assert {r["lead_id"] for r in by_ad} == set(
        truth.filter(pl.col("ad_id") == truth["ad_id"][0])["lead_id"].to_list()
    )


def test_updates_reach_the_world_and_budget_lock_is_surfaced(sandbox) -> None:
    client = graph(sandbox, FakeClock())
    acct = accounts(sandbox)[0]
    with sandbox.lock:
        adset = sandbox.world.adsets().filter(pl.col("account_id") == acct)["adset_id"][0]
        ad = sandbox.world.ads().filter(pl.col("account_id") == acct)["ad_id"][0]
    for budget in (1100, 1200, 1300, 1400):
        assert client.update_adset(adset, daily_budget=budget, account_id=acct) == {"success": True}
    before = client.request_count
    with pytest.raises(BudgetEditLimitError) as info:
        client.update_adset(adset, daily_budget=1500)
    assert client.request_count == before + 1  # not retried: retrying only extends the lock
    assert info.value.fbtrace_id and META_TOKEN not in str(info.value)
    client.update_ad(ad, "PAUSED")
    with sandbox.lock:
        adsets = sandbox.world.adsets()
        ads = sandbox.world.ads()
    assert adsets.filter(pl.col("adset_id") == adset)["daily_budget"][0] == 1400
    assert ads.filter(pl.col("ad_id") == ad)["status"][0] == "PAUSED"
    with pytest.raises(GraphAPIError) as bad:
        client.update_adset(adset, daily_budget=10)  # below the account minimum
    assert not isinstance(bad.value, BudgetEditLimitError) and bad.value.code is not None
    # archived ads leave the default listing; asking for every status brings them back
    client.update_ad(ad, "ARCHIVED")
    assert ad not in client.ads(acct)["ad_id"].to_list()
    every = ["ACTIVE", "PAUSED", "ARCHIVED", "DELETED", "ADSET_PAUSED", "CAMPAIGN_PAUSED"]
    listed = client.ads(acct, effective_status=every)
    assert listed.filter(pl.col("ad_id") == ad)["status"].to_list() == ["ARCHIVED"]


def test_execute_batched_with_null_items_and_faults(sandbox) -> None:
    sandbox.set_faults(Faults(rate_null_batch_item=0.3, rate_5xx=0.1, seed=5))
    clock = FakeClock()
    client = graph(sandbox, clock)
    acct = accounts(sandbox)[1]
    with sandbox.lock:
        w_ads = sandbox.world.ads().filter(pl.col("account_id") == acct)
        w_adsets = sandbox.world.adsets().filter(pl.col("account_id") == acct)
    ad_ids = w_ads["ad_id"].to_list()
    wanted = {a: ("PAUSED" if i % 2 else "ACTIVE") for i, a in enumerate(ad_ids)}
    items = [BatchItem.update_ad(a, status=s) for a, s in wanted.items()]
    items += [BatchItem.get(a, ["daily_budget", "status"]) for a in w_adsets["adset_id"]]
    items += [BatchItem.update_ad(a, status=s) for a, s in wanted.items()]  # 2x: > 50 items
    results = client.execute_batched(items, account_id=acct)
    assert len(results) == len(items) and all(r.ok for r in results)
    assert sandbox.request_counts["fault_null_batch_item"] > 0
    assert max(r.attempts for r in results) > 1  # unfinished items were sent again
    with sandbox.lock:
        now = sandbox.world.ads().filter(pl.col("account_id") == acct)
    assert dict(zip(now["ad_id"], now["status"], strict=True)) == wanted
    gets = results[len(ad_ids) : len(ad_ids) + w_adsets.height]
    assert [int(r.body["daily_budget"]) for r in gets] == w_adsets["daily_budget"].to_list()
    # every batch request stayed within 50 items (the server rejects larger ones) and only
    # batch requests were made
    assert sandbox.request_counts["graph_batch"] == client.request_count
    with pytest.raises(TooManyItemsError):
        client.batch(items[:51])


def test_throttle_storm_ends_in_a_clear_bounded_error(sandbox) -> None:
    sandbox.set_faults(Faults(rate_throttle=1.0, seed=2))
    acct = accounts(sandbox)[0]
    clock = FakeClock()
    patient = graph(sandbox, clock, max_attempts=4, max_total_wait_s=900.0)
    with pytest.raises((RetriesExhaustedError, ThrottledError)) as info:
        patient.campaigns(acct)
    assert 1 < patient.request_count <= 4
    assert "paused" in str(info.value) or "gave up" in str(info.value)
    assert META_TOKEN not in str(info.value)
    sent = [r.at for r in patient.request_log]
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert all(gap >= patient.usage_pause_s for gap in gaps)  # each block was waited out

    # a block longer than the allowed wait: one call, then no more calls while it lasts
    hasty = graph(sandbox, FakeClock(), max_total_wait_s=30.0)
    with pytest.raises(ThrottledError):
        hasty.campaigns(acct)
    assert hasty.request_count == 1
    with pytest.raises(ThrottledError) as blocked:
        hasty.adsets(acct)
    assert hasty.request_count == 1 and blocked.value.wait_s > 30


def _event(lead_id: str, email: str, event_time: int, n: int) -> dict:
    return {
        "event_name": "Lead",
        "event_time": event_time,
        "event_id": f"test-{n}",
        "action_source": "system_generated",
        "user_data": {
            "em": [hashlib.sha256(email.strip().lower().encode()).hexdigest()],
            "lead_id": lead_id,
        },
        "custom_data": {"event_source": "crm", "lead_event_source": "HubSpot"},
    }


def test_capi_uploads_retries_and_rejections(sandbox) -> None:
    clock = FakeClock()
    args = kwargs(clock)
    args["base_url"] = sandbox.base_url
    client = CapiClient(META_TOKEN, **args)
    with sandbox.lock:
        acc = sandbox.world.accounts().row(0, named=True)
        leads = sandbox.world.leads().filter(pl.col("account_id") == acc["account_id"])
        now = int(sandbox.world.now.timestamp())
    events = [
        _event(row["lead_id"], row["email"], now - 3600, i)
        for i, row in enumerate(leads.head(20).iter_rows(named=True))
    ]
    with pytest.raises(TooManyItemsError):
        client.send_events(acc["pixel_id"], events * 51)
    assert client.request_count == 0
    sandbox.set_faults(Faults(rate_5xx=0.5, seed=8))
    answer = client.send_events(acc["pixel_id"], events)
    assert answer["events_received"] == len(events) and answer["fbtrace_id"]
    with sandbox.lock:
        received = sandbox.world.capi_events()
    assert received.filter(~pl.col("duplicate")).height == len(events)
    sandbox.set_faults(Faults())
    stale = [
        *events[:3],
        _event(events[0]["user_data"]["lead_id"], "a@b.test", now - 9 * 86400, 99),
    ]
    with pytest.raises(CapiRejectedError) as info:
        client.send_events(acc["pixel_id"], stale)
    err = info.value
    assert err.code == 100 and err.fbtrace_id and "7 days" in err.message
    assert "event 3" in err.message and META_TOKEN not in str(err)
