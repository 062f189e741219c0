"""HubSpot webhooks: signature v3, batch validation, and the landing-table frames (pure).

Wire contract: ../shared/CONTRACTS.md section 3. A delivery is a JSON array of events
``{eventId, subscriptionId, portalId, appId, occurredAt (ms), subscriptionType, objectId,
propertyName, propertyValue, changeSource, attemptNumber}``, signed with
``X-HubSpot-Signature-v3 = base64(HMAC-SHA256(client_secret, method + uri + body + timestamp))``.

Where we differ from the official Python SDK (``hubspot.utils.signature.Signature.is_valid``):
- a timestamp more than 5 minutes in the FUTURE is rejected too (the SDK accepts any future
  timestamp); the age limit is inclusive at exactly 5 minutes and counted in milliseconds (the
  SDK floors the timestamp to seconds and accepts strictly less than 300 s);
- the URI is canonicalized as HubSpot's docs ask (the escapes in ``URI_ESCAPES`` decoded) before
  hashing (the SDK hashes the URI as given; both agree on URIs without those escapes);
- the body is hashed as the raw bytes received (the SDK takes a ``str``; same bytes for UTF-8).

Deliveries are at-least-once and unordered. ``event_key`` identifies an event across retries:
HubSpot keeps ``eventId`` on every retry but documents it as not guaranteed unique, so the key
hashes it together with the portal, app, subscription, object, property and ``occurredAt``
(``attemptNumber`` and ``propertyValue`` are left out: a retry changes the first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import polars as pl

from optimizer_assets.domain.capi import sha256_hex_series
from optimizer_assets.domain.crm import DEAL_SCHEMA, UTC_US

SIGNATURE_HEADER = "X-HubSpot-Signature-v3"
TIMESTAMP_HEADER = "X-HubSpot-Request-Timestamp"
MAX_SKEW_MS = 300_000  # 5 minutes, either way
MAX_EVENTS = 100  # HubSpot sends at most 100 events per request
LANDING_TABLE = "hubspot_webhook_events"
DEAL_CREATION = "deal.creation"
DEAL_PROPERTY_CHANGE = "deal.propertyChange"
STAGE_PROPERTY = "dealstage"

# HubSpot's docs: decode these escapes in the request URI before hashing (v3 only)
URI_ESCAPES = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_ESCAPE_RE = re.compile("|".join(URI_ESCAPES), re.IGNORECASE)
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,16}$")
_SUBSCRIPTION_RE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_]+$")
_INT64_END = 2**63
_MAX_OCCURRED_MS = 10**14  # ~ year 5138: anything larger is not epoch milliseconds

# Contact properties holding raw identities: never stored (CONVENTIONS: hash at ingestion; the
# optimizer subscribes to deal properties only, so these would only come from a misconfiguration).
PII_PROPERTIES = frozenset(
    {
        "email",
        "hs_additional_emails",
        "phone",
        "mobilephone",
        "hs_whatsapp_phone_number",
        "fax",
        "firstname",
        "lastname",
        "address",
        "date_of_birth",
    }
)

LANDING_SCHEMA: dict[str, pl.DataType] = {
    "event_key": pl.Utf8(),  # 32-hex, identical for every delivery of one event
    "event_id": pl.Int64(),
    "subscription_id": pl.Int64(),
    "portal_id": pl.Int64(),
    "app_id": pl.Int64(),
    "subscription_type": pl.Utf8(),  # e.g. deal.propertyChange, deal.creation
    "object_id": pl.Utf8(),  # the deal id for deal.* events
    "property_name": pl.Utf8(),  # null for creation/deletion events
    "property_value": pl.Utf8(),  # as HubSpot sent it (a string); null when cleared or redacted
    "value_redacted": pl.Boolean(),  # True: a raw-identity property, value not stored
    "change_source": pl.Utf8(),
    "attempt_number": pl.Int64(),  # of the delivery that stored the row first
    "occurred_at": UTC_US,  # occurredAt (ms precision)
    "received_at": UTC_US,  # when the receiver stored it (monotonic per receiver process)
    "delivery_id": pl.Utf8(),  # one id per accepted HTTP request
}


class WebhookRejected(ValueError):
    """A delivery that must not be stored; ``reason`` is safe to log and to answer with."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadSignature(WebhookRejected):
    """Missing or wrong ``X-HubSpot-Signature-v3`` (answer 401)."""


class StaleTimestamp(WebhookRejected):
    """Missing, malformed, too old or too far in the future ``X-HubSpot-Request-Timestamp``."""


