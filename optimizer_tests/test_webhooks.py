"""HubSpot webhooks: signature v3 (published vectors, the official SDK), batch validation,
the landing table over real loopback HTTP, and the sandbox playing HubSpot's sender."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import polars as pl
import pytest
import requests

from optimizer_assets.domain import crm
from optimizer_assets.domain import webhooks as wh
from optimizer_assets.sandbox.webhook_sender import SenderConfig, WebhookSender, deal_change_events
from optimizer_assets.sandbox.world import World, WorldConfig
from optimizer_assets.warehouse import Warehouse
from optimizer_assets.webhooks.receiver import ReceiverServer, ReceiverSettings

SECRET = "rx-test-secret-9f3c1e77"  # distinctive, so a leak into logs is found by search
DOC_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"  # HubSpot's docs and SDK tests
DOC_URL = "https://www.example.com/webhook_uri"
DOC_V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)
NOW_MS = 1_795_000_000_000
T0 = 1_793_000_000_000  # occurredAt of the synthetic deal below


def _now_ms() -> int:
    return int(time.time() * 1000)


def _event(event_id: int, deal: int, at: int, name: str | None, value: str | None, **kw) -> dict:
    kind = wh.DEAL_CREATION if name is None else wh.DEAL_PROPERTY_CHANGE
    event = {
        "eventId": event_id,
        "subscriptionId": 7,
        "portalId": 62515,
        "appId": 54321,
        "occurredAt": at,
        "subscriptionType": kind,
        "attemptNumber": 0,
        "objectId": deal,
        "changeSource": "CRM",
    }
    if name is not None:
        event |= {"propertyName": name, "propertyValue": value}
    return event | kw


def _headers(body: bytes, uri: str, *, secret: str = SECRET, ts: int | None = None) -> dict:
    stamp = str(_now_ms() if ts is None else ts)
    return {
        "Content-Type": "application/json",
        wh.TIMESTAMP_HEADER: stamp,
        wh.SIGNATURE_HEADER: wh.sign_v3(secret, "POST", uri, body, stamp),
    }


DEAL_EVENTS = [
    _event(1, 900, T0, None, None),
    _event(2, 900, T0, "dealstage", "lead"),
    _event(3, 900, T0, "pipeline", "p1"),
    _event(4, 900, T0 + 60_000, "dealstage", "appointment"),
    _event(5, 900, T0 + 120_000, "dealstage", "showup"),
    _event(6, 900, T0 + 120_000, "amount", "1500.0"),
    _event(7, 900, T0 + 180_000, "dealstage", "won"),
    _event(8, 901, T0 + 30_000, None, None),
    _event(9, 901, T0 + 30_000, "dealstage", "lead"),
    _event(10, 901, T0 + 30_000, "pipeline", "p1"),
    _event(11, 901, T0 + 90_000, "dealstage", "lost"),
]


# ---- signature v3 ------------------------------------------------------------------------------
def test_official_python_sdk_v3_vector_verifies() -> None:
    """hubspot-api-python's published v3 test vector (tests/spec/utils/test_signature.py)."""
    body = b"{'example_field':'example_value'}"
    expected = "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
    assert wh.sign_v3(DOC_SECRET, "POST", DOC_URL, body, "15000000") == expected
    wh.verify_signature_v3(
        client_secret=DOC_SECRET,
        method="POST",
        uri=DOC_URL,
        body=body,
        timestamp_ms="15000000",
        signature=expected,
        now_ms=15_000_000 + 1_000,
    )


@pytest.mark.parametrize(
    ("method", "body", "published"),
    [  # HubSpot's docs, "Validate requests using the v2 request signature" (GET and POST)
        ("GET", b"", "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"),
        (
            "POST",
            b'{"example_field":"example_value"}',
            "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900",
        ),
    ],
)
def test_signed_text_follows_hubspots_published_order(method, body, published) -> None:
    """v3 signs v2's method + uri + body (then the timestamp): the published v2 values pin the
    order and encoding of our source bytes."""
    source = wh.signing_source(method, DOC_URL, body, "")
    assert hashlib.sha256(DOC_SECRET.encode() + source).hexdigest() == published


