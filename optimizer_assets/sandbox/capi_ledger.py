"""Conversions API events the sandbox received, Meta's dedup, and their match against truth.

Meta drops an event whose (event_name, event_id) it saw on the same pixel less than 48 hours
earlier; events without event_id are never deduplicated. Matching: an event *matches* when
its identifiers (hashed ``em``/``ph``, ``lead_id``, or the fbclid inside ``fbc``) resolve to
exactly one true person of the pixel's account, and that person has a deal (CRM events
report deals).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import polars as pl

DEDUP_MS = 48 * 3_600_000
MATCH_KEYS = ("lead_id", "em", "ph", "fbc")
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "pixel_id": pl.Utf8,
    "event_name": pl.Utf8,
    "event_id": pl.Utf8,
    "event_time": pl.Int64,
    "received_at": pl.Datetime("us", "UTC"),
    "duplicate": pl.Boolean,
    "matched_person_id": pl.Int64,
    "match_key": pl.Utf8,
    "conflict": pl.Boolean,
    "person_has_deal": pl.Boolean,
    "true_ad_id": pl.Utf8,
}

# identifier kind ('em', 'ph', 'lead_id', 'fbc') -> value -> person id
IdentityIndex = dict[str, dict[str, int]]


def sha256_hex(text: str) -> str:
    """Lowercase hex SHA-256 of UTF-8 text (CAPI hashing of normalized values)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_identity_index(
    person_ids: list[int],
    emails: Iterable[str],
    phones: Iterable[str],
    extra_emails: Iterable[tuple[str, int]],
    lead_ids: Iterable[tuple[str, int]],
    fbclids: Iterable[str],
) -> IdentityIndex:
    """Map hashed normalized emails/phones, lead ids and fbclids to person ids."""
    em = {sha256_hex(e): q for e, q in zip(emails, person_ids, strict=True)}
    em.update((sha256_hex(e), q) for e, q in extra_emails)
    return {
        "em": em,
        "ph": {sha256_hex(x): q for x, q in zip(phones, person_ids, strict=True)},
        "lead_id": dict(lead_ids),
        "fbc": dict(zip(fbclids, person_ids, strict=True)),
    }


class CapiLedger:
    """Every event the CAPI endpoint accepted, flagged when Meta would deduplicate it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._first_seen: dict[tuple[str, str, str], int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def receive(self, pixel_id: str, events: list[dict], now_ms: int) -> int:
        """Store events received at ``now_ms``; returns events_received (all of them)."""
        for event in events:
            event_id = event.get("event_id")
            duplicate = False
            if event_id not in (None, ""):
                key = (str(pixel_id), str(event.get("event_name")), str(event_id))
                first = self._first_seen.get(key)
                if first is not None and now_ms - first < DEDUP_MS:
                    duplicate = True
                else:
                    self._first_seen[key] = now_ms
            self.rows.append(
                {"pixel_id": str(pixel_id), "received_ms": now_ms, "duplicate": duplicate,
                 "event": event}
            )  # fmt: skip
        return len(events)

    def resolve(
        self,
        start: datetime,
        index_for_pixel: Callable[[str], IdentityIndex],
        person_info: Callable[[int], tuple[bool, str]],
    ) -> pl.DataFrame:
        """One row per received event with the person its identifiers resolve to.

        ``person_info(person_id)`` returns (person has a deal, true ad id).
        """
        out = []
        for row in self.rows:
            event = row["event"]
            index = index_for_pixel(row["pixel_id"])
            user_data = event.get("user_data") or {}
            hits: dict[str, int] = {}
            for key in MATCH_KEYS:
                for value in _as_list(user_data.get(key)):
                    value = str(value)
                    if key == "fbc":  # fb.{subdomain}.{ms}.{fbclid}
                        value = value.split(".", 3)[-1]
                    person = index[key].get(value)
                    if person is not None and key not in hits:
                        hits[key] = person
            people = set(hits.values())
            first_key = next(iter(hits), None)
            person = hits[first_key] if first_key is not None else None
            has_deal, ad_id = person_info(person) if person is not None else (False, None)
            out.append(
                {
                    "pixel_id": row["pixel_id"],
                    "event_name": event.get("event_name"),
                    "event_id": None if event.get("event_id") is None else str(event["event_id"]),
                    "event_time": int(event.get("event_time", 0)),
                    "received_at": start + timedelta(milliseconds=row["received_ms"]),
                    "duplicate": row["duplicate"],
                    "matched_person_id": person,
                    "match_key": first_key,
                    "conflict": len(people) > 1,
                    "person_has_deal": has_deal,
                    "true_ad_id": ad_id,
                }
            )
        return pl.DataFrame(out, schema=EVENT_SCHEMA)


def match_summary(events: pl.DataFrame, pixels: list[tuple[str, str]]) -> dict:
    """Per pixel (pixel_id, account_id): received, duplicates, unique, matched, match_rate."""
    rows = []
    for pixel_id, account_id in pixels:
        f = events.filter(pl.col("pixel_id") == pixel_id)
        if f.height == 0:
            continue
        unique = f.filter(~pl.col("duplicate"))
        matched = unique.filter(
            pl.col("matched_person_id").is_not_null()
            & pl.col("person_has_deal")
            & ~pl.col("conflict")
        )
        rows.append(
            {
                "pixel_id": pixel_id,
                "account_id": account_id,
                "events_received": f.height,
                "duplicates": f.height - unique.height,
                "unique_events": unique.height,
                "matched": matched.height,
                "conflicts": int(unique["conflict"].sum()),
                "match_rate": matched.height / unique.height if unique.height else 0.0,
                "by_key": {k: int((matched["match_key"] == k).sum()) for k in MATCH_KEYS},
            }
        )
    unique_total = sum(r["unique_events"] for r in rows)
    return {
        "pixels": rows,
        "events_received": sum(r["events_received"] for r in rows),
        "unique_events": unique_total,
        "match_rate": sum(r["matched"] for r in rows) / unique_total if unique_total else 0.0,
    }


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
