"""The sandbox playing HubSpot's webhook sender: signed batches of deal changes, with retries.

As the world advances, every deal change since the last round becomes HubSpot webhook events
(CONTRACTS.md section 3): ``deal.creation``, and ``deal.propertyChange`` for ``dealstage`` (each
stage change), ``pipeline`` (at creation) and ``amount`` (when the amount is set, at the deal's
first "Show up"). Events carry ``occurredAt`` = the simulated moment of the change, so a state seen
through webhooks and through the deal search has the same (deal, stage, time).

Delivery like HubSpot's: at most ``max_batch`` (< 100) events per POST, signed with
``X-HubSpot-Signature-v3`` over the configured (public) URL and the real wall clock; any non-2xx
answer or one slower than ``timeout_seconds`` is retried with exponential backoff up to
``max_attempts`` attempts (HubSpot spreads 10 attempts over 24 hours; here the delays are
compressed to fractions of a second), each retry re-signed with ``attemptNumber`` + 1. A batch that
fails every attempt is dropped (kept in ``dropped``), as HubSpot drops it; the deal search fallback
covers it. To exercise the receiver, a seeded share of events is delivered twice
(``duplicate_share``) or held back to a later round and shuffled (``reorder_share``).

The sender polls the world: ``World.deal_stage_history()`` and ``World.deals()`` read under the
sandbox lock (``SandboxServer.lock``), changes in (last round's clock, now]. No hook in the world
or the server is needed; ``SandboxServer(..., webhook_url=..., webhook_secret=...)`` could own a
``WebhookSender(server.world, url, secret, lock=server.lock)`` and start/stop it with the server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl
import requests

from optimizer_assets.domain.capi import sha256_hex_series
from optimizer_assets.domain.webhooks import (
    DEAL_CREATION,
    DEAL_PROPERTY_CHANGE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign_v3,
)

__all__ = ["SenderConfig", "WebhookSender", "deal_change_events"]

log = logging.getLogger(__name__)

# one subscription per (event type, property), as an app would configure them in HubSpot
SUBSCRIPTION_IDS: dict[tuple[str, str | None], int] = {
    (DEAL_CREATION, None): 4101,
    (DEAL_PROPERTY_CHANGE, "dealstage"): 4102,
    (DEAL_PROPERTY_CHANGE, "pipeline"): 4103,
    (DEAL_PROPERTY_CHANGE, "amount"): 4104,
}
SHOW_UP_LABEL = "Show up"  # the stage at which the world sets a deal's amount


@dataclass(frozen=True)
class SenderConfig:
    """How the sandbox delivers webhooks (defaults in brackets are HubSpot's own behaviour)."""

    portal_id: int = 62515  # HubSpot's documentation sample portal
    app_id: int = 54321
    max_batch: int = 99  # events per request (HubSpot: < 100)
    max_attempts: int = 10  # (10)
    backoff_seconds: float = 0.05  # first retry delay, doubling (HubSpot: minutes to hours)
    max_backoff_seconds: float = 1.0
    timeout_seconds: float = 5.0  # slower answers count as failures (5 s)
    interval_seconds: float = 0.25  # background loop: real seconds between rounds
    duplicate_share: float = 0.0  # share of events delivered a second time (retry-style)
    reorder_share: float = 0.0  # share of events held back one round; batches shuffled
    seed: int = 0
    properties: tuple[str, ...] = ("dealstage", "pipeline", "amount")


def _ms(column: str) -> pl.Expr:
    return pl.col(column).dt.epoch("ms")


def _rows(frame: pl.DataFrame, kind: str, name: str | None = None) -> pl.DataFrame:
    """deal_id, occurred_at, kind, name, value: one event per row of ``frame``."""
    return frame.select(
        "deal_id",
        "occurred_at",
        kind=pl.lit(kind),
        name=pl.lit(name, pl.Utf8),
        value=pl.col(name).cast(pl.Utf8) if name else pl.lit(None, pl.Utf8),
    )


def deal_change_events(
    history: pl.DataFrame,
    deals: pl.DataFrame,
    since: datetime | None,
    until: datetime,
    *,
    portal_id: int,
    app_id: int,
    properties: tuple[str, ...] = SenderConfig.properties,
) -> list[dict[str, Any]]:
    """HubSpot webhook events for the deal changes in (``since``, ``until``], oldest first.

    ``history``: ``World.deal_stage_history()`` (deal_id, dealstage, stage_label, occurred_at);
    ``deals``: ``World.deals()`` (pipeline, amount, createdate). ``eventId`` is a deterministic
    52-bit hash of the change, so a restarted sender sends the same ids again.
    """
    window = pl.col("occurred_at") <= until
    if since is not None:
        window &= pl.col("occurred_at") > since
    info = deals.select("deal_id", "pipeline", "amount", "createdate")
    rows = history.filter(window).join(info, on="deal_id", how="left")
    creation = rows.filter(pl.col("occurred_at") == pl.col("createdate"))
    frames = [_rows(creation, DEAL_CREATION)]
    if "dealstage" in properties:
        frames.append(_rows(rows, DEAL_PROPERTY_CHANGE, "dealstage"))
    if "pipeline" in properties:
        frames.append(_rows(creation, DEAL_PROPERTY_CHANGE, "pipeline"))
    if "amount" in properties:
        show_up = (
            history.filter(pl.col("stage_label") == SHOW_UP_LABEL)
            .group_by("deal_id")
            .agg(pl.col("occurred_at").min())
            .filter(window)
            .join(info, on="deal_id")
            .filter(pl.col("amount").is_not_null())
        )
        frames.append(_rows(show_up, DEAL_PROPERTY_CHANGE, "amount"))
    events = pl.concat(frames)
    if events.is_empty():
        return []
    events = events.with_columns(occurred_ms=_ms("occurred_at"), first=pl.col("name").is_null())
    identity = pl.concat_str(
        [
            pl.lit(str(portal_id)),
            pl.col("kind"),
            pl.col("deal_id"),
            pl.col("name").fill_null(""),
            pl.col("occurred_ms").cast(pl.Utf8),
        ],
        separator="|",
    )
    hashed = sha256_hex_series(events.select(identity).to_series())
    events = events.with_columns(event_id=hashed.str.slice(0, 13).str.to_integer(base=16))
    subscription = pl.concat_str([pl.col("kind"), pl.col("name").fill_null("")], separator=":")
    ids = {f"{k}:{n or ''}": v for (k, n), v in SUBSCRIPTION_IDS.items()}
    events = events.with_columns(
        subscription_id=subscription.replace_strict(ids, return_dtype=pl.Int64)
    ).sort("occurred_ms", "first", "deal_id", "name", descending=[False, True, False, False])
    out = []
    for row in events.iter_rows(named=True):
        event = {
            "eventId": row["event_id"],
            "subscriptionId": row["subscription_id"],
            "portalId": portal_id,
            "appId": app_id,
            "occurredAt": row["occurred_ms"],
            "subscriptionType": row["kind"],
            "attemptNumber": 0,
            "objectId": int(row["deal_id"]),
            "changeSource": "CRM",
        }
        if row["name"] is None:
            event["changeFlag"] = "NEW"
        else:
            event["propertyName"] = row["name"]
            event["propertyValue"] = row["value"]
        out.append(event)
    return out


class WebhookSender:
    """Deliver the world's deal changes to ``url`` as HubSpot would (see module docstring).

    ``signed_url`` is the URL HubSpot is configured with (the public one behind a proxy); it
    defaults to ``url``. ``since`` is where the first round starts (default: the world's clock
    now, like a fresh subscription). ``lock`` guards world reads (pass ``SandboxServer.lock``).
    """

    def __init__(
        self,
        world: Any,
        url: str,
        client_secret: str,
        *,
        config: SenderConfig | None = None,
        lock: threading.RLock | None = None,
        since: datetime | None = None,
        signed_url: str | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.world = world
        self.url = url
        self.signed_url = signed_url or url
        self._secret = client_secret
        self.config = config or SenderConfig()
        self.lock = lock or threading.RLock()
        self.session = session or requests.Session()
        self.clock = clock
        self.rng = np.random.default_rng(self.config.seed)
        self.stats: Counter = Counter()
        self.dropped: list[dict[str, Any]] = []
        with self.lock:
            self._watermark: datetime | None = since if since is not None else world.now
        self._carry: list[dict[str, Any]] = []
        self._round = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # the secret stays out
        return f"WebhookSender(url={self.url!r}, signed_url={self.signed_url!r})"

    # ---- one round ---------------------------------------------------------------------------
    def _new_events(self) -> list[dict[str, Any]]:
        with self.lock:
            until = self.world.now
            if self._watermark is not None and self._watermark >= until:
                return []
            history = self.world.deal_stage_history()
            deals = self.world.deals()
        events = deal_change_events(
            history,
            deals,
            self._watermark,
            until,
            portal_id=self.config.portal_id,
            app_id=self.config.app_id,
            properties=self.config.properties,
        )
        self._watermark = until  # only once the window's events exist: a failed read retries
        return events

    def _plan(self, new: list[dict[str, Any]], flush: bool) -> list[dict[str, Any]]:
        """This round's events (held-back ones first); duplicates and hold-backs drawn seeded."""
        cfg = self.config
        held = self.rng.random(len(new)) < cfg.reorder_share
        outgoing = self._carry + [e for e, h in zip(new, held, strict=True) if not h]
        carry = [e for e, h in zip(new, held, strict=True) if h]
        dup = self.rng.random(len(outgoing)) < cfg.duplicate_share
        carry += [
            {**e, "attemptNumber": e["attemptNumber"] + 1}
            for e, d in zip(outgoing, dup, strict=True)
            if d
        ]
        self.stats["held_back"] += int(held.sum())
        self.stats["duplicated"] += int(dup.sum())
        if flush:
            outgoing, carry = outgoing + carry, []
        self._carry = carry
        if cfg.reorder_share > 0 and outgoing:
            outgoing = [outgoing[i] for i in self.rng.permutation(len(outgoing))]
        return outgoing

    def deliver_pending(self, *, flush: bool = False) -> dict[str, int]:
        """One synchronous round: read new changes, POST them in batches with retries.

        ``flush`` also sends what duplication/reordering held for the next round. Returns this
        round's counts: events, batches, attempts, failed_batches.
        """
        with self._round:
            before = self.stats.copy()
            events = self._plan(self._new_events(), flush)
            size = max(1, min(self.config.max_batch, 99))
            for start in range(0, len(events), size):
                self._deliver(events[start : start + size])
            delta = self.stats - before
            return {
                "events": len(events),
                "batches": delta["batches"],
                "attempts": delta["attempts"],
                "failed_batches": delta["failed_batches"],
            }

    def _post(self, batch: list[dict[str, Any]]) -> int | None:
        body = json.dumps(batch, separators=(",", ":")).encode()
        timestamp = str(int(self.clock() * 1000))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign_v3(self._secret, "POST", self.signed_url, body, timestamp),
        }
        try:
            response = self.session.post(
                self.url, data=body, headers=headers, timeout=self.config.timeout_seconds
            )
        except requests.RequestException as exc:  # timeouts included: HubSpot's 5 s rule
            self.stats["transport_errors"] += 1
            log.debug("webhook delivery failed: %s", type(exc).__name__)
            return None
        return response.status_code

    def _deliver(self, batch: list[dict[str, Any]]) -> bool:
        cfg = self.config
        self.stats["batches"] += 1
        for attempt in range(cfg.max_attempts):
            attempt_batch = [{**e, "attemptNumber": e["attemptNumber"] + attempt} for e in batch]
            self.stats["attempts"] += 1
            status = self._post(attempt_batch)
            if status is not None and 200 <= status < 300:
                self.stats["delivered_events"] += len(batch)
                return True
            self.stats[f"status_{status or 'error'}"] += 1
            if attempt + 1 < cfg.max_attempts:
                delay = min(cfg.backoff_seconds * 2**attempt, cfg.max_backoff_seconds)
                self._stop.wait(delay * (0.5 + self.rng.random()))  # jittered, stoppable
        self.stats["failed_batches"] += 1
        self.stats["dropped_events"] += len(batch)
        self.dropped.extend(batch)
        log.warning("webhook batch of %d events dropped after %d attempts", len(batch), attempt + 1)
        return False

    # ---- background loop ---------------------------------------------------------------------
    def start(self) -> WebhookSender:
        """Deliver in a background thread every ``interval_seconds`` until :meth:`stop`."""
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="webhook-sender")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval_seconds):
            try:
                self.deliver_pending()
            except Exception:  # keep delivering; the next round retries the window's reads
                log.exception("webhook sender round failed")

    def stop(self, *, flush: bool = True) -> None:
        """Stop the loop; ``flush`` delivers the changes and held-back events still pending."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
            self._thread = None
        if flush:
            self._stop.clear()
            try:
                self.deliver_pending(flush=True)
            except Exception:
                log.exception("webhook sender final round failed")

    def __enter__(self) -> WebhookSender:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
