"""The sandbox server speaks the wire contracts of ../shared/CONTRACTS.md over loopback HTTP."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import date, timedelta

import polars as pl
import pytest
import requests

from optimizer_assets.sandbox.server import Faults, Limits, SandboxServer
from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, META_TOKEN, WorldConfig

# the lead's conftest may import these fixtures too; registering the module as a plugin is harmless

V = "/v24.0"
SEARCH = "/crm/v3/objects/deals/search"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def graph_pages(session: requests.Session, url: str, params: dict) -> list[list[dict]]:
    """Follow Graph ``paging.next`` links; returns the pages' ``data`` lists."""
    pages = []
    response = session.get(url, params=params, timeout=10)
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["data"])
        next_url = body.get("paging", {}).get("next")
        if not next_url:
            return pages
        response = session.get(next_url, timeout=10)


def hs_post(session: requests.Session, url: str, body: dict) -> requests.Response:
    """POST to HubSpot, waiting out the 5/s search limit the way a polite client does."""
    for _ in range(100):
        response = session.post(url, json=body, timeout=10)
        if response.status_code != 429:
            return response
        time.sleep(0.2)
    raise AssertionError("still rate limited")


def hs_search_all(session: requests.Session, base: str, body: dict) -> list[dict]:
    results, after = [], None
    while True:
        page = hs_post(session, base + SEARCH, {**body, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        payload = page.json()
        results.extend(payload["results"])
        after = payload.get("paging", {}).get("next", {}).get("after")
        if after is None:
            return results


def world_now(sandbox: SandboxServer):
    with sandbox.lock:
        return sandbox.world.now


def assert_graph_error(response: requests.Response, code: int, subcode: int | None = None):
    assert response.status_code >= 400
    error = response.json()["error"]
    assert {"message", "type", "code", "fbtrace_id"} <= set(error)
    assert error["code"] == code
    if subcode is not None:
        assert error["error_subcode"] == subcode
    return error


# ---- tokens ------------------------------------------------------------------------------------
def test_graph_capi_and_control_answer_190_without_the_meta_token(sandbox, sandbox_accounts):
    base = sandbox.base_url
    account = sandbox_accounts[0]["account_id"]
    pixel = sandbox_accounts[0]["pixel_id"]
    for response in (
        requests.get(f"{base}{V}/act_{account}/ads", timeout=10),
        requests.get(f"{base}{V}/act_{account}/ads", params={"access_token": "nope"}, timeout=10),
        requests.post(f"{base}{V}/{pixel}/events", data={"data": "[]"}, timeout=10),
        requests.get(f"{base}/_sandbox/state", timeout=10),
        requests.get(
            f"{base}{V}/act_{account}/ads",
            headers={"Authorization": f"Bearer {HUBSPOT_TOKEN}"},
            timeout=10,
        ),
    ):
        error = assert_graph_error(response, 190)
        assert error["type"] == "OAuthException"
        assert META_TOKEN not in response.text
    ok = requests.get(
        f"{base}{V}/act_{account}/ads",
        headers={"Authorization": f"Bearer {META_TOKEN}"},
        timeout=10,
    )
    assert ok.status_code == 200


def test_hubspot_answers_401_without_the_hubspot_token(sandbox):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {META_TOKEN}"},
    ):
        response = requests.post(sandbox.base_url + SEARCH, json={}, headers=headers, timeout=10)
        assert response.status_code == 401
        body = response.json()
        assert body["status"] == "error"
        assert body["category"] == "INVALID_AUTHENTICATION"
        assert {"message", "correlationId", "errors"} <= set(body)


# ---- Graph catalog -----------------------------------------------------------------------------
def test_catalog_edges_page_through_every_visible_object(
    sandbox, sandbox_accounts, sandbox_session
):
    account = sandbox_accounts[0]["account_id"]
    with sandbox.lock:
        world_ads = sandbox.world.ads().filter(pl.col("account_id") == account)
    url = f"{sandbox.base_url}{V}/act_{account}/ads"
    fields = "name,status,effective_status,created_time,adset_id,campaign_id,creative"
    pages = graph_pages(sandbox_session, url, {"fields": fields, "limit": 5})
    ads = [ad for page in pages for ad in page]
    assert len(pages) > 1 and all(len(p) <= 5 for p in pages)
    ids = [ad["id"] for ad in ads]
    assert len(ids) == len(set(ids))
    visible = world_ads.filter(~pl.col("status").is_in(["ARCHIVED", "DELETED"]))
    assert set(ids) == set(visible["ad_id"].to_list())
    ad = ads[0]
    assert set(ad) >= {"id", "name", "status", "effective_status", "created_time", "creative"}
    assert ad["created_time"].endswith("+0000")
    creative = ad["creative"]
    for key in ("title", "body", "call_to_action_type", "hook_type", "format", "emotion"):
        assert isinstance(creative[key], str) and creative[key]
    row = world_ads.filter(pl.col("ad_id") == ad["id"]).row(0, named=True)
    assert (creative["title"], creative["call_to_action_type"]) == (row["title"], row["cta"])

    for edge in ("campaigns", "adsets"):
        data = graph_pages(
            sandbox_session,
            f"{sandbox.base_url}{V}/act_{account}/{edge}",
            {"fields": "name,status,effective_status"},
        )
        assert sum(len(p) for p in data) > 0
    adsets = graph_pages(
        sandbox_session,
        f"{sandbox.base_url}{V}/act_{account}/adsets",
        {"fields": "daily_budget,campaign_id"},
    )[0]
    assert all(isinstance(a["daily_budget"], str) and a["daily_budget"].isdigit() for a in adsets)


def test_archived_objects_need_effective_status_and_parent_edges(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    with sandbox.lock:
        ads = sandbox.world.ads()
    ad = ads.row(0, named=True)
    base = sandbox.base_url + V
    assert sandbox_session.post(f"{base}/{ad['ad_id']}", data={"status": "ARCHIVED"}).ok
    url = f"{base}/act_{ad['account_id']}/ads"
    default = [a["id"] for p in graph_pages(sandbox_session, url, {}) for a in p]
    assert ad["ad_id"] not in default
    archived = graph_pages(sandbox_session, url, {"effective_status": json.dumps(["ARCHIVED"])})
    assert [a["id"] for p in archived for a in p] == [ad["ad_id"]]
    siblings = graph_pages(
        sandbox_session, f"{base}/{ad['adset_id']}/ads", {"effective_status": "ACTIVE,PAUSED"}
    )
    expected = ads.filter(
        (pl.col("adset_id") == ad["adset_id"]) & (pl.col("ad_id") != ad["ad_id"])
    ).filter(pl.col("effective_status").is_in(["ACTIVE", "PAUSED"]))
    assert sorted(a["id"] for p in siblings for a in p) == sorted(expected["ad_id"].to_list())


def test_object_reads_fields_and_errors(sandbox, sandbox_accounts, sandbox_session):
    account = sandbox_accounts[0]["account_id"]
    with sandbox.lock:
        ad = sandbox.world.ads().filter(pl.col("account_id") == account).row(0, named=True)
        adset = (
            sandbox.world.adsets().filter(pl.col("adset_id") == ad["adset_id"]).row(0, named=True)
        )
    base = sandbox.base_url + V
    got = sandbox_session.get(
        f"{base}/{ad['ad_id']}", params={"fields": "name,adset_id,creative{title,body}"}
    ).json()
    assert got == {
        "id": ad["ad_id"],
        "name": ad["name"],
        "adset_id": ad["adset_id"],
        "creative": {"id": got["creative"]["id"], "title": ad["title"], "body": ad["body"]},
    }
    got = sandbox_session.get(
        f"{base}/{adset['adset_id']}/", params={"fields": "daily_budget,effective_status"}
    ).json()
    assert got["daily_budget"] == str(adset["daily_budget"])
    assert_graph_error(
        sandbox_session.get(f"{base}/{ad['ad_id']}", params={"fields": "bogus"}), 100
    )
    assert_graph_error(sandbox_session.get(f"{base}/123456789012345"), 100, 33)
    minimum = sandbox_session.get(f"{base}/act_{account}/minimum_budgets").json()["data"]
    assert minimum and minimum[0]["currency"] == "USD"
    me = sandbox_session.get(f"{base}/me/adaccounts", params={"fields": "account_id,currency"})
    assert {a["account_id"] for a in me.json()["data"]} == {
        a["account_id"] for a in sandbox_accounts
    }


# ---- insights ----------------------------------------------------------------------------------
def test_insights_pages_are_the_world_rows_as_strings(sandbox, sandbox_accounts, sandbox_session):
    account = sandbox_accounts[1]["account_id"]
    since = date(2026, 11, 1)
    until = world_now(sandbox).date() - timedelta(days=1)
    with sandbox.lock:
        truth = sandbox.world.insights(account, since, until)
    fields = (
        "account_id,campaign_id,adset_id,ad_id,date_start,date_stop,spend,impressions,reach,"
        "clicks,inline_link_clicks,ctr,actions,account_currency"
    )
    params = {
        "level": "ad",
        "time_increment": 1,
        "time_range": json.dumps({"since": str(since), "until": str(until)}),
        "fields": fields,
        "limit": 17,
    }
    pages = graph_pages(sandbox_session, f"{sandbox.base_url}{V}/act_{account}/insights", params)
    rows = [r for p in pages for r in p]
    keys = [(r["date_start"], r["ad_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == truth.height  # no duplicates, no gaps
    assert all(len(p) == 17 for p in pages[:-1])
    for row in rows:
        assert row["date_start"] == row["date_stop"]
        assert row["account_currency"] == "USD"
        for key in ("spend", "impressions", "reach", "clicks", "inline_link_clicks", "ctr"):
            assert isinstance(row[key], str), key
        for action in row.get("actions", []):
            assert action["action_type"] in ("lead", "link_click")
            assert isinstance(action["value"], str) and int(action["value"]) > 0
    by_key = {(str(r["date_start"]), r["ad_id"]): r for r in truth.to_dicts()}
    for row in rows:
        expected = by_key[(row["date_start"], row["ad_id"])]
        assert float(row["spend"]) == pytest.approx(expected["spend"], abs=0.005)
        assert int(row["impressions"]) == expected["impressions"]
        leads = {a["action_type"]: int(a["value"]) for a in row.get("actions", [])}
        assert leads.get("lead", 0) == expected["leads"]
        assert leads.get("link_click", 0) == expected["inline_link_clicks"]
    # a sum over the whole range at account level equals the per-ad rows
    total = sandbox_session.get(
        f"{sandbox.base_url}{V}/act_{account}/insights",
        params={**params, "level": "account", "time_increment": "all_days"},
    ).json()["data"]
    assert len(total) == 1
    assert float(total[0]["spend"]) == pytest.approx(truth["spend"].sum(), abs=0.01)
    assert "next" not in sandbox_session.get(
        f"{sandbox.base_url}{V}/act_{account}/insights", params={**params, "limit": 5000}
    ).json().get("paging", {})


def test_async_insights_report_run(sandbox, sandbox_accounts, sandbox_session):
    account = sandbox_accounts[0]["account_id"]
    base = sandbox.base_url + V
    params = {"level": "ad", "time_increment": 1, "date_preset": "last_7d", "fields": "ad_id,spend"}
    run = sandbox_session.post(f"{base}/act_{account}/insights", data=params).json()
    status = sandbox_session.get(f"{base}/{run['report_run_id']}").json()
    assert status["async_status"] == "Job Completed"
    pages = graph_pages(sandbox_session, f"{base}/{run['report_run_id']}/insights", {"limit": 10})
    direct = graph_pages(sandbox_session, f"{base}/act_{account}/insights", {**params, "limit": 10})
    assert [r for p in pages for r in p] == [r for p in direct for r in p]


# ---- Lead Ads ----------------------------------------------------------------------------------
def test_leads_by_form_and_by_ad_with_time_filter(sandbox, sandbox_session):
    with sandbox.lock:
        leads = sandbox.world.leads()
    assert leads.height > 0
    form = leads["form_id"].mode()[0]
    expected = leads.filter(pl.col("form_id") == form)
    url = f"{sandbox.base_url}{V}/{form}/leads"
    fields = "id,created_time,ad_id,adset_id,campaign_id,form_id,field_data"
    rows = [r for p in graph_pages(sandbox_session, url, {"fields": fields, "limit": 3}) for r in p]
    assert sorted(r["id"] for r in rows) == sorted(expected["lead_id"].to_list())
    lead = rows[0]
    names = {f["name"] for f in lead["field_data"]}
    assert {"email", "full_name"} <= names
    assert lead["created_time"].endswith("+0000")
    cutoff = int(expected["created_time"].sort()[expected.height // 2].timestamp())
    filtering = json.dumps([{"field": "time_created", "operator": "GREATER_THAN", "value": cutoff}])
    later = graph_pages(sandbox_session, url, {"fields": "id", "filtering": filtering})
    n_later = expected.filter(pl.col("created_time").dt.epoch("s") > cutoff).height
    assert sum(len(p) for p in later) == n_later
    ad = expected["ad_id"][0]
    by_ad = graph_pages(sandbox_session, f"{sandbox.base_url}{V}/{ad}/leads", {"fields": "id"})
    assert sum(len(p) for p in by_ad) == leads.filter(pl.col("ad_id") == ad).height


# ---- writes ------------------------------------------------------------------------------------
def test_adset_and_ad_updates_accept_form_json_and_query(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    with sandbox.lock:
        adsets = sandbox.world.adsets()["adset_id"].to_list()
        ad_id = sandbox.world.ads()["ad_id"][0]
    base = sandbox.base_url + V
    assert sandbox_session.post(f"{base}/{adsets[0]}", data={"daily_budget": "2500"}).json() == {
        "success": True
    }
    assert sandbox_session.post(f"{base}/{adsets[1]}", json={"daily_budget": 2600}).ok
    assert sandbox_session.post(f"{base}/{adsets[2]}", params={"status": "PAUSED"}).ok
    assert sandbox_session.post(f"{base}/{ad_id}", data={"status": "PAUSED"}).ok
    with sandbox.lock:
        frame = sandbox.world.adsets()
        budgets = dict(zip(frame["adset_id"], frame["daily_budget"], strict=True))
        statuses = dict(zip(frame["adset_id"], frame["status"], strict=True))
        ad_status = sandbox.world.ads().filter(pl.col("ad_id") == ad_id)["status"][0]
    assert (budgets[adsets[0]], budgets[adsets[1]], statuses[adsets[2]]) == (2500, 2600, "PAUSED")
    assert ad_status == "PAUSED"
    assert_graph_error(sandbox_session.post(f"{base}/{adsets[0]}", data={"status": "ON"}), 100)
    assert_graph_error(
        sandbox_session.post(f"{base}/{adsets[0]}", data={"daily_budget": "2.5"}), 100
    )
    read = sandbox_session.get(f"{base}/{adsets[2]}", params={"fields": "status,effective_status"})
    assert read.json()["status"] == "PAUSED"
    with sandbox.lock:
        row = sandbox.world.adsets().filter(pl.col("status") == "ACTIVE").row(0, named=True)
    assert sandbox_session.post(f"{base}/{row['campaign_id']}", data={"status": "PAUSED"}).ok
    read = sandbox_session.get(f"{base}/{row['adset_id']}", params={"fields": "effective_status"})
    assert read.json()["effective_status"] == "CAMPAIGN_PAUSED"


def test_fifth_budget_edit_in_an_hour_answers_613_1487632(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    with sandbox.lock:
        adset = sandbox.world.adsets()["adset_id"][0]
    url = f"{sandbox.base_url}{V}/{adset}"
    for budget in (2100, 2200, 2300, 2400):
        assert sandbox_session.post(url, data={"daily_budget": budget}).status_code == 200
    refused = sandbox_session.post(url, data={"daily_budget": 2500})
    assert_graph_error(refused, 613, 1487632)
    assert sandbox_session.post(url, data={"status": "PAUSED"}).status_code == 200
    with sandbox.lock:
        budget = sandbox.world.adsets().filter(pl.col("adset_id") == adset)["daily_budget"][0]
    assert budget == 2400
    sandbox.advance(1.5)
    assert sandbox_session.post(url, data={"daily_budget": 2500}).status_code == 200


# ---- batch -------------------------------------------------------------------------------------
def test_batch_runs_items_in_order_and_isolates_failures(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    with sandbox.lock:
        adsets = sandbox.world.adsets()["adset_id"].to_list()
    items = [
        {"method": "POST", "relative_url": f"{adsets[0]}/", "body": "daily_budget=3100"},
        {"method": "GET", "relative_url": f"{adsets[0]}/?fields=daily_budget%2Ceffective_status"},
        {"method": "POST", "relative_url": "999999999999999", "body": "status=PAUSED"},
        {"method": "POST", "relative_url": f"v24.0/{adsets[1]}", "body": "status=BOGUS"},
        {"method": "GET", "relative_url": f"/v24.0/{adsets[1]}?fields=name"},
    ]
    response = sandbox_session.post(sandbox.base_url + V + "/", data={"batch": json.dumps(items)})
    assert response.status_code == 200
    out = response.json()
    assert [item["code"] for item in out] == [200, 200, 400, 400, 200]
    bodies = [json.loads(item["body"]) for item in out]
    assert bodies[0] == {"success": True}
    assert bodies[1]["daily_budget"] == "3100"
    assert bodies[2]["error"]["code"] == 100 and bodies[3]["error"]["code"] == 100
    assert bodies[4]["id"] == adsets[1]
    assert all(isinstance(item["headers"], list) for item in out)
    too_many = [{"method": "GET", "relative_url": f"{adsets[0]}"}] * 51
    assert_graph_error(
        sandbox_session.post(sandbox.base_url + V + "/", data={"batch": json.dumps(too_many)}), 100
    )
    assert len(sandbox_session.post(
        sandbox.base_url + V + "/", json={"batch": too_many[:50]}
    ).json()) == 50  # fmt: skip


# ---- usage headers and rolling limits ---------------------------------------------------------
def test_usage_headers_grow_and_a_spent_budget_throttles(sandbox_fresh, sandbox_accounts):
    sandbox = sandbox_fresh
    account = sandbox_accounts[0]["account_id"]
    sandbox.set_limits(Limits(graph_calls_per_hour_account=40, graph_calls_per_hour_app=1000))
    url = f"{sandbox.base_url}{V}/act_{account}/campaigns"
    params = {"access_token": META_TOKEN}
    usage = []
    for _ in range(10):
        headers = requests.get(url, params=params, timeout=10).headers
        app = json.loads(headers["x-app-usage"])
        acc = json.loads(headers["x-ad-account-usage"])
        buc = json.loads(headers["x-business-use-case-usage"])[account][0]
        assert {"call_count", "total_time", "total_cputime"} <= set(app)
        assert {"acc_id_util_pct", "reset_time_duration"} <= set(acc)
        assert {"type", "call_count", "total_cputime", "total_time"} <= set(buc)
        assert "estimated_time_to_regain_access" in buc
        usage.append(acc["acc_id_util_pct"])
    assert usage == sorted(usage) and usage[-1] > usage[0]
    statuses = [requests.get(url, params=params, timeout=10) for _ in range(35)]
    throttled = [r for r in statuses if r.status_code != 200]
    assert throttled, "calling past the hourly budget must throttle"
    error = assert_graph_error(throttled[-1], 80004, 2446079)
    assert error["is_transient"] is True
    buc = json.loads(throttled[-1].headers["x-business-use-case-usage"])[account][0]
    assert buc["estimated_time_to_regain_access"] > 0
    assert sandbox.request_counts["graph_throttled"] == len(throttled)


# ---- CAPI --------------------------------------------------------------------------------------
def crm_event(now_epoch: int, i: int, **over) -> dict:
    event = {
        "event_name": "Lead",
        "event_time": now_epoch - 3600,
        "event_id": f"deal-{i}-stage-1",
        "action_source": "system_generated",
        "user_data": {"em": [sha(f"person{i}@example.com")], "ph": [sha("16505551212")]},
        "custom_data": {
            "event_source": "crm",
            "lead_event_source": "HubSpot",
            "value": 120.5,
            "currency": "USD",
        },
    }
    event.update(over)
    return event


def capi_received(session: requests.Session, base: str) -> int:
    return session.get(f"{base}/_sandbox/truth/capi").json()["summary"]["events_received"]


def test_capi_accepts_json_body_and_sdk_form_shapes(sandbox, sandbox_accounts, sandbox_session):
    pixel = sandbox_accounts[0]["pixel_id"]
    url = f"{sandbox.base_url}{V}/{pixel}/events"
    now = int(world_now(sandbox).timestamp())
    before = capi_received(sandbox_session, sandbox.base_url)
    events = [crm_event(now, i) for i in range(3)]
    response = sandbox_session.post(url, json={"data": events})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["events_received"] == 3 and body["messages"] == [] and body["fbtrace_id"]
    sdk_form = json.dumps([json.dumps(crm_event(now, 10 + i)) for i in range(2)])
    assert sandbox_session.post(url, data={"data": sdk_form}).json()["events_received"] == 2
    plain_form = json.dumps([crm_event(now, 20)])
    assert sandbox_session.post(url, data={"data": plain_form}).json()["events_received"] == 1
    website = crm_event(
        now,
        30,
        action_source="website",
        event_source_url="https://example.com/lp",
        custom_data={"value": 1.0, "currency": "USD"},
    )
    website["user_data"]["client_user_agent"] = "Mozilla/5.0"
    assert sandbox_session.post(url, json={"data": [website]}).status_code == 200
    tested = sandbox_session.post(url, json={"data": [crm_event(now, 40)], "test_event_code": "T1"})
    assert tested.status_code == 200
    assert capi_received(sandbox_session, sandbox.base_url) == before + 7  # test event not stored


BAD_EVENTS = {
    "old event_time": lambda now: crm_event(now, 1, event_time=now - 8 * 86400),
    "float event_time": lambda now: crm_event(now, 1, event_time=float(now)),
    "raw email": lambda now: crm_event(now, 1, user_data={"em": ["john@example.com"]}),
    "uppercase hash": lambda now: crm_event(now, 1, user_data={"em": sha("a@b.co").upper()}),
    "short lead_id": lambda now: crm_event(now, 1, user_data={"lead_id": "12345"}),
    "no user_data": lambda now: {k: v for k, v in crm_event(now, 1).items() if k != "user_data"},
    "no event_name": lambda now: {k: v for k, v in crm_event(now, 1).items() if k != "event_name"},
    "bad action_source": lambda now: crm_event(now, 1, action_source="crm"),
    "website without url": lambda now: crm_event(now, 1, action_source="website"),
    "value without currency": lambda now: crm_event(now, 1, custom_data={"value": 10.0}),
    "crm without lead_event_source": lambda now: crm_event(
        now, 1, custom_data={"event_source": "crm"}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_capi_one_bad_event_rejects_the_whole_request(
    case, sandbox, sandbox_accounts, sandbox_session
):
    pixel = sandbox_accounts[0]["pixel_id"]
    now = int(world_now(sandbox).timestamp())
    before = capi_received(sandbox_session, sandbox.base_url)
    events = [crm_event(now, 100), crm_event(now, 101), BAD_EVENTS[case](now)]
    response = sandbox_session.post(f"{sandbox.base_url}{V}/{pixel}/events", json={"data": events})
    error = assert_graph_error(response, 100)
    assert "event 2" in error["message"]
    assert capi_received(sandbox_session, sandbox.base_url) == before


def test_capi_limits_store_dedup_and_physical_store_window(
    sandbox, sandbox_accounts, sandbox_session
):
    pixel = sandbox_accounts[1]["pixel_id"]
    url = f"{sandbox.base_url}{V}/{pixel}/events"
    now = int(world_now(sandbox).timestamp())
    too_many = [crm_event(now, i) for i in range(1001)]
    assert (
        "1000"
        in assert_graph_error(sandbox_session.post(url, json={"data": too_many}), 100)["message"]
    )
    store = crm_event(
        now, 7, action_source="physical_store", event_time=now - 30 * 86400, custom_data=None
    )
    assert sandbox_session.post(url, json={"data": [store]}).status_code == 200
    summary = lambda: next(  # noqa: E731
        p
        for p in sandbox_session.get(f"{sandbox.base_url}/_sandbox/truth/capi").json()["data"]
        if p["pixel_id"] == pixel
    )
    before = summary()
    same = [crm_event(now, 500), crm_event(now, 501)]
    for _ in range(2):
        assert sandbox_session.post(url, json={"data": same}).json()["events_received"] == 2
    after = summary()
    assert after["events_received"] - before["events_received"] == 4
    assert after["duplicates"] - before["duplicates"] == 2
    assert_graph_error(sandbox_session.post(f"{sandbox.base_url}{V}/123/events", json={}), 100)


# ---- HubSpot -----------------------------------------------------------------------------------
def test_deal_search_filters_sorts_and_pages_like_hubspot(sandbox, sandbox_session):
    with sandbox.lock:
        deals = sandbox.world.deals()
    assert deals.height > 20
    mods = deals["hs_lastmodifieddate"].sort()
    pivot, high = mods[deals.height // 3], mods[2 * deals.height // 3]
    ms = lambda t: str(int(t.timestamp() * 1000))  # noqa: E731
    props = ["dealname", "amount", "dealstage", "pipeline", "closedate", "hs_lastmodifieddate"]
    sorts = [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}]
    cases = {
        "GTE": (deals["hs_lastmodifieddate"] >= pivot, {"value": ms(pivot)}),
        "GT": (deals["hs_lastmodifieddate"] > pivot, {"value": ms(pivot)}),
        "LT": (deals["hs_lastmodifieddate"] < pivot, {"value": ms(pivot)}),
        "LTE": (deals["hs_lastmodifieddate"] <= pivot, {"value": pivot.isoformat()}),
        "BETWEEN": (
            (deals["hs_lastmodifieddate"] >= pivot) & (deals["hs_lastmodifieddate"] <= high),
            {"value": ms(pivot), "highValue": ms(high)},
        ),
    }
    sandbox.set_limits(Limits(hubspot_search_per_second=None))  # paging many small pages
    try:
        _check_search_cases(sandbox, sandbox_session, deals, cases, props, sorts)
    finally:
        sandbox.set_limits(Limits())
    first = hs_post(sandbox_session, sandbox.base_url + SEARCH, {"limit": 3, "properties": props})
    payload = first.json()
    assert payload["total"] == deals.height and payload["paging"]["next"]["after"] == "3"
    for result in payload["results"]:
        assert {"id", "properties", "createdAt", "updatedAt", "archived"} <= set(result)
        for key, value in result["properties"].items():
            assert value is None or isinstance(value, str), key
        assert isinstance(result["properties"]["amount"], str)
        assert result["properties"]["hs_lastmodifieddate"].endswith("Z")
    desc = hs_post(
        sandbox_session,
        sandbox.base_url + SEARCH,
        {
            "limit": 200,
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "DESCENDING"}],
        },
    ).json()
    stamps = [r["properties"]["hs_lastmodifieddate"] for r in desc["results"]]
    assert stamps == sorted(stamps, reverse=True) and "paging" not in desc


def _check_search_cases(sandbox, session, deals, cases, props, sorts) -> None:
    for op, (mask, value) in cases.items():
        body = {
            "filterGroups": [
                {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": op, **value}]}
            ],
            "sorts": sorts,
            "properties": props,
            "limit": 7,
        }
        results = hs_search_all(session, sandbox.base_url, body)
        ids = [r["id"] for r in results]
        assert len(ids) == len(set(ids)), op
        assert set(ids) == set(deals.filter(mask)["deal_id"].to_list()), op
        stamps = [r["properties"]["hs_lastmodifieddate"] for r in results]
        assert stamps == sorted(stamps), op


def test_deal_search_limits(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    url = sandbox.base_url + SEARCH
    too_big = hs_post(sandbox_session, url, {"limit": 201})
    assert too_big.status_code == 400 and too_big.json()["status"] == "error"
    past_cap = hs_post(sandbox_session, url, {"limit": 10, "after": "10000"})
    assert past_cap.status_code == 400
    assert past_cap.json()["category"] == "VALIDATION_ERROR"
    # a small cap shows the trap: the last allowed page still offers `next`, which answers 400
    sandbox.set_limits(Limits(hubspot_search_max_results=20))
    page = hs_post(sandbox_session, url, {"limit": 10, "after": "10"}).json()
    assert page["paging"]["next"]["after"] == "20"
    assert hs_post(sandbox_session, url, {"limit": 10, "after": "20"}).status_code == 400


def test_deal_search_answers_429_past_five_per_second(sandbox_fresh, sandbox_session):
    sandbox = sandbox_fresh
    url = sandbox.base_url + SEARCH
    statuses, limited = [], None
    for _ in range(200):
        response = sandbox_session.post(url, json={"limit": 1}, timeout=10)
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
    assert limited is not None, "6+ searches in a tight loop must hit the 5/s limit"
    assert statuses.count(200) >= 5
    assert int(limited.headers["Retry-After"]) >= 1
    body = limited.json()
    assert body["status"] == "error" and body["category"] == "RATE_LIMITS"
    assert sandbox.request_counts["hubspot_search_429"] == 1
    assert sandbox.request_counts["hubspot_search_max_per_second"] >= 6
    # other CRM routes are not search and are not limited
    for _ in range(8):
        assert sandbox_session.get(sandbox.base_url + "/crm/v3/pipelines/deals").status_code == 200


def test_pipelines_associations_and_contact_batch_read(sandbox, sandbox_session):
    base = sandbox.base_url
    pipelines = sandbox_session.get(f"{base}/crm/v3/pipelines/deals").json()["results"]
    with sandbox.lock:
        accounts = sandbox.world.accounts()
        links = sandbox.world.deal_contacts()
        contacts = sandbox.world.contacts()
    assert {p["id"] for p in pipelines} == set(accounts["hubspot_pipeline_id"].to_list())
    stages = pipelines[0]["stages"]
    assert [s["label"] for s in stages][:3] == ["Lead", "Appointment scheduled", "Show up"]
    for stage in stages:
        assert isinstance(stage["metadata"]["probability"], str)
        assert stage["metadata"]["isClosed"] in ("true", "false")
    deal_id, contact_id = links.row(0)
    single = sandbox_session.get(f"{base}/crm/v4/objects/deals/{deal_id}/associations/contacts")
    assert [str(r["toObjectId"]) for r in single.json()["results"]] == [contact_id]
    assert single.json()["results"][0]["associationTypes"][0]["typeId"] == 3
    ids = links["deal_id"].head(5).to_list()
    batch = sandbox_session.post(
        f"{base}/crm/v4/associations/deals/contacts/batch/read",
        json={"inputs": [{"id": i} for i in ids]},
    )
    assert batch.status_code == 200
    body = batch.json()
    assert body["status"] == "COMPLETE"
    assert [r["from"]["id"] for r in body["results"]] == ids
    assert all(r["to"][0]["toObjectId"] for r in body["results"])
    partial = sandbox_session.post(
        f"{base}/crm/v4/associations/deals/contacts/batch/read",
        json={"inputs": [{"id": ids[0]}, {"id": "1"}]},
    )
    assert partial.status_code == 207 and partial.json()["errors"]
    wanted = contacts["contact_id"].head(3).to_list()
    read = sandbox_session.post(
        f"{base}/crm/v3/objects/contacts/batch/read",
        json={
            "properties": ["email", "hs_analytics_first_url"],
            "inputs": [{"id": i} for i in wanted],
        },
    ).json()
    assert sorted(r["id"] for r in read["results"]) == sorted(wanted)
    assert all("email" in r["properties"] for r in read["results"])
    too_many = sandbox_session.post(
        f"{base}/crm/v3/objects/contacts/batch/read",
        json={"inputs": [{"id": str(i)} for i in range(101)]},
    )
    assert too_many.status_code == 400 and too_many.json()["category"] == "VALIDATION_ERROR"


# ---- faults ------------------------------------------------------------------------------------
def test_fault_knobs(sandbox_fresh, sandbox_accounts, sandbox_session):
    sandbox = sandbox_fresh
    base = sandbox.base_url
    account = sandbox_accounts[0]["account_id"]
    graph_url = f"{base}{V}/act_{account}/insights"
    sandbox.set_faults(Faults(rate_5xx=1.0))
    assert sandbox_session.get(graph_url).status_code in (500, 502, 503)
    assert sandbox_session.get(f"{base}/crm/v3/pipelines/deals").status_code in (500, 502, 503)
    sandbox.set_faults(Faults(rate_429=1.0))
    limited = sandbox_session.get(f"{base}/crm/v3/pipelines/deals")
    assert limited.status_code == 429 and "Retry-After" in limited.headers
    assert sandbox_session.get(graph_url).status_code == 200  # 429s are a HubSpot fault
    sandbox.set_faults(Faults(rate_throttle=1.0, seed=3))
    codes = set()
    for _ in range(12):
        response = sandbox_session.get(f"{base}{V}/act_{account}/ads")
        codes.add(response.json()["error"]["code"])
        assert "x-app-usage" in response.headers
    assert codes <= {4, 17, 80004} and len(codes) >= 2
    insights = sandbox_session.get(graph_url).json()["error"]
    assert insights["code"] in (4, 17, 80000)
    sandbox.set_faults(Faults(rate_null_batch_item=1.0))
    items = [{"method": "GET", "relative_url": f"act_{account}"}] * 3
    assert (
        sandbox_session.post(f"{base}{V}/", data={"batch": json.dumps(items)}).json() == [None] * 3
    )
    sandbox.set_faults(Faults(slow_share=1.0, slow_seconds=0.01))
    assert sandbox_session.get(graph_url).status_code == 200
    assert sandbox.request_counts["fault_slow"] >= 1

    def run(seed: int) -> list[int]:
        sandbox.set_faults(Faults(rate_5xx=0.3, rate_429=0.3, seed=seed))
        return [
            sandbox_session.get(f"{base}/crm/v3/pipelines/deals").status_code for _ in range(20)
        ]

    first = run(5)
    assert first == run(5)  # same seed, same faults
    assert len(set(first)) > 1
    control = sandbox_session.post(f"{base}/_sandbox/faults", json={"rate_5xx": 0.5, "seed": 1})
    assert control.json()["rate_5xx"] == 0.5
    assert sandbox_session.post(f"{base}/_sandbox/faults", json={"nope": 1}).status_code == 400
    sandbox.set_faults(Faults())
    assert sandbox_session.get(graph_url).status_code == 200


# ---- control, clock, concurrency ---------------------------------------------------------------
def test_control_advance_state_and_truth(sandbox_fresh, sandbox_session):
    base = sandbox_fresh.base_url
    before = sandbox_session.get(f"{base}/_sandbox/state").json()
    after = sandbox_session.post(f"{base}/_sandbox/advance", json={"hours": 6}).json()
    assert after["now"] > before["now"]
    assert after["counts"]["deals"] >= before["counts"]["deals"]
    assert "requests" in after and after["requests"]["sandbox_control"] >= 2
    for name in ("contacts", "deals", "ads", "drifts", "capi"):
        response = sandbox_session.get(f"{base}/_sandbox/truth/{name}")
        assert response.status_code == 200 and isinstance(response.json()["data"], list), name
    contacts = sandbox_session.get(f"{base}/_sandbox/truth/contacts").json()["data"]
    assert contacts and "true_ad_id" in contacts[0]
    bad = sandbox_session.post(f"{base}/_sandbox/advance", json={"hours": -1})
    assert bad.status_code == 400


def test_speed_moves_the_simulated_clock_in_the_background():
    config = WorldConfig(seed=3, accounts=1, ads_per_account=4)
    with SandboxServer(config, speed=36_000.0) as sandbox:  # 10 simulated hours per second
        start = world_now(sandbox)
        deadline = time.monotonic() + 20
        while world_now(sandbox) <= start and time.monotonic() < deadline:
            time.sleep(0.05)
        assert world_now(sandbox) > start
        response = requests.get(
            f"{sandbox.base_url}/_sandbox/state", params={"access_token": META_TOKEN}, timeout=10
        )
        assert response.json()["speed"] == 36_000.0


def test_concurrent_requests_and_clock_moves_are_serialized(sandbox_fresh, sandbox_accounts):
    sandbox = sandbox_fresh
    sandbox.set_limits(Limits(hubspot_search_per_second=None))
    account = sandbox_accounts[0]["account_id"]
    errors: list[str] = []

    def worker(kind: str) -> None:
        with requests.Session() as s:
            s.params = {"access_token": META_TOKEN}
            s.headers["Authorization"] = f"Bearer {HUBSPOT_TOKEN}"
            for _ in range(8):
                if kind == "graph":
                    r = s.get(
                        f"{sandbox.base_url}{V}/act_{account}/insights",
                        params={"level": "ad", "time_increment": 1, "date_preset": "last_7d"},
                    )
                elif kind == "crm":
                    r = s.post(sandbox.base_url + SEARCH, json={"limit": 50})
                else:
                    r = s.post(f"{sandbox.base_url}/_sandbox/advance", json={"hours": 0.5})
                if r.status_code != 200:
                    errors.append(f"{kind}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("graph", "crm", "clock") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sandbox.request_counts["graph_insights"] == 16
    assert sandbox.request_counts["hubspot_search"] == 16
