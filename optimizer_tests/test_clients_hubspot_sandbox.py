"""HubSpotClient against the real sandbox server over loopback HTTP, with fault injection.

Results are compared with the World's own frames; request limits are checked with the server's
counters (HubSpot search: at most 5 requests in any 1 s window; batch reads <= 100 inputs).
Retry waits use a recording no-op sleep; the search pacing uses real time because the sandbox
enforces 5 searches/s on its wall clock.
"""

from __future__ import annotations

import random
from datetime import timedelta

import polars as pl
import pytest

from optimizer_assets.clients import (
    HubSpotAPIError,
    HubSpotClient,
    RetriesExhaustedError,
    RetryPolicy,
    SlidingWindowLimiter,
)
from optimizer_assets.sandbox.server import Faults, Limits, SandboxServer
from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, World, WorldConfig


class RecordingSleep:
    """A sleep that returns at once and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture(scope="module")
def world() -> World:
    w = World(WorldConfig(seed=7))
    w.advance(24 * 14)  # ~460 deals, ~800 contacts
    return w


@pytest.fixture(scope="module")
def truth(world: World) -> dict[str, pl.DataFrame]:
    """The world's frames, read once before any server runs (the world is only read here)."""
    return {
        "deals": world.deals(),
        "deal_contacts": world.deal_contacts(),
        "contacts": world.contacts(),
        "pipelines": world.pipelines(),
    }


@pytest.fixture
def sandbox(world: World, truth: dict):
    with SandboxServer(world=world) as server:
        # one search quota per portal: every client of a test shares this real-time limiter
        server.search_limiter = SlidingWindowLimiter(5, 1.1)
        yield server


def make_client(sandbox: SandboxServer, *, read_timeout: float = 5.0, **policy) -> HubSpotClient:
    retry = RetryPolicy(**{"max_attempts": 8, **policy})
    return HubSpotClient(
        HUBSPOT_TOKEN,
        base_url=sandbox.base_url,
        retry=retry,
        rng=random.Random(11),
        sleep=RecordingSleep(),
        timeout=(2.0, read_timeout),
        search_limiter=sandbox.search_limiter,  # real clock: the server counts real time
    )


def _ms(moment) -> int:
    return int(moment.timestamp() * 1000)


def _search_count(client: HubSpotClient) -> int:
    return sum(1 for r in client.request_log if r.path.endswith("/search"))


def _check_deals(got: list[dict], expected: pl.DataFrame) -> None:
    ids = [d["id"] for d in got]
    assert len(ids) == len(set(ids)), "a deal was returned twice"
    assert set(ids) == set(expected["deal_id"].to_list())
    stamps = [d["hs_lastmodifieddate"] for d in got]
    assert stamps == sorted(stamps)
    frame = pl.DataFrame(
        {
            "deal_id": ids,
            "got_stage": [d["dealstage"] for d in got],
            "got_pipeline": [d["pipeline"] for d in got],
            "got_amount": [None if d["amount"] is None else float(d["amount"]) for d in got],
        },
        schema_overrides={"got_amount": pl.Float64},
    )
    joined = expected.join(frame, on="deal_id")
    assert (joined["dealstage"] == joined["got_stage"]).all()
    assert (joined["pipeline"] == joined["got_pipeline"]).all()
    assert joined["amount"].is_null().eq(joined["got_amount"].is_null()).all()
    assert ((joined["amount"] - joined["got_amount"]).abs().fill_null(0) < 0.01).all()