@pytest.mark.parametrize(
    ("uri", "body"),
    [
        (DOC_URL, DOC_V1_BODY),
        (DOC_URL, b'{"example_field":"example_value"}'),
        ("https://hooks.example.com/webhooks/hubspot?portal=62515", DOC_V1_BODY),
        ("https://hooks.example.com/webhooks/hubspot", '[{"v":"Yllä ő"}]'.encode()),
    ],
)
def test_agrees_with_official_sdk_on_fresh_requests(uri: str, body: bytes) -> None:
    from hubspot.utils.signature import Signature

    stamp = str(_now_ms())
    ours = wh.sign_v3(DOC_SECRET, "POST", uri, body, stamp)
    sdk = Signature.get_signature(DOC_SECRET, body.decode(), "v3", uri, "POST", stamp)
    assert ours == sdk
    assert Signature.is_valid(
        ours, DOC_SECRET, body.decode(), uri, "POST", signature_version="v3", timestamp=stamp
    )
    wh.verify_signature_v3(
        client_secret=DOC_SECRET,
        method="POST",
        uri=uri,
        body=body,
        timestamp_ms=stamp,
        signature=ours,
        now_ms=int(stamp) + 2_000,
    )


def _verify(ts: int, now: int, **overrides) -> None:
    args = {"method": "POST", "uri": DOC_URL, "body": DOC_V1_BODY}
    signature = wh.sign_v3(SECRET, args["method"], args["uri"], args["body"], str(ts))
    args |= {"timestamp_ms": str(ts), "signature": signature} | overrides
    wh.verify_signature_v3(client_secret=SECRET, now_ms=now, **args)


@pytest.mark.parametrize(
    ("offset_ms", "accepted"),
    [(-300_000, True), (-300_001, False), (300_000, True), (300_001, False), (0, True)],
)
def test_timestamp_window_is_five_minutes_either_way(offset_ms: int, accepted: bool) -> None:
    if accepted:
        _verify(NOW_MS + offset_ms, NOW_MS)
    else:
        with pytest.raises(wh.StaleTimestamp):
            _verify(NOW_MS + offset_ms, NOW_MS)


def test_stricter_than_sdk_on_future_timestamps_and_equal_on_old_ones() -> None:
    from hubspot.exceptions import InvalidSignatureTimestampError
    from hubspot.utils.signature import Signature

    def sdk_valid(ts: int) -> bool:
        sig = wh.sign_v3(DOC_SECRET, "POST", DOC_URL, DOC_V1_BODY, str(ts))
        return Signature.is_valid(
            sig, DOC_SECRET, DOC_V1_BODY.decode(), DOC_URL, "POST", "v3", str(ts)
        )

    future = _now_ms() + 3_600_000
    assert sdk_valid(future)  # the SDK accepts a timestamp an hour ahead ...
    with pytest.raises(wh.StaleTimestamp, match="future"):  # ... we do not
        _verify(future, _now_ms())
    old = _now_ms() - 400_000
    with pytest.raises(InvalidSignatureTimestampError):
        sdk_valid(old)
    with pytest.raises(wh.StaleTimestamp, match="old"):
        _verify(old, _now_ms())


@pytest.mark.parametrize(
    "tamper",
    [
        {"body": DOC_V1_BODY.replace(b'"objectId":123', b'"objectId":124')},
        {"uri": "https://www.example.com/webhook_uri2"},
        {"uri": "http://www.example.com/webhook_uri"},
        {"method": "PUT"},
        {"timestamp_ms": str(NOW_MS - 1)},
        {"signature": base64.b64encode(b"\0" * 32).decode()},
        {"signature": "not base64 at all ✓"},
    ],
)
def test_any_tampering_is_a_bad_signature(tamper: dict) -> None:
    with pytest.raises(wh.BadSignature):
        _verify(NOW_MS, NOW_MS, **tamper)