class MalformedBatch(WebhookRejected):
    """The body is not a JSON array of HubSpot events (answer 400)."""


# ---- signature v3 ------------------------------------------------------------------------------
def canonical_uri(uri: str) -> str:
    """The URI as HubSpot hashes it: the escapes of ``URI_ESCAPES`` decoded, nothing else."""
    return _ESCAPE_RE.sub(lambda m: URI_ESCAPES[m.group(0).upper()], uri)


def signing_source(method: str, uri: str, body: bytes, timestamp_ms: str) -> bytes:
    """The bytes HubSpot signs: method + canonical URI + raw body + timestamp (UTF-8)."""
    return method.upper().encode() + canonical_uri(uri).encode() + body + str(timestamp_ms).encode()


def sign_v3(client_secret: str, method: str, uri: str, body: bytes, timestamp_ms: str) -> str:
    """``X-HubSpot-Signature-v3`` for a request (what HubSpot, or the sandbox, sends)."""
    source = signing_source(method, uri, body, timestamp_ms)
    digest = hmac.new(client_secret.encode(), source, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verify_signature_v3(
    *,
    client_secret: str,
    method: str,
    uri: str,
    body: bytes,
    timestamp_ms: str | None,
    signature: str | None,
    now_ms: int,
    max_skew_ms: int = MAX_SKEW_MS,
) -> None:
    """Return if the request is HubSpot's and fresh; raise ``StaleTimestamp`` or ``BadSignature``.

    The timestamp must be epoch milliseconds no more than ``max_skew_ms`` before or after
    ``now_ms``; the signature is compared in constant time. Error messages never carry the
    secret or the expected signature (which would let a caller forge this exact request).
    """
    if not client_secret:
        raise ValueError("no HubSpot client secret configured")
    if not timestamp_ms or not _TIMESTAMP_RE.match(timestamp_ms):
        raise StaleTimestamp(f"missing or malformed {TIMESTAMP_HEADER}")
    skew = now_ms - int(timestamp_ms)
    if skew > max_skew_ms:
        raise StaleTimestamp("request timestamp is more than 5 minutes old")
    if -skew > max_skew_ms:
        raise StaleTimestamp("request timestamp is more than 5 minutes in the future")
    if not signature:
        raise BadSignature(f"missing {SIGNATURE_HEADER}")
    expected = sign_v3(client_secret, method, uri, body, timestamp_ms)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise BadSignature("signature does not match")


# ---- batch shape -------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _event(i: int, raw: Any) -> dict[str, Any]:
    """One validated event with every known field (absent optional ones as None)."""
    if not isinstance(raw, dict):
        raise MalformedBatch(f"event {i} is not a JSON object")
    for name in ("eventId", "subscriptionId", "portalId", "appId", "occurredAt", "attemptNumber"):
        if name not in raw:
            raise MalformedBatch(f"event {i}: missing {name}")
        if not _is_int(raw[name]) or not 0 <= raw[name] < _INT64_END:
            raise MalformedBatch(f"event {i}: {name} must be a non-negative 64-bit integer")
    if not 0 < raw["occurredAt"] < _MAX_OCCURRED_MS:
        raise MalformedBatch(f"event {i}: occurredAt must be epoch milliseconds")
    kind = raw.get("subscriptionType")
    if not isinstance(kind, str) or not _SUBSCRIPTION_RE.match(kind):
        raise MalformedBatch(f"event {i}: subscriptionType must look like 'deal.propertyChange'")
    object_id = raw.get("objectId")
    if _is_int(object_id) and 0 <= object_id < _INT64_END:
        object_id = str(object_id)
    elif not (isinstance(object_id, str) and object_id.isdigit()):
        raise MalformedBatch(f"event {i}: objectId must be a non-negative integer")
    name = raw.get("propertyName")
    if kind.endswith(".propertyChange") and not (isinstance(name, str) and name):
        raise MalformedBatch(f"event {i}: {kind} needs a propertyName")
    if name is not None and not isinstance(name, str):
        raise MalformedBatch(f"event {i}: propertyName must be a string")
    value = raw.get("propertyValue")
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int | float):
        value = str(value)
    elif value is not None and not isinstance(value, str):
        raise MalformedBatch(f"event {i}: propertyValue must be a string")
    source = raw.get("changeSource")
    if source is not None and not isinstance(source, str):
        raise MalformedBatch(f"event {i}: changeSource must be a string")
    return {
        "eventId": raw["eventId"],
        "subscriptionId": raw["subscriptionId"],
        "portalId": raw["portalId"],
        "appId": raw["appId"],
        "occurredAt": raw["occurredAt"],
        "subscriptionType": kind,
        "objectId": object_id,
        "propertyName": name,
        "propertyValue": value,
        "changeSource": source,
        "attemptNumber": raw["attemptNumber"],
    }


