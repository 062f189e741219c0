"""Client retry/backoff/usage-header/error logic against a scripted loopback HTTP server.

The server here is a test double of the network: each test scripts the answers (status, body,
headers, delay) or a small responder function, and reads back what the client sent.
"""

from __future__ import annotations

import json
import random
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest

from optimizer_assets.clients import (
    BatchItem,
    BudgetEditLimitError,
    CapiClient,
    CapiRejectedError,
    GraphAPIError,
    GraphClient,
    HubSpotAPIError,
    HubSpotClient,
    RetriesExhaustedError,
    RetryPolicy,
    SlidingWindowLimiter,
    ThrottledError,
    TooManyItemsError,
    TransportError,
)
from optimizer_assets.clients.errors import redact
from optimizer_assets.clients.http import parse_retry_after
from optimizer_tests.fake_clock import FakeClock

TOKEN = "s3cr3t-token-XYZ"


# --------------------------------------------------------------------------- test doubles
Answer = tuple[int, Any, dict[str, str], float]  # status, body, headers, delay seconds


class Script:
    """Scripted answers in order (or a responder function) and the requests received."""

    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        self.responder: Callable[[dict[str, Any]], Answer] | None = None
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        times: int = 1,
    ) -> Script:
        for _ in range(times):
            self.answers.append((status, {} if body is None else body, headers or {}, delay))
        return self

    def answer(self, request: dict[str, Any]) -> Answer:
        with self.lock:
            self.requests.append(request)
            if self.responder is not None:
                return self.responder(request)
            if not self.answers:
                return 599, {"message": "script exhausted"}, {}, 0.0
            return self.answers.popleft()


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            parts = urlsplit(self.path)
            ctype = self.headers.get("Content-Type") or ""
            if "json" in ctype and raw:
                body: Any = json.loads(raw)
            elif raw:
                body = {k: v[0] for k, v in parse_qs(raw).items()}
            else:
                body = None
            request = {
                "method": self.command,
                "path": parts.path,
                "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                "raw_query": parts.query,
                "headers": dict(self.headers),
                "body": body,
                "raw_body": raw,
            }
            status, payload, headers, delay = script.answer(request)
            if delay:
                threading.Event().wait(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = _serve

    return Handler


@pytest.fixture
def server():
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    script.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield script
    httpd.shutdown()
    httpd.server_close()


def _kwargs(clock: FakeClock, **policy: Any) -> dict[str, Any]:
    retry = RetryPolicy(**{"max_attempts": 5, "max_total_wait_s": 600.0, **policy})
    return {
        "retry": retry,
        "rng": random.Random(3),
        "sleep": clock.sleep,
        "clock": clock,
        "timeout": (2.0, 5.0),
    }


def hubspot(server: Script, clock: FakeClock, **policy: Any) -> HubSpotClient:
    return HubSpotClient(TOKEN, base_url=server.base_url, **_kwargs(clock, **policy))


def graph(server: Script, clock: FakeClock, **policy: Any) -> GraphClient:
    return GraphClient(TOKEN, base_url=server.base_url, **_kwargs(clock, **policy))


def graph_error(code: int, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    err = {"message": f"(#{code}) boom", "type": "OAuthException", "code": code}
    err["fbtrace_id"] = "TRACE123"
    if subcode is not None:
        err["error_subcode"] = subcode
    err.update(extra)
    return {"error": err}


PIPELINES = {
    "results": [
        {
            "id": "p1",
            "label": "Acct 1",
            "displayOrder": 0,
            "stages": [
                {"id": "11", "label": "Lead", "metadata": {"probability": "0.1"}},
                {
                    "id": "14",
                    "label": "Closed won",
                    "displayOrder": 3,
                    "metadata": {"probability": "1.0", "isClosed": "true"},
                },
            ],
        }
    ]
}


# --------------------------------------------------------------------------- retries
def test_429_retry_after_is_honoured_then_succeeds(server: Script) -> None:
    clock = FakeClock()
    server.add(429, {"status": "error", "message": "slow down"}, {"Retry-After": "7"})
    server.add(200, PIPELINES)
    client = hubspot(server, clock)
    pipelines = client.pipelines()
    assert pipelines[0]["stages"][1]["is_closed"] is True
    assert pipelines[0]["stages"][0]["probability"] == pytest.approx(0.1)
    assert client.request_count == 2
    assert clock.sleeps == [7.0]  # Retry-After beats the shorter backoff, and is not doubled


def test_5xx_backoff_is_exponential_with_seeded_jitter(server: Script) -> None:
    clock = FakeClock()
    server.add(503, {"message": "unavailable"}, times=3).add(200, PIPELINES)
    client = hubspot(server, clock, base_delay_s=1.0)
    client.pipelines()
    policy, rng = client.retry, random.Random(3)
    assert clock.sleeps == [policy.backoff(n, rng) for n in (1, 2, 3)]
    for n, slept in enumerate(clock.sleeps, start=1):
        assert 2 ** (n - 1) / 2 <= slept <= 2 ** (n - 1)
    assert client.request_count == 4


def test_bounded_attempts_end_in_a_clear_error(server: Script) -> None:
    clock = FakeClock()
    body = {"status": "error", "message": "internal", "category": "X", "correlationId": "c-1"}
    server.add(500, body, times=10)
    client = hubspot(server, clock, max_attempts=4)
    with pytest.raises(RetriesExhaustedError) as info:
        client.pipelines()
    assert client.request_count == 4
    assert info.value.attempts == 4
    last = info.value.last_error
    assert isinstance(last, HubSpotAPIError)
    assert last.correlation_id == "c-1" and last.http_status == 500
    assert "4 attempts" in str(info.value) and "internal" in str(info.value)


def test_wait_longer_than_budget_gives_up_and_stops_calling(server: Script) -> None:
    clock = FakeClock()
    server.add(429, {"message": "blocked"}, {"Retry-After": "10000"}, times=3)
    client = hubspot(server, clock, max_total_wait_s=60.0)
    with pytest.raises(RetriesExhaustedError, match="budget"):
        client.pipelines()
    assert client.request_count == 1 and clock.sleeps == []
    # the block is remembered: the next call does not reach the server at all
    with pytest.raises(ThrottledError) as info:
        client.pipelines()
    assert client.request_count == 1
    assert info.value.wait_s > 9000


def test_read_timeout_is_retried(server: Script) -> None:
    clock = FakeClock()
    # generous margins: a loaded CI machine must still answer the second request in time
    server.add(200, PIPELINES, delay=6.0).add(200, PIPELINES)
    client = hubspot(server, clock)
    client.timeout = (2.0, 2.0)
    assert client.pipelines()[0]["id"] == "p1"
    assert client.request_count == 2


def test_only_timeouts_end_in_transport_error(server: Script) -> None:
    clock = FakeClock()
    server.add(200, PIPELINES, delay=0.6, times=2)
    client = hubspot(server, clock, max_attempts=2)
    client.timeout = (1.0, 0.15)
    with pytest.raises(RetriesExhaustedError) as info:
        client.pipelines()
    assert isinstance(info.value.last_error, TransportError)
    assert TOKEN not in str(info.value)


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sun, 01 Nov 2026 12:00:30 GMT", now=now) == pytest.approx(30.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --------------------------------------------------------------------------- Graph errors
def test_graph_error_is_typed_and_not_retried(server: Script) -> None:
    clock = FakeClock()
    body = graph_error(100, 33, message=f"bad thing access_token={TOKEN} and {TOKEN}")
    server.add(400, body)
    client = graph(server, clock)
    with pytest.raises(GraphAPIError) as info:
        client.update_ad("555", "PAUSED")
    err = info.value
    assert (err.code, err.subcode, err.fbtrace_id, err.http_status) == (100, 33, "TRACE123", 400)
    assert "bad thing" in err.message
    assert TOKEN not in str(err) and TOKEN not in repr(err.args) and TOKEN not in err.message
    assert client.request_count == 1 and clock.sleeps == []


def test_budget_edit_limit_is_surfaced_not_retried(server: Script) -> None:
    clock = FakeClock()
    server.add(400, graph_error(613, 1487632), times=3)
    client = graph(server, clock)
    with pytest.raises(BudgetEditLimitError) as info:
        client.update_adset("777", daily_budget=2500)
    assert info.value.code == 613 and info.value.subcode == 1487632
    assert client.request_count == 1


@pytest.mark.parametrize(
    "body",
    [
        graph_error(4),
        graph_error(17, 2446079),
        graph_error(32),
        graph_error(613),
        graph_error(80000, 2446079),
        graph_error(80004, 2446079),
        graph_error(2, is_transient=True),
    ],
    ids=["4", "17", "32", "613", "80000", "80004", "is_transient"],
)
def test_graph_throttle_and_transient_codes_are_retried(server: Script, body: dict) -> None:
    clock = FakeClock()
    server.add(400, body).add(200, {"success": True})
    client = graph(server, clock)
    assert client.update_ad("555", "PAUSED") == {"success": True}
    assert client.request_count == 2
    if not body["error"].get("is_transient"):
        assert clock.sleeps[0] >= client.retry.throttle_min_delay_s


def test_token_travels_only_in_the_authorization_header(server: Script) -> None:
    clock = FakeClock()
    server.add(200, {"data": []}).add(200, {"success": True})
    client = graph(server, clock)
    client.campaigns("act_1")
    client.update_adset("9", daily_budget=1234, status="ACTIVE")
    for req in server.requests:
        assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in req["raw_query"] and TOKEN not in req["raw_body"]
    assert server.requests[1]["body"] == {"daily_budget": "1234", "status": "ACTIVE"}
    assert server.requests[0]["path"] == "/v24.0/act_1/campaigns"
    assert TOKEN not in repr(client)


def test_redact_removes_tokens() -> None:
    text = f"GET /x?access_token={TOKEN}&a=1 Authorization: Bearer abc.def {TOKEN}"
    out = redact(text, (TOKEN,))
    assert TOKEN not in out and "abc.def" not in out and "a=1" in out


def test_connection_failure_is_a_clear_redacted_error() -> None:
    clock = FakeClock()
    client = GraphClient(TOKEN, base_url="http://127.0.0.1:9", **_kwargs(clock, max_attempts=2))
    with pytest.raises(RetriesExhaustedError) as info:
        client.campaigns("1")
    assert isinstance(info.value.last_error, TransportError)
    assert TOKEN not in str(info.value) and client.request_count == 2


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        GraphClient("", base_url="http://127.0.0.1:9")


# --------------------------------------------------------------------------- usage headers
def _buc(account: str, eta_minutes: int, pct: int = 50) -> dict[str, str]:
    entry = {
        "type": "ads_insights",
        "call_count": pct,
        "total_cputime": 1,
        "total_time": 1,
        "estimated_time_to_regain_access": eta_minutes,
    }
    return {"x-business-use-case-usage": json.dumps({account: [entry]})}


def test_business_use_case_block_pauses_that_account_only(server: Script) -> None:
    clock = FakeClock()
    server.add(200, {"data": []}, _buc("123", 2)).add(200, {"data": []}, times=2)
    client = graph(server, clock)
    client.campaigns("123")
    client.campaigns("456")  # another account: not blocked
    assert clock.sleeps == []
    client.campaigns("act_123")
    assert clock.sleeps == [120.0]  # waited out the 2-minute block before calling
    assert client.request_count == 3


def test_block_longer_than_budget_raises_without_calling(server: Script) -> None:
    clock = FakeClock()
    server.add(200, {"data": []}, _buc("123", 60))
    client = graph(server, clock, max_total_wait_s=300.0)
    client.campaigns("123")
    with pytest.raises(ThrottledError) as info:
        client.adsets("123")
    assert info.value.scope == "account:123" and info.value.wait_s == pytest.approx(3600)
    assert client.request_count == 1


def test_app_usage_near_limit_pauses_every_call(server: Script) -> None:
    clock = FakeClock()
    app = {"x-app-usage": json.dumps({"call_count": 97, "total_time": 10, "total_cputime": 5})}
    server.add(200, {"data": []}, app).add(200, {"data": []})
    client = graph(server, clock)
    client.usage_pause_s = 45.0
    client.campaigns("1")
    client.campaigns("2")
    assert clock.sleeps == [45.0]


def test_ad_account_usage_uses_reset_time(server: Script) -> None:
    clock = FakeClock()
    acc = {"x-ad-account-usage": json.dumps({"acc_id_util_pct": 96, "reset_time_duration": 42})}
    low = {"x-ad-account-usage": json.dumps({"acc_id_util_pct": 50, "reset_time_duration": 42})}
    server.add(200, {"data": []}, low).add(200, {"data": []}, acc).add(200, {"data": []})
    client = graph(server, clock)
    client.ads("5")
    client.ads("5")
    assert clock.sleeps == []
    client.ads("5")
    assert clock.sleeps == [42.0]  # min(reset_time_duration, usage_pause_s)


def test_ad_account_usage_does_not_wait_for_a_full_reset(server: Script) -> None:
    clock = FakeClock()
    acc = {"x-ad-account-usage": json.dumps({"acc_id_util_pct": 100, "reset_time_duration": 3000})}
    server.add(200, {"data": []}, acc).add(200, {"data": []})
    client = graph(server, clock)
    client.ads("5")
    client.ads("5")
    assert clock.sleeps == [client.usage_pause_s]


def test_learned_owner_scopes_updates(server: Script) -> None:
    clock = FakeClock()
    adsets = {"data": [{"id": "900", "campaign_id": "800", "account_id": "5", "daily_budget": "1"}]}
    server.add(200, adsets, _buc("5", 1)).add(200, {"success": True})
    client = graph(server, clock)
    client.adsets("5")
    client.update_adset("900", daily_budget=2000)  # knows 900 belongs to account 5
    assert clock.sleeps == [60.0]


# --------------------------------------------------------------------------- rate limiter
def test_sliding_window_limiter_never_exceeds_the_rate() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(5, 1.0, clock=clock, sleep=clock.sleep)
    times = []
    for i in range(23):
        if i % 7 == 0:
            clock.now += 0.05  # uneven arrivals
        limiter.acquire()
        times.append(clock.now)
    assert all(times[i + 5] - times[i] >= 1.0 - 1e-9 for i in range(len(times) - 5))
    assert sum(clock.sleeps) < 23 / 5 + 1  # and does not wait much more than needed


def test_limiter_counts_a_call_until_its_answer_arrives() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(2, 1.0, clock=clock, sleep=clock.sleep)
    start = clock.now
    with limiter.slot():
        clock.now += 0.9  # a slow call: the server may admit it as late as its answer
    limiter.acquire()
    limiter.acquire()  # third call: waits a full window after the slow call ended
    assert clock.now == pytest.approx(start + 1.9)


# --------------------------------------------------------------------------- HubSpot search
def _fake_search(deals: list[dict[str, Any]], cap: int) -> Callable[[dict[str, Any]], Answer]:
    """A tiny HubSpot deal search: GTE/LT on hs_lastmodifieddate, ascending, offset paging."""

    def respond(req: dict[str, Any]) -> Answer:
        body = req["body"]
        filters = body["filterGroups"][0]["filters"]
        rows = deals
        for f in filters:
            value = int(f["value"])
            if f["operator"] == "GTE":
                rows = [d for d in rows if d["ms"] >= value]
            elif f["operator"] == "LT":
                rows = [d for d in rows if d["ms"] < value]
        rows = sorted(rows, key=lambda d: (d["ms"], int(d["id"])))
        start, limit = int(body.get("after") or 0), int(body["limit"])
        if limit > 200 or start + limit > cap:
            error = {"status": "error", "message": "paging cap", "category": "VALIDATION"}
            return 400, error, {}, 0
        page = rows[start : start + limit]
        out: dict[str, Any] = {
            "total": len(rows),
            "results": [
                {
                    "id": d["id"],
                    "properties": {
                        "hs_lastmodifieddate": datetime.fromtimestamp(d["ms"] / 1000, UTC)
                        .isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z"),
                        "amount": "",
                        "dealstage": "11",
                    },
                    "archived": False,
                }
                for d in page
            ],
        }
        if start + limit < len(rows):
            out["paging"] = {"next": {"after": str(start + limit)}}
        return 200, out, {}, 0

    return respond


def test_search_moves_the_lower_bound_before_the_paging_cap(server: Script) -> None:
    clock = FakeClock()
    rng = random.Random(5)
    base = 1_790_000_000_000
    # 137 deals, many sharing timestamps so restarts land inside runs of equal values
    deals = [{"id": str(1000 + i), "ms": base + 1000 * rng.randrange(40)} for i in range(137)]
    server.responder = _fake_search(deals, cap=40)
    client = hubspot(server, clock)
    got = list(client.search_deals_modified(base, page_size=10, paging_cap=40))
    ids = [d["id"] for d in got]
    assert sorted(ids) == sorted(d["id"] for d in deals)
    assert len(ids) == len(set(ids))  # the overlap of each restart is de-duplicated
    stamps = [d["hs_lastmodifieddate"] for d in got]
    assert stamps == sorted(stamps)
    assert got[0]["amount"] is None  # empty string -> None
    assert all(int(r["body"].get("after") or 0) + 10 <= 40 for r in server.requests)
    # and the client paced itself: never more than 5 searches in any 1 s
    sent = [r.at for r in client.request_log]
    assert all(sent[i + 5] - sent[i] >= 1.0 for i in range(len(sent) - 5))


def test_search_window_upper_bound(server: Script) -> None:
    clock = FakeClock()
    base = 1_790_000_000_000
    deals = [{"id": str(i), "ms": base + 1000 * i} for i in range(30)]
    server.responder = _fake_search(deals, cap=10_000)
    client = hubspot(server, clock)
    got = list(client.search_deals_modified(base + 5000, base + 15000, page_size=4))
    assert [d["id"] for d in got] == [str(i) for i in range(5, 15)]
    filters = server.requests[0]["body"]["filterGroups"][0]["filters"]
    assert {f["operator"] for f in filters} == {"GTE", "LT"}


def test_search_too_many_equal_timestamps_is_a_clear_error(server: Script) -> None:
    clock = FakeClock()
    deals = [{"id": str(i), "ms": 1_790_000_000_000} for i in range(30)]
    server.responder = _fake_search(deals, cap=20)
    client = hubspot(server, clock)
    with pytest.raises(TransportError, match="share"):
        list(client.search_deals_modified(0, page_size=10, paging_cap=20))


def test_associations_and_contacts_are_chunked(server: Script) -> None:
    clock = FakeClock()

    def respond(req: dict[str, Any]) -> Answer:
        body = req["body"]
        if req["path"].endswith("/contacts/batch/read") and "properties" in body:
            results = [
                {"id": i["id"], "properties": {"email": f"{i['id']}@x.test"}}
                for i in body["inputs"]
                if i["id"] != "999"
            ]
            return 200, {"status": "COMPLETE", "results": results}, {}, 0
        results = []
        for item in body["inputs"]:
            deal = int(item["id"])
            if item.get("after"):  # second page of deal 7's contacts
                to = [{"toObjectId": 70_002, "associationTypes": []}]
                results.append({"from": {"id": str(deal)}, "to": to})
            elif deal % 3 == 0:
                continue  # no contacts
            else:
                res: dict[str, Any] = {
                    "from": {"id": str(deal)},
                    "to": [{"toObjectId": deal * 10_000 + 1, "associationTypes": []}],
                }
                if deal == 7:
                    res["paging"] = {"next": {"after": "abc"}}
                results.append(res)
        return 207, {"status": "COMPLETE", "results": results}, {}, 0

    server.responder = respond
    client = hubspot(server, clock)
    pairs = client.deal_contact_ids([str(i) for i in range(1, 251)])
    assert pairs.schema == {"deal_id": pl.Utf8, "contact_id": pl.Utf8}
    assert set(pairs.filter(pl.col("deal_id") == "7")["contact_id"]) == {"70001", "70002"}
    assert pairs.height == sum(1 for i in range(1, 251) if i % 3) + 1
    sizes = [len(r["body"]["inputs"]) for r in server.requests]
    assert sizes == [100, 1, 100, 50] and max(sizes) <= 100
    server.requests.clear()
    contacts = client.read_contacts([str(i) for i in range(150)] + ["999"])
    assert len(contacts) == 150 and contacts[0] == {
        "id": "0",
        "email": "0@x.test",
        "archived": False,
    }
    assert [len(r["body"]["inputs"]) for r in server.requests] == [100, 51]


# --------------------------------------------------------------------------- Graph reads
def test_insights_follow_after_cursor_only_while_next_exists(server: Script) -> None:
    clock = FakeClock()
    row = {
        "date_start": "2026-11-02",
        "date_stop": "2026-11-02",
        "account_id": "1",
        "campaign_id": "10",
        "adset_id": "100",
        "ad_id": "1000",
        "spend": "12.34",
        "impressions": "1500",
        "reach": "1200",
        "clicks": "30",
        "inline_link_clicks": "25",
        "ctr": "2.0",
        "actions": [
            {"action_type": "link_click", "value": "25"},
            {"action_type": "lead", "value": "3"},
        ],
        "account_currency": "USD",
    }
    page1 = {
        "data": [row],
        "paging": {"cursors": {"before": "A", "after": "B"}, "next": "http://x"},
    }
    row2 = {**row, "ad_id": "1001", "actions": None, "spend": "0"}
    page2 = {"data": [row2], "paging": {"cursors": {"before": "B", "after": "C"}}}
    server.add(200, page1).add(200, page2).add(200, {"data": [row]})
    client = graph(server, clock)
    frame = client.insights("act_1", date(2026, 11, 2), date(2026, 11, 3))
    assert client.request_count == 2
    assert server.requests[1]["query"]["after"] == "B"
    q = server.requests[0]["query"]
    assert q["level"] == "ad" and q["time_increment"] == "1"
    assert json.loads(q["time_range"]) == {"since": "2026-11-02", "until": "2026-11-03"}
    assert frame.schema["spend"] == pl.Float64 and frame.schema["impressions"] == pl.Int64
    assert frame.schema["date_start"] == pl.Date
    assert frame["leads"].to_list() == [3, 0]
    assert frame["spend"].to_list() == [12.34, 0.0]
    assert frame["ad_id"].to_list() == ["1000", "1001"]


def test_catalog_and_leads_are_typed(server: Script) -> None:
    clock = FakeClock()
    ad = {
        "id": "1000",
        "name": "ad",
        "adset_id": "100",
        "campaign_id": "10",
        "account_id": "1",
        "status": "ACTIVE",
        "effective_status": "ACTIVE",
        "created_time": "2026-11-01T00:00:00+0000",
        "creative": {"id": "c1", "title": "T", "body": "B", "call_to_action_type": "LEARN_MORE"},
    }
    lead = {
        "id": "123456789012345",
        "created_time": "2026-11-20T10:15:00+0000",
        "ad_id": "1000",
        "form_id": "f1",
        "field_data": [
            {"name": "email", "values": ["a@b.test"]},
            {"name": "full_name", "values": ["A B"]},
        ],
    }
    server.add(200, {"data": [ad]}).add(200, {"data": [lead]})
    client = graph(server, clock)
    ads = client.ads("1")
    assert ads["ad_id"].to_list() == ["1000"] and ads["creative_id"].to_list() == ["c1"]
    assert ads["creative_title"].to_list() == ["T"] and ads["name"].to_list() == ["ad"]
    assert ads["creative_call_to_action_type"].to_list() == ["LEARN_MORE"]
    assert ads.schema["created_time"] == pl.Datetime("us", "UTC")
    since = datetime(2026, 11, 19, tzinfo=UTC)
    leads = client.leads("f1", since=since)
    assert leads[0]["lead_id"] == "123456789012345"
    assert leads[0]["created_time"] == datetime(2026, 11, 20, 10, 15, tzinfo=UTC)
    assert leads[0]["fields"]["email"] == "a@b.test"
    filtering = json.loads(server.requests[1]["query"]["filtering"])
    assert filtering[0]["value"] == int(since.timestamp())
    with pytest.raises(ValueError):
        client.leads()


def test_update_validation_happens_before_any_call(server: Script) -> None:
    client = graph(server, FakeClock())
    with pytest.raises(ValueError):
        client.update_adset("1")
    with pytest.raises(ValueError):
        client.update_adset("1", daily_budget=12.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.update_ad("1", "RUNNING")
    assert client.request_count == 0


# --------------------------------------------------------------------------- batch
def _item(code: int, body: Any) -> dict[str, Any]:
    return {"code": code, "headers": [], "body": json.dumps(body)}


def test_batch_parses_each_item(server: Script) -> None:
    clock = FakeClock()
    answer = [
        _item(200, {"success": True}),
        _item(400, graph_error(100, 33)),
        None,
        _item(400, graph_error(613, 1487632)),
        _item(400, graph_error(17, 2446079)),
    ]
    server.add(200, answer)
    client = graph(server, clock)
    items = [BatchItem.update_adset(str(i), daily_budget=1000 + i) for i in range(5)]
    res = client.batch(items)
    assert [r.status for r in res] == ["ok", "error", "unfinished", "error", "error"]
    assert res[0].body == {"success": True}
    assert isinstance(res[1].error, GraphAPIError) and res[1].error.code == 100
    assert not res[1].retryable and res[2].retryable
    assert isinstance(res[3].error, BudgetEditLimitError) and not res[3].retryable
    assert res[4].retryable
    wire = json.loads(server.requests[0]["body"]["batch"])
    assert wire[0] == {"method": "POST", "relative_url": "0/", "body": "daily_budget=1000"}
    assert server.requests[0]["path"] == "/v24.0/"


def test_batch_refuses_more_than_50(server: Script) -> None:
    client = graph(server, FakeClock())
    with pytest.raises(TooManyItemsError):
        client.batch([BatchItem.update_ad(str(i), status="PAUSED") for i in range(51)])
    assert client.request_count == 0


def test_execute_batched_retries_unfinished_and_keeps_order(server: Script) -> None:
    clock = FakeClock()
    tries: dict[str, int] = {}

    def respond(req: dict[str, Any]) -> Answer:
        out = []
        for item in json.loads(req["body"]["batch"]):
            obj = item["relative_url"].split("/")[0]
            tries[obj] = tries.get(obj, 0) + 1
            n = int(obj)
            if n % 4 == 0 and tries[obj] == 1:
                out.append(None)  # unfinished the first time
            elif n % 9 == 0 and tries[obj] <= 2:
                out.append(_item(400, graph_error(80004, 2446079)))
            elif n == 13:
                out.append(_item(400, graph_error(613, 1487632)))
            else:
                out.append(_item(200, {"success": True, "id": obj}))
        return 200, out, {}, 0

    server.responder = respond
    client = graph(server, clock)
    items = [BatchItem.update_adset(str(i), daily_budget=500 + i) for i in range(120)]
    res = client.execute_batched(items)
    assert len(res) == 120
    assert [r.body["id"] for r in res if r.ok] == [str(i) for i in range(120) if i != 13]
    assert isinstance(res[13].error, BudgetEditLimitError) and tries["13"] == 1
    assert res[36].attempts == 3 and res[8].attempts == 2 and res[1].attempts == 1
    assert all(len(json.loads(r["body"]["batch"])) <= 50 for r in server.requests)
    assert client.request_count == len(server.requests)


def test_execute_batched_gives_up_with_unfinished_outcomes(server: Script) -> None:
    clock = FakeClock()
    server.responder = lambda req: (200, [None] * len(json.loads(req["body"]["batch"])), {}, 0)
    client = graph(server, clock, max_attempts=3)
    res = client.execute_batched([BatchItem.update_ad("1", status="PAUSED")] * 3)
    assert [r.status for r in res] == ["unfinished"] * 3 and res[0].attempts == 3
    assert client.request_count == 3


# --------------------------------------------------------------------------- CAPI
def test_capi_limits_and_rejection(server: Script) -> None:
    clock = FakeClock()
    client = CapiClient(TOKEN, base_url=server.base_url, **_kwargs(clock))
    event = {"event_name": "Lead", "event_time": 1, "action_source": "system_generated"}
    with pytest.raises(TooManyItemsError, match="1000"):
        client.send_events("42", [event] * 1001)
    assert client.request_count == 0
    assert client.send_events("42", [])["events_received"] == 0 and client.request_count == 0
    server.add(200, {"events_received": 2, "messages": [], "fbtrace_id": "T"})
    answer = client.send_events("42", [event, event], test_event_code="TEST1")
    assert answer["events_received"] == 2
    sent = server.requests[0]
    assert sent["path"] == "/v24.0/42/events" and sent["body"]["test_event_code"] == "TEST1"
    assert len(sent["body"]["data"]) == 2
    bad = graph_error(100, 2804003, message="Invalid parameter: event_time too old")
    server.add(400, bad)
    with pytest.raises(CapiRejectedError) as info:
        client.send_events("42", [event])
    assert info.value.fbtrace_id == "TRACE123" and info.value.subcode == 2804003
    assert "event_time" in info.value.message and client.request_count == 2