def test_missing_headers_are_rejected() -> None:
    with pytest.raises(wh.BadSignature, match="missing"):
        _verify(NOW_MS, NOW_MS, signature=None)
    for stamp in (None, "", "12.5", "abc", "-5"):
        with pytest.raises(wh.StaleTimestamp, match="malformed"):
            _verify(NOW_MS, NOW_MS, timestamp_ms=stamp)


def test_rejections_reveal_neither_secret_nor_expected_signature() -> None:
    expected = wh.sign_v3(SECRET, "POST", DOC_URL, DOC_V1_BODY, str(NOW_MS))
    with pytest.raises(wh.BadSignature) as info:
        _verify(NOW_MS, NOW_MS, signature="x" * 44)
    text = f"{info.value!s} {info.value!r} {info.value.reason}"
    assert SECRET not in text and expected not in text


def test_uri_escapes_are_decoded_as_hubspot_documents() -> None:
    signed_as = "https://hooks.example.com/webhooks/hubspot?next=/a:b@c"
    received = "https://hooks.example.com/webhooks/hubspot?next=%2Fa%3Ab%40c"
    assert wh.canonical_uri(received) == signed_as
    stamp = str(NOW_MS)
    sig = wh.sign_v3(SECRET, "POST", signed_as, DOC_V1_BODY, stamp)
    _verify(NOW_MS, NOW_MS, uri=received, signature=sig, timestamp_ms=stamp)
    assert wh.canonical_uri("https://x/y?a=%20b%2Bc") == "https://x/y?a=%20b%2Bc"  # others kept


# ---- batch shape -------------------------------------------------------------------------------
def test_parse_batch_accepts_hubspot_events_and_drops_unknown_fields() -> None:
    [creation] = wh.parse_batch(DOC_V1_BODY)
    assert creation["objectId"] == "123" and creation["propertyName"] is None
    assert "changeFlag" not in creation
    events = wh.parse_batch(json.dumps(DEAL_EVENTS).encode())
    assert [e["eventId"] for e in events] == list(range(1, 12))
    assert events[5]["propertyValue"] == "1500.0"


def _replace(i: int, **fields) -> bytes:
    events = [dict(e) for e in DEAL_EVENTS]
    events[i].update(fields)
    for key, value in fields.items():
        if value is ...:
            del events[i][key]
    return json.dumps(events).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[{", "not valid JSON"),
        (b"\xff\xfe[]", "not UTF-8"),
        (b'{"eventId": 1}', "JSON array"),
        (b"[NaN]", "not valid JSON"),
        (json.dumps([DEAL_EVENTS[1]] * 101).encode(), "at most 100"),
        (b"[1]", "not a JSON object"),
        (_replace(1, eventId=...), "missing eventId"),
        (_replace(1, eventId=True), "eventId must be"),
        (_replace(1, occurredAt="1793000000000"), "occurredAt must be"),
        (_replace(1, occurredAt=10**15), "epoch milliseconds"),
        (_replace(1, attemptNumber=-1), "attemptNumber must be"),
        (_replace(1, eventId=2**64), "64-bit"),
        (_replace(1, subscriptionType="dealstage changed"), "subscriptionType"),
        (_replace(1, objectId="12a"), "objectId"),
        (_replace(1, propertyName=...), "needs a propertyName"),
        (_replace(1, propertyValue={"a": 1}), "propertyValue must be"),
    ],
)
def test_parse_batch_rejects_with_a_clear_reason(body: bytes, reason: str) -> None:
    with pytest.raises(wh.MalformedBatch, match=reason):
        wh.parse_batch(body)


