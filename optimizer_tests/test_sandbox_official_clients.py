"""The sandbox accepts what the official SDKs send (PyPI facebook-business, hubspot-api-client)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, META_TOKEN

facebook_business = pytest.importorskip("facebook_business")
hubspot = pytest.importorskip("hubspot")

from facebook_business.adobjects.adaccount import AdAccount  # noqa: E402
from facebook_business.adobjects.adset import AdSet  # noqa: E402
from facebook_business.adobjects.serverside.action_source import ActionSource  # noqa: E402
from facebook_business.adobjects.serverside.custom_data import CustomData  # noqa: E402
from facebook_business.adobjects.serverside.event import Event  # noqa: E402
from facebook_business.adobjects.serverside.event_request import EventRequest  # noqa: E402
from facebook_business.adobjects.serverside.user_data import UserData  # noqa: E402
from facebook_business.api import FacebookAdsApi  # noqa: E402
from facebook_business.exceptions import FacebookRequestError  # noqa: E402
from facebook_business.session import FacebookSession  # noqa: E402
from hubspot import HubSpot  # noqa: E402
from hubspot.crm.deals import PublicObjectSearchRequest  # noqa: E402


@pytest.fixture(scope="module")
def fb_api(sandbox):
    """The SDK's default API pointed at the sandbox: only the session's GRAPH URL changes."""
    session = FacebookSession(access_token=META_TOKEN)
    session.GRAPH = sandbox.base_url  # the SDK joins GRAPH + "/" + version + path
    api = FacebookAdsApi(session, api_version="v24.0")
    previous = FacebookAdsApi.get_default_api()
    FacebookAdsApi.set_default_api(api)  # EventRequest and AdSet use the default API
    yield api
    FacebookAdsApi.set_default_api(previous)


@pytest.fixture(scope="module")
def hs_client(sandbox):
    return HubSpot(access_token=HUBSPOT_TOKEN)


def _pointed(api, base_url: str):
    api.api_client.configuration.host = base_url
    return api


def test_capi_event_request_from_the_sdk(fb_api, sandbox, sandbox_accounts):
    pixel = sandbox_accounts[0]["pixel_id"]
    with sandbox.lock:
        now = int(sandbox.world.now.timestamp())
        lead = sandbox.world.leads().row(0, named=True)
    user = UserData(
        emails=["John_Smith@gmail.com"],
        phones=["16505551212"],
        lead_id=int(lead["lead_id"]),
    )
    custom = CustomData(
        value=150.0,
        currency="usd",
        custom_properties={"event_source": "crm", "lead_event_source": "HubSpot"},
    )
    events = [
        Event(
            event_name=name,
            event_time=now - 600,
            event_id=f"deal-1-{name}",
            user_data=user,
            custom_data=custom,
            action_source=ActionSource.SYSTEM_GENERATED,
        )
        for name in ("Lead", "Appointment scheduled")
    ]
    response = EventRequest(pixel_id=pixel, events=events).execute()
    assert response.events_received == 2
    assert response.fbtrace_id
    with sandbox.lock:
        match = sandbox.world.capi_match()
    assert match["events_received"] >= 2
    # the SDK surfaces the whole-request rejection as an error
    old = Event(
        event_name="Lead",
        event_time=now - 8 * 86400,
        user_data=user,
        action_source=ActionSource.SYSTEM_GENERATED,
    )
    with pytest.raises(FacebookRequestError) as raised:
        EventRequest(pixel_id=pixel, events=[events[0], old]).execute()
    assert raised.value.api_error_code() == 100
    assert "event 1" in raised.value.api_error_message()


def test_adset_budget_update_and_batch_from_the_sdk(fb_api, sandbox, sandbox_accounts):
    account = sandbox_accounts[1]["account_id"]
    with sandbox.lock:
        adsets = sandbox.world.adsets().filter(pl.col("account_id") == account)
    first, second = adsets["adset_id"][0], adsets["adset_id"][1]
    AdSet(first).api_update(params={"daily_budget": 2500})
    with sandbox.lock:
        budget = sandbox.world.adsets().filter(pl.col("adset_id") == first)["daily_budget"][0]
    assert budget == 2500

    successes, failures = [], []
    batch = fb_api.new_batch()
    AdSet(second).api_update(
        params={"daily_budget": 2700},
        batch=batch,
        success=lambda r: successes.append(r.json()),
        failure=lambda r: failures.append(r.json()),
    )
    AdSet(second).api_get(
        fields=[AdSet.Field.daily_budget, AdSet.Field.effective_status],
        batch=batch,
        success=lambda r: successes.append(r.json()),
        failure=lambda r: failures.append(r.json()),
    )
    AdSet(first).api_update(
        params={"daily_budget": 1},  # below the account minimum
        batch=batch,
        success=lambda r: successes.append(r.json()),
        failure=lambda r: failures.append(r.json()),
    )
    assert batch.execute() is None  # no item to retry
    assert successes[0] == {"success": True}
    assert successes[1]["daily_budget"] == "2700"
    assert len(failures) == 1 and failures[0]["error"]["code"] == 100


def test_sdk_cursor_follows_sandbox_paging(fb_api, sandbox, sandbox_accounts):
    account = sandbox_accounts[0]["account_id"]
    ads = AdAccount(f"act_{account}").get_ads(
        fields=["name", "effective_status", "creative"], params={"limit": 5}
    )
    ids = [ad["id"] for ad in ads]
    with sandbox.lock:
        world_ads = sandbox.world.ads().filter(
            (pl.col("account_id") == account) & ~pl.col("status").is_in(["ARCHIVED", "DELETED"])
        )
    assert sorted(ids) == sorted(world_ads["ad_id"].to_list())
    rows = AdAccount(f"act_{account}").get_insights(
        fields=["ad_id", "spend", "impressions", "actions"],
        params={
            "level": "ad",
            "time_increment": 1,
            "time_range": {"since": "2026-11-01", "until": "2026-11-05"},
            "limit": 10,
        },
    )
    rows = [dict(r) for r in rows]
    keys = [(r["date_start"], r["ad_id"]) for r in rows]
    assert rows and len(keys) == len(set(keys))
    assert all(isinstance(r["spend"], str) for r in rows)


def test_hubspot_client_deal_search_and_pipelines(hs_client, sandbox):
    search_api = _pointed(hs_client.crm.deals.search_api, sandbox.base_url)
    with sandbox.lock:
        deals = sandbox.world.deals()
    since = deals["hs_lastmodifieddate"].sort()[deals.height // 2]
    request = PublicObjectSearchRequest(
        filter_groups=[
            {
                "filters": [
                    {
                        "propertyName": "hs_lastmodifieddate",
                        "operator": "GTE",
                        "value": str(int(since.timestamp() * 1000)),
                    }
                ]
            }
        ],
        sorts=[{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
        properties=["dealname", "amount", "dealstage", "pipeline", "hs_lastmodifieddate"],
        limit=100,
    )
    page = search_api.do_search(public_object_search_request=request)
    expected = deals.filter(pl.col("hs_lastmodifieddate") >= since)
    assert page.total == expected.height
    assert {r.id for r in page.results} == set(expected["deal_id"].to_list())
    assert all(isinstance(r.properties["amount"], str) for r in page.results)
    assert page.results[0].updated_at.tzinfo is not None

    pipelines_api = _pointed(hs_client.crm.pipelines.pipelines_api, sandbox.base_url)
    pipelines = pipelines_api.get_all("deals").results
    with sandbox.lock:
        accounts = sandbox.world.accounts()
    assert {p.id for p in pipelines} == set(accounts["hubspot_pipeline_id"].to_list())
    closed = [s for s in pipelines[0].stages if s.metadata["isClosed"] == "true"]
    assert sorted(s.label for s in closed) == ["Closed lost", "Closed won"]


def test_hubspot_client_sees_the_401_and_400_error_bodies(sandbox):
    from hubspot.crm.deals import ApiException

    wrong = HubSpot(access_token="wrong-token")
    search_api = _pointed(wrong.crm.deals.search_api, sandbox.base_url)
    with pytest.raises(ApiException) as raised:
        search_api.do_search(public_object_search_request=PublicObjectSearchRequest(limit=1))
    assert raised.value.status == 401
    assert json.loads(raised.value.body)["category"] == "INVALID_AUTHENTICATION"
    right = _pointed(HubSpot(access_token=HUBSPOT_TOKEN).crm.deals.search_api, sandbox.base_url)
    with pytest.raises(ApiException) as raised:
        right.do_search(public_object_search_request=PublicObjectSearchRequest(limit=500))
    assert raised.value.status == 400