def parse_batch(body: bytes, max_events: int = MAX_EVENTS) -> list[dict[str, Any]]:
    """The validated events of one delivery (objectId as a digit string, values as strings).

    Raises ``MalformedBatch`` naming the first problem: not UTF-8 JSON, not an array, more than
    ``max_events`` events, or an event missing a field or carrying one of the wrong type.
    Unknown extra fields (``changeFlag``, ``sourceId``, ...) are accepted and dropped.
    """
    try:
        decoded = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MalformedBatch("body is not UTF-8") from exc
    except ValueError as exc:  # json.JSONDecodeError included; its message has no body text
        raise MalformedBatch(f"body is not valid JSON ({exc})") from exc
    if not isinstance(decoded, list):
        raise MalformedBatch("body must be a JSON array of events")
    if len(decoded) > max_events:
        raise MalformedBatch(f"{len(decoded)} events in one request; at most {max_events}")
    return [_event(i, raw) for i, raw in enumerate(decoded)]


# ---- landing table -----------------------------------------------------------------------------
def _ms_to_datetime(column: str) -> pl.Expr:
    return pl.from_epoch(pl.col(column), time_unit="ms").dt.replace_time_zone("UTC").cast(UTC_US)


def event_key_expr() -> pl.Expr:
    """Deterministic 32-hex key over the landing columns (same event, any delivery -> same key)."""
    parts = [
        pl.col("portal_id").cast(pl.Utf8),
        pl.col("app_id").cast(pl.Utf8),
        pl.col("subscription_id").cast(pl.Utf8),
        pl.col("subscription_type"),
        pl.col("event_id").cast(pl.Utf8),
        pl.col("object_id"),
        pl.col("property_name").fill_null(""),
        pl.col("occurred_at").dt.epoch("ms").cast(pl.Utf8),
    ]
    return pl.concat_str(parts, separator="\x1f")


def events_frame(
    events: Sequence[Mapping[str, Any]], received_at: datetime, delivery_id: str | None = None
) -> pl.DataFrame:
    """Validated events (``parse_batch``) -> landing rows (``LANDING_SCHEMA``), one per event_key.

    Raw-identity property values (``PII_PROPERTIES``) are replaced by null and flagged.
    """
    if not events:
        return pl.DataFrame(schema=LANDING_SCHEMA)
    raw = pl.DataFrame(
        {
            "event_id": [e["eventId"] for e in events],
            "subscription_id": [e["subscriptionId"] for e in events],
            "portal_id": [e["portalId"] for e in events],
            "app_id": [e["appId"] for e in events],
            "subscription_type": [e["subscriptionType"] for e in events],
            "object_id": [str(e["objectId"]) for e in events],
            "property_name": [e.get("propertyName") for e in events],
            "property_value": [e.get("propertyValue") for e in events],
            "change_source": [e.get("changeSource") for e in events],
            "attempt_number": [e["attemptNumber"] for e in events],
            "occurred_ms": [e["occurredAt"] for e in events],
        },
        schema_overrides={
            "property_name": pl.Utf8,
            "property_value": pl.Utf8,
            "change_source": pl.Utf8,
            **{c: pl.Int64 for c in ("event_id", "subscription_id", "portal_id", "app_id")},
            "attempt_number": pl.Int64,
            "occurred_ms": pl.Int64,
        },
    )
    redact = pl.col("property_name").is_in(list(PII_PROPERTIES)).fill_null(False)
    frame = raw.with_columns(
        occurred_at=_ms_to_datetime("occurred_ms"),
        received_at=pl.lit(received_at).cast(UTC_US),
        delivery_id=pl.lit(delivery_id, dtype=pl.Utf8),
        value_redacted=redact,
        property_value=pl.when(redact).then(None).otherwise(pl.col("property_value")),
    )
    keys = sha256_hex_series(frame.select(event_key_expr()).to_series()).str.slice(0, 32)
    return (
        frame.with_columns(event_key=keys)
        .sort("attempt_number", maintain_order=True)
        .unique("event_key", keep="first", maintain_order=True)
        .select([pl.col(c).cast(t) for c, t in LANDING_SCHEMA.items()])
    )