def test_deal_search_pages_every_deal_within_the_rate_limit(sandbox, truth) -> None:
    client = make_client(sandbox)
    got = list(client.search_deals_modified(0, page_size=50))
    _check_deals(got, truth["deals"])
    assert _search_count(client) == -(-truth["deals"].height // 50)
    assert sandbox.request_counts["hubspot_search_max_per_second"] <= 5
    assert sandbox.request_counts["hubspot_search_429"] == 0  # our pacing kept us under it


def test_deal_search_window_bounds(sandbox, truth) -> None:
    client = make_client(sandbox)
    since = WorldConfig().start + timedelta(days=5)
    until = WorldConfig().start + timedelta(days=9)
    got = list(client.search_deals_modified(_ms(since), _ms(until), page_size=200))
    modified = pl.col("hs_lastmodifieddate")
    expected = truth["deals"].filter((modified >= since) & (modified < until))
    assert 0 < expected.height < truth["deals"].height
    _check_deals(got, expected)


def test_search_moves_the_lower_bound_instead_of_paging_past_the_cap(sandbox, truth) -> None:
    # a small server-side result cap stands in for HubSpot's 10,000 so the test stays fast
    sandbox.set_limits(Limits(hubspot_search_max_results=120))
    naive = make_client(sandbox)
    with pytest.raises(HubSpotAPIError) as info:
        list(naive.search_deals_modified(0, page_size=40, paging_cap=10_000))
    assert info.value.http_status == 400 and "120 results" in info.value.message
    client = make_client(sandbox)
    got = list(client.search_deals_modified(0, page_size=40, paging_cap=120))
    _check_deals(got, truth["deals"])
    assert sandbox.request_counts["hubspot_search_max_per_second"] <= 5


def test_storm_of_429_and_5xx_ends_with_the_right_data(sandbox, truth) -> None:
    sandbox.set_faults(Faults(rate_429=0.3, rate_5xx=0.15, seed=3))
    client = make_client(sandbox, max_attempts=10)
    got = list(client.search_deals_modified(0, page_size=100))
    _check_deals(got, truth["deals"])
    stages = client.pipeline_stages()
    expected_stages = {s["id"] for p in truth["pipelines"] for s in p["stages"]}
    assert set(stages["stage_id"].to_list()) == expected_stages
    assert sandbox.request_counts["fault_429"] > 0 and sandbox.request_counts["fault_5xx"] > 0
    pages = -(-truth["deals"].height // 100)
    assert client.request_count > pages + 1  # faults cost extra attempts, yet the data is whole
    assert sandbox.request_counts["hubspot_search_max_per_second"] <= 5
    assert any(s >= 1.0 for s in client.sleep.calls)  # Retry-After: 1 was honoured


def test_slow_responses_time_out_and_are_retried(sandbox, truth) -> None:
    sandbox.set_faults(Faults(slow_share=0.4, slow_seconds=1.0, seed=4))
    client = make_client(sandbox, read_timeout=0.3, max_attempts=10)
    deals = truth["deals"]["deal_id"].to_list()[:250]
    pairs = client.deal_contact_ids(deals, chunk_size=25)
    expected = truth["deal_contacts"].filter(pl.col("deal_id").is_in(deals))
    assert set(pairs.iter_rows()) == set(expected.select("deal_id", "contact_id").iter_rows())
    assert sandbox.request_counts["fault_slow"] > 0
    assert client.request_count > 10  # 10 chunks of 25, plus the retried timeouts


def test_associations_and_contacts_match_the_world(sandbox, truth) -> None:
    client = make_client(sandbox)
    deal_ids = truth["deals"]["deal_id"].to_list()
    pairs = client.deal_contact_ids(deal_ids)
    expected = truth["deal_contacts"].select("deal_id", "contact_id").unique()
    assert sorted(pairs.iter_rows()) == sorted(expected.iter_rows())
    assert client.request_count == -(-len(deal_ids) // 100)
    contact_ids = pairs["contact_id"].unique().to_list()
    before = client.request_count
    contacts = client.read_contacts(contact_ids)
    assert client.request_count - before == -(-len(contact_ids) // 100)
    got = pl.DataFrame(
        [
            {
                "contact_id": c["id"],
                "got_email": c["email"],
                "got_url": c.get("hs_analytics_first_url"),
            }
            for c in contacts
        ],
        schema={"contact_id": pl.Utf8, "got_email": pl.Utf8, "got_url": pl.Utf8},
    )
    truth = truth["contacts"].join(got, on="contact_id")
    assert truth.height == len(contact_ids)
    assert truth["email"].eq_missing(truth["got_email"]).all()
    assert truth["hs_analytics_first_url"].eq_missing(truth["got_url"]).all()


def test_errors_are_clear_and_bounded(sandbox) -> None:
    wrong = "not-the-token-123"
    bad = HubSpotClient(wrong, base_url=sandbox.base_url, sleep=RecordingSleep())
    with pytest.raises(HubSpotAPIError) as info:
        bad.pipelines()
    err = info.value
    assert err.http_status == 401 and err.category == "INVALID_AUTHENTICATION"
    assert err.correlation_id and wrong not in str(err) and bad.request_count == 1

    sandbox.set_faults(Faults(rate_5xx=1.0, seed=1))
    client = make_client(sandbox, max_attempts=3)
    with pytest.raises(RetriesExhaustedError) as exhausted:
        client.pipelines()
    assert client.request_count == 3 and exhausted.value.attempts == 3
    assert "gave up" in str(exhausted.value) and HUBSPOT_TOKEN not in str(exhausted.value)