# ---- landing frames ----------------------------------------------------------------------------
def _landing(deliveries: list[list[dict]]) -> pl.DataFrame:
    """What the landing table holds after these deliveries (append_new on event_key)."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    frames = [
        wh.events_frame(wh.parse_batch(json.dumps(batch).encode()), start + timedelta(seconds=i))
        for i, batch in enumerate(deliveries)
    ]
    return pl.concat(frames).unique("event_key", keep="first", maintain_order=True)


def test_event_key_is_stable_across_retries_and_distinct_across_events() -> None:
    first = _landing([DEAL_EVENTS])
    retry = _landing([[e | {"attemptNumber": 3} for e in DEAL_EVENTS]])
    assert first["event_key"].to_list() == retry["event_key"].to_list()
    assert first["event_key"].n_unique() == len(DEAL_EVENTS)
    same_id_other_deal = _landing([[DEAL_EVENTS[1], DEAL_EVENTS[1] | {"objectId": 999}]])
    assert same_id_other_deal.height == 2  # eventId alone is not HubSpot-unique


def test_raw_identity_property_values_are_not_stored() -> None:
    contact = _event(
        50, 77, T0, "email", "jane@example.com", subscriptionType="contact.propertyChange"
    )
    frame = _landing([[contact, DEAL_EVENTS[1]]])
    assert frame["value_redacted"].to_list() == [True, False]
    assert "jane@example.com" not in frame.write_csv()


def _shuffled_deliveries(events: list[dict], seed: int) -> list[list[dict]]:
    """Events duplicated (retry-style), shuffled and cut into random batches."""
    rng = np.random.default_rng(seed)
    pool = list(events) + [
        e | {"attemptNumber": int(rng.integers(1, 10))} for e in events if rng.random() < 0.5
    ]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    cuts = sorted(rng.choice(np.arange(1, len(pool)), size=3, replace=False).tolist())
    return [pool[a:b] for a, b in zip([0, *cuts], [*cuts, len(pool)], strict=True)]


def test_replayed_and_shuffled_deliveries_give_each_stage_event_once() -> None:
    in_order = crm.stage_events(wh.webhook_snapshots(_landing([DEAL_EVENTS]), {"p1": "acc1"}))
    assert in_order["to_stage"].to_list() == [
        "lead",
        "appointment",
        "showup",
        "won",
        "lead",
        "lost",
    ]
    assert in_order["account_id"].to_list() == ["acc1"] * 6
    assert in_order.filter(pl.col("to_stage") == "won")["amount"].item() == 1500.0
    for seed in range(12):
        landing = _landing(_shuffled_deliveries(DEAL_EVENTS, seed))
        assert landing.height == len(DEAL_EVENTS)
        events = crm.stage_events(wh.webhook_snapshots(landing, {"p1": "acc1"}))
        assert events.sort("event_key").equals(in_order.sort("event_key"))
        latest = wh.deal_changes(landing).select("deal_id", "dealstage").sort("deal_id")
        assert latest.rows() == [("900", "won"), ("901", "lost")]


def test_webhook_states_and_search_states_share_stage_event_keys() -> None:
    """A state seen by webhooks and by the deal search (hs_lastmodifieddate = the change) yields
    the same stage event key, so both sources can feed hubspot_deal_snapshots."""
    search = crm.deals_frame(
        [
            {
                "id": "900",
                "properties": {
                    "pipeline": "p1",
                    "dealstage": "appointment",
                    "amount": "",
                    "createdate": str(T0),
                    "closedate": "",
                    "hs_lastmodifieddate": str(T0 + 60_000),
                },
            }
        ],
        {"p1": "acc1"},
    )
    webhook = wh.webhook_snapshots(_landing([DEAL_EVENTS[:3]]), {"p1": "acc1"})
    both = crm.stage_events(pl.concat([webhook, search]))
    alone = crm.stage_events(wh.webhook_snapshots(_landing([DEAL_EVENTS[:4]]), {"p1": "acc1"}))
    assert both.select("event_key", "to_stage").equals(alone.select("event_key", "to_stage"))


# ---- the receiver over loopback HTTP -----------------------------------------------------------
@pytest.fixture
def receiver(tmp_path):
    settings = ReceiverSettings(client_secret=SECRET, warehouse_path=str(tmp_path / "wh.duckdb"))
    with ReceiverServer(settings) as server:
        yield server


def _stored(server: ReceiverServer) -> pl.DataFrame:
    return Warehouse(server.settings.warehouse_path).read(wh.LANDING_TABLE)


def test_valid_batch_is_stored_before_the_2xx(receiver) -> None:
    body = json.dumps(DEAL_EVENTS).encode()
    response = requests.post(receiver.url, data=body, headers=_headers(body, receiver.url))
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "message": "stored", "received": 11, "stored": 11}
    rows = _stored(receiver)  # read right after the answer: already committed
    assert rows.height == 11 and set(rows.columns) == set(wh.LANDING_SCHEMA)
    assert rows.schema["occurred_at"] == pl.Datetime("us", "UTC")
    assert requests.get(receiver.base_url + "/healthz").json()["status"] == "ok"


def _oversized_stream(size: int):
    chunk = b" " * 65536
    for _ in range(size // len(chunk) + 1):
        yield chunk


@pytest.mark.parametrize(
    "case", ["bad_signature", "stale", "future", "malformed", "wrong_shape", "big", "big_stream"]
)
def test_rejected_deliveries_store_nothing(receiver, case: str) -> None:
    body = json.dumps(DEAL_EVENTS).encode()
    headers = _headers(body, receiver.url)
    expected = {"bad_signature": 401, "stale": 401, "future": 401, "malformed": 400}
    if case == "bad_signature":
        headers = _headers(body, receiver.url, secret="someone-else")
    elif case == "stale":
        headers = _headers(body, receiver.url, ts=_now_ms() - 301_000)
    elif case == "future":
        headers = _headers(body, receiver.url, ts=_now_ms() + 301_000)
    elif case == "malformed":
        body = body[:-1]
        headers = _headers(body, receiver.url)
    elif case == "wrong_shape":
        body = json.dumps({"events": DEAL_EVENTS}).encode()
        headers = _headers(body, receiver.url)
        expected[case] = 400
    elif case == "big":
        body = b"[" + b" " * (1 << 20) + b"]"
        headers = _headers(body, receiver.url)
        expected[case] = 413
    if case == "big_stream":  # chunked, no Content-Length: refused while reading
        response = requests.post(receiver.url, data=_oversized_stream(1 << 20), headers=headers)
        assert response.status_code == 413
    else:
        response = requests.post(receiver.url, data=body, headers=headers)
        assert response.status_code == expected[case], response.text
    assert _stored(receiver).is_empty()


def test_public_url_behind_a_proxy(tmp_path) -> None:
    public = "https://hooks.example.com/optimizer"
    settings = ReceiverSettings(
        client_secret=SECRET, warehouse_path=str(tmp_path / "wh.duckdb"), public_base_url=public
    )
    body = json.dumps(DEAL_EVENTS[:3]).encode()
    with ReceiverServer(settings) as server:
        as_seen_locally = requests.post(server.url, data=body, headers=_headers(body, server.url))
        assert as_seen_locally.status_code == 401
        signed = f"{public}/webhooks/hubspot?portalId=62515"
        response = requests.post(
            server.url + "?portalId=62515", data=body, headers=_headers(body, signed)
        )
        assert response.status_code == 200
        assert _stored(server).height == 3


def test_replayed_delivery_adds_nothing(receiver) -> None:
    body = json.dumps(DEAL_EVENTS).encode()
    first = requests.post(receiver.url, data=body, headers=_headers(body, receiver.url))
    retry_body = json.dumps([e | {"attemptNumber": 1} for e in DEAL_EVENTS]).encode()
    retry = requests.post(receiver.url, data=retry_body, headers=_headers(retry_body, receiver.url))
    assert (first.json()["stored"], retry.status_code, retry.json()["stored"]) == (11, 200, 0)
    stored = _stored(receiver)
    assert stored.height == 11 and stored["attempt_number"].max() == 0


def test_locked_warehouse_answers_503_then_stores_on_retry(tmp_path) -> None:
    path = tmp_path / "wh.duckdb"
    settings = ReceiverSettings(
        client_secret=SECRET, warehouse_path=str(path), store_timeout_seconds=0.3
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.readline()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        body = json.dumps(DEAL_EVENTS).encode()
        with ReceiverServer(settings) as server:
            busy = requests.post(server.url, data=body, headers=_headers(body, server.url))
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            holder.communicate("release\n", timeout=10)
            again = requests.post(server.url, data=body, headers=_headers(body, server.url))
            assert again.status_code == 200 and again.json()["stored"] == 11
            assert server.receiver.counts["store_retries"] > 0
    finally:
        holder.kill()
        holder.wait()


def test_unwritable_warehouse_never_answers_2xx(tmp_path) -> None:
    (tmp_path / "a_directory").mkdir()
    settings = ReceiverSettings(
        client_secret=SECRET,
        warehouse_path=str(tmp_path / "a_directory"),
        store_timeout_seconds=0.2,
    )
    body = json.dumps(DEAL_EVENTS).encode()
    with ReceiverServer(settings) as server:
        response = requests.post(server.url, data=body, headers=_headers(body, server.url))
    assert response.status_code >= 500


def test_secret_never_in_logs_or_answers(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ReceiverSettings(client_secret=SECRET, warehouse_path=str(tmp_path / "wh.duckdb"))
    assert SECRET not in repr(settings)
    body = json.dumps(DEAL_EVENTS).encode()
    texts = []
    with ReceiverServer(settings) as server:
        for headers, data in [
            (_headers(body, server.url), body),
            (_headers(body, server.url, secret="wrong"), body),
            (_headers(body, server.url, ts=1), body),
            (_headers(b"[x", server.url), b"[x"),
            ({}, body),
        ]:
            texts.append(requests.post(server.url, data=data, headers=headers).text)
        world = World(WorldConfig(seed=5, accounts=1, ads_per_account=6))
        sender = WebhookSender(world, server.url, SECRET, since=world.config.start)
        world.advance(48)
        sender.deliver_pending(flush=True)
        assert SECRET not in repr(sender)
    assert any("rejected" in r.getMessage() for r in caplog.records)  # logging was captured
    assert SECRET not in caplog.text
    assert all(SECRET not in text for text in texts)


# ---- the sandbox as HubSpot's sender -----------------------------------------------------------
def _truth_stage_events(world: World, pipelines: dict[str, str]) -> pl.DataFrame:
    """Stage events derived from the world's own stage history (the order things happened)."""
    deals = world.deals().select("deal_id", "pipeline", "createdate")
    snaps = (
        world.deal_stage_history()
        .join(deals, on="deal_id")
        .select(
            "deal_id",
            "pipeline",
            "dealstage",
            amount=pl.lit(None, pl.Float64),
            created_at="createdate",
            closed_at=pl.lit(None, crm.UTC_US),
            updated_at="occurred_at",
            account_id=pl.col("pipeline").replace_strict(pipelines, default=None),
        )
    )
    return crm.stage_events(snaps)