def _stage_rows(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(
        (pl.col("subscription_type") == DEAL_PROPERTY_CHANGE)
        & (pl.col("property_name") == STAGE_PROPERTY)
        & pl.col("property_value").is_not_null()
    )


def deal_changes(events: pl.DataFrame) -> pl.DataFrame:
    """Per deal, its latest known stage by ``occurred_at``: deal_id, dealstage, occurred_at,
    event_key. Duplicates and arrival order do not matter (ties broken by event_id, key)."""
    schema = {"deal_id": pl.Utf8, "dealstage": pl.Utf8, "occurred_at": UTC_US, "event_key": pl.Utf8}
    if events.is_empty():
        return pl.DataFrame(schema=schema)
    return (
        _stage_rows(events)
        .sort("object_id", "occurred_at", "event_id", "event_key")
        .group_by("object_id", maintain_order=True)
        .last()
        .select(
            pl.col("object_id").alias("deal_id"),
            pl.col("property_value").alias("dealstage"),
            "occurred_at",
            "event_key",
        )
    )


def _property_asof(
    states: pl.DataFrame, events: pl.DataFrame, name: str, alias: str
) -> pl.DataFrame:
    """Attach the latest value of deal property ``name`` set at or before each state's time."""
    changes = (
        events.filter(
            (pl.col("subscription_type") == DEAL_PROPERTY_CHANGE)
            & (pl.col("property_name") == name)
        )
        .select(
            pl.col("object_id").alias("deal_id"),
            pl.col("occurred_at").alias("_at"),
            pl.col("property_value").alias(alias),
        )
        .unique(["deal_id", "_at"], keep="last", maintain_order=True)
        .sort("_at")
    )
    # both sides sorted on the time column, so each deal's rows are sorted too
    return (
        states.sort("updated_at")
        .join_asof(
            changes,
            left_on="updated_at",
            right_on="_at",
            by="deal_id",
            strategy="backward",
            check_sortedness=False,
        )
        .drop("_at")
    )


def webhook_snapshots(
    events: pl.DataFrame, pipeline_accounts: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Landing rows -> ``hubspot_deal_snapshots`` rows (``crm.DEAL_SCHEMA``), so the same
    ``crm.stage_events`` derivation serves webhooks and the deal search alike.

    One row per distinct (deal, ``dealstage`` value, ``occurredAt``) of ``deal.propertyChange``
    dealstage events, with ``updated_at`` = occurredAt and ``created_at`` = the deal's
    ``deal.creation`` time. ``pipeline``, ``amount`` and ``closed_at`` are the latest
    ``pipeline`` / ``amount`` / ``closedate`` change at or before that moment when such events
    were delivered, else null; ``account_id`` maps the pipeline (null when unknown). The deal
    search fallback fills what webhooks never carried. Duplicates and order of delivery do not
    change the result. HubSpot keeps ``hs_lastmodifieddate`` at the change, so a state seen both
    here and by the search has the same (deal_id, updated_at, dealstage) key.
    """
    if events.is_empty():
        return pl.DataFrame(schema=DEAL_SCHEMA)
    events = events.unique("event_key", keep="first", maintain_order=True)
    states = (
        _stage_rows(events)
        .select(
            pl.col("object_id").alias("deal_id"),
            pl.col("property_value").alias("dealstage"),
            pl.col("occurred_at").alias("updated_at"),
        )
        .unique(["deal_id", "updated_at", "dealstage"], maintain_order=True)
    )
    if states.is_empty():
        return pl.DataFrame(schema=DEAL_SCHEMA)
    created = (
        events.filter(pl.col("subscription_type") == DEAL_CREATION)
        .group_by("object_id")
        .agg(pl.col("occurred_at").min().alias("created_at"))
        .rename({"object_id": "deal_id"})
    )
    states = states.join(created, on="deal_id", how="left")
    for name, alias in (("pipeline", "pipeline"), ("amount", "_amount"), ("closedate", "_closed")):
        states = _property_asof(states, events, name, alias)
    mapping = pl.DataFrame(
        {
            "pipeline": list((pipeline_accounts or {}).keys()),
            "account_id": list((pipeline_accounts or {}).values()),
        },
        schema={"pipeline": pl.Utf8, "account_id": pl.Utf8},
    )
    closed_ms = pl.col("_closed").str.strip_chars().cast(pl.Int64, strict=False)
    out = states.with_columns(
        amount=pl.col("_amount").str.strip_chars().cast(pl.Float64, strict=False),
        closed_at=pl.from_epoch(closed_ms, time_unit="ms").dt.replace_time_zone("UTC").cast(UTC_US),
    ).join(mapping, on="pipeline", how="left")
    return out.select([pl.col(c).cast(t) for c, t in DEAL_SCHEMA.items()]).sort(
        "deal_id", "updated_at", "dealstage"
    )