def test_sandbox_sender_end_to_end_into_the_receiver(tmp_path) -> None:
    world = World(WorldConfig(seed=11, accounts=2, ads_per_account=8))
    world.advance(24)
    pipelines = dict(world.accounts().select("hubspot_pipeline_id", "account_id").iter_rows())
    settings = ReceiverSettings(client_secret=SECRET, warehouse_path=str(tmp_path / "wh.duckdb"))
    config = SenderConfig(duplicate_share=0.3, reorder_share=0.3, seed=4, interval_seconds=0.02)
    with ReceiverServer(settings) as server:
        sender = WebhookSender(world, server.url, SECRET, config=config, since=world.config.start)
        sender.start()
        for _ in range(5):  # the world moves while the sender polls it
            with sender.lock:
                world.advance(24)
            time.sleep(0.05)
        sender.stop(flush=True)
        counts = server.receiver.counts
    landing = Warehouse(settings.warehouse_path).read(wh.LANDING_TABLE)
    assert sender.stats["duplicated"] > 0 and sender.stats["held_back"] > 0
    assert sender.stats["failed_batches"] == 0 and not sender.dropped
    assert counts["events_received"] > counts["events_stored"] == landing.height
    assert landing["event_key"].n_unique() == landing.height
    assert landing["portal_id"].unique().to_list() == [62515]

    snapshots = wh.webhook_snapshots(landing, pipelines)
    received = crm.stage_events(snapshots)
    truth = _truth_stage_events(world, pipelines)
    assert received.height == truth.height == world.deal_stage_history().height
    assert received["event_key"].sort().equals(truth["event_key"].sort())
    assert received["account_id"].null_count() == 0
    amounts = snapshots.group_by("deal_id").agg(pl.col("amount").max())
    expected = world.deals().filter(pl.col("amount").is_not_null()).select("deal_id", "amount")
    assert expected.height > 0
    assert (
        expected.join(amounts, on="deal_id", suffix="_hook")
        .filter(pl.col("amount") != pl.col("amount_hook"))
        .is_empty()
    )
    latest = wh.deal_changes(landing).join(world.deals(), on="deal_id")
    assert (latest["dealstage"] == latest["dealstage_right"]).all()


def test_sender_events_are_a_function_of_the_window() -> None:
    world = World(WorldConfig(seed=11, accounts=2, ads_per_account=12))
    world.advance(120)
    history, deals = world.deal_stage_history(), world.deals()
    mid = world.config.start + timedelta(hours=50)
    ids = dict(portal_id=1, app_id=2)
    whole = deal_change_events(history, deals, None, world.now, **ids)
    split = deal_change_events(history, deals, None, mid, **ids) + deal_change_events(
        history, deals, mid, world.now, **ids
    )
    assert sorted(e["eventId"] for e in whole) == sorted(e["eventId"] for e in split)
    assert len({e["eventId"] for e in whole}) == len(whole) > 0
    assert {e["subscriptionType"] for e in whole} == {wh.DEAL_CREATION, wh.DEAL_PROPERTY_CHANGE}
    assert {e.get("propertyName") for e in whole} == {None, "dealstage", "pipeline", "amount"}
    wh.parse_batch(json.dumps(whole[:99]).encode())  # HubSpot's shape, as the receiver checks it


class _Stub(BaseHTTPRequestHandler):
    """Answers POSTs from a script: an int status, or "slow" (sleep, then 200)."""

    script: list = []
    seen: list = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((dict(self.headers), body))
        step = type(self).script.pop(0) if type(self).script else 200
        if step == "slow":
            time.sleep(0.6)
            step = 200
        self.send_response(step)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub():
    _Stub.script, _Stub.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/webhooks/hubspot"
    server.shutdown()
    server.server_close()


def test_sender_retries_non_2xx_and_slow_answers_with_fresh_signatures(stub) -> None:
    _, url = stub
    _Stub.script = [500, "slow", 429, 204]
    world = World(WorldConfig(seed=3, accounts=1, ads_per_account=6))
    config = SenderConfig(timeout_seconds=0.3, backoff_seconds=0.01, max_batch=99)
    sender = WebhookSender(world, url, SECRET, config=config)
    world.advance(24)
    result = sender.deliver_pending()
    first_batch = _Stub.seen[:4]
    assert result["attempts"] >= 4 and result["failed_batches"] == 0
    attempts = [json.loads(body)[0]["attemptNumber"] for _, body in first_batch]
    assert attempts == [0, 1, 2, 3]
    for headers, body in first_batch:  # every attempt is signed anew and verifies
        wh.verify_signature_v3(
            client_secret=SECRET,
            method="POST",
            uri=url,
            body=body,
            timestamp_ms=headers[wh.TIMESTAMP_HEADER],
            signature=headers[wh.SIGNATURE_HEADER],
            now_ms=_now_ms(),
        )
    assert sender.stats["transport_errors"] == 1  # the slow answer counted as a failure


def test_sender_gives_up_after_ten_attempts_like_hubspot(receiver) -> None:
    world = World(WorldConfig(seed=3, accounts=1, ads_per_account=6))
    config = SenderConfig(backoff_seconds=0.001, max_backoff_seconds=0.005)
    sender = WebhookSender(world, receiver.url, "not-the-secret", config=config)
    world.advance(24)
    result = sender.deliver_pending()
    assert result["batches"] > 0
    assert result["attempts"] == 10 * result["batches"] == 10 * result["failed_batches"]
    assert len(sender.dropped) == result["events"]
    assert sender.stats["status_401"] == result["attempts"]
    assert _stored(receiver).is_empty()
