"""Conversions API (group `capi`): CRM stage changes sent back to Meta as Conversion Leads.

``capi_events`` builds one event per stage change not yet in the ledger (value + currency from
synthetic revenue, hashed identities of the deal's contact or lead-form lead, ``fbc`` from its
click id, ``lead_id`` where known); changes that cannot be sent (older than 7 days, no user
data, no pixel, ...) go to ``capi_not_sent`` with the reason. A blocking check stops the run
when a payload would carry an unhashed identifier. ``capi_uploads`` sends batches of at most
1,000 per pixel, isolates a bad event by bisection while the others still go, and records
every outcome in the warehouse ledger ``capi_ledger`` (keyed by event_id), so an accepted event
is never sent twice, whatever run sends it.
"""

from datetime import timedelta

import dagster as dg
import polars as pl
import requests

from optimizer_assets.clients.errors import CapiRejectedError
from optimizer_assets.defs.attribution import attributed_revenue, sandbox_truth
from optimizer_assets.defs.resources import MetaResource, OptimizerResource, WarehouseResource
from optimizer_assets.defs.revenue import md_table, read_tables, synthetic_revenue
from optimizer_assets.domain import attribution as attribution_domain
from optimizer_assets.domain import capi as capi_domain
from optimizer_assets.warehouse import Warehouse

DAY = timedelta(hours=24)
LEDGER = "capi_ledger"
LEDGER_SCHEMA = {
    "event_id": pl.Utf8,
    "deal_id": pl.Utf8,
    "account_id": pl.Utf8,
    "pixel_id": pl.Utf8,
    "event_name": pl.Utf8,
    "event_time": pl.Int64,
    "value": pl.Float64,
    "currency": pl.Utf8,
    "status": pl.Utf8,  # accepted | rejected
    "reason": pl.Utf8,
    "sent_at": pl.Datetime("us", "UTC"),
}
NOT_SENT_SCHEMA = {
    **capi_domain.REJECTED_SCHEMA,
    "account_id": pl.Utf8,
    "checked_at": pl.Datetime("us", "UTC"),
}
# reasons that never go away: such changes are not rebuilt on later runs
PERMANENT_REASONS = ("too_old",)


def pixel_ids(
    optimizer: OptimizerResource, meta: MetaResource, account_ids: list[str]
) -> dict[str, str]:
    """Ad account -> Meta pixel (dataset) id that receives its events.

    Order: a ``pixel_id`` in the account's settings entry; in sandbox mode the sandbox's
    account list; in live mode the account's first pixel (``GET act_{id}/adspixels``).
    """
    settings = optimizer.settings()
    found = {}
    for account_id in account_ids:
        configured = getattr(settings.for_account(account_id), "pixel_id", None)
        if configured:
            found[account_id] = str(configured)
    missing = [a for a in account_ids if a not in found]
    if missing and optimizer.mode == "sandbox":
        response = requests.get(
            f"{optimizer.sandbox_url.rstrip('/')}/_sandbox/accounts",
            headers={"Authorization": f"Bearer {optimizer.meta_token}"},
            timeout=(5, 30),
        )
        response.raise_for_status()
        for row in response.json()["data"]:
            if str(row["account_id"]) in missing and row.get("pixel_id"):
                found[str(row["account_id"])] = str(row["pixel_id"])
    elif missing:
        with meta.graph() as graph:
            for account_id in missing:  # a handful of accounts
                rows = graph.paged(
                    graph._path(f"act_{account_id}", "adspixels"), {"fields": "id", "limit": 5}
                )
                first = next(iter(rows), None)
                if first is not None:
                    found[account_id] = str(first["id"])
    return found


def _pending_changes(wh) -> pl.DataFrame:
    """Stage changes with their identities, minus those already in the ledger or given up."""
    revenue, stages, attributed, contacts, leads, ledger, not_sent = read_tables(
        wh,
        "synthetic_revenue",
        "stage_values",
        "attributed_revenue",
        "hubspot_contacts",
        "meta_leads",
        LEDGER,
        "capi_not_sent",
    )
    changes = capi_domain.crm_stage_changes(revenue, stages, attributed, contacts, leads)
    done = [ledger.select("event_id")] if ledger.height else []
    if not_sent.height:
        done.append(not_sent.filter(pl.col("reason").is_in(PERMANENT_REASONS)).select("event_id"))
    if not done:
        return changes
    return changes.join(pl.concat(done), on="event_id", how="anti")


def _route_to_pixels(
    events: pl.DataFrame,
    not_sent: pl.DataFrame,
    accounts: pl.DataFrame,
    pixels: dict[str, str],
    now,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events with their account's pixel_id; those of accounts without a pixel join the
    not-sent changes (reason ``no_pixel``), which get their account and ``checked_at``."""
    events = events.join(accounts, on="event_id", how="left").with_columns(
        pixel_id=pl.col("account_id").replace_strict(pixels, default=None, return_dtype=pl.Utf8)
    )
    no_pixel = events.filter(pl.col("pixel_id").is_null())
    not_sent = pl.concat(
        [
            not_sent.join(accounts, on="event_id", how="left"),
            no_pixel.select(
                [pl.col(c) for c in capi_domain.REJECTED_SCHEMA if c in no_pixel.columns]
                + [pl.col("account_id")]
            ).with_columns(reason=pl.lit("no_pixel")),
        ],
        how="diagonal_relaxed",
    ).with_columns(checked_at=pl.lit(now).cast(pl.Datetime("us", "UTC")))
    return events.filter(pl.col("pixel_id").is_not_null()), not_sent


@dg.asset(
    group_name="capi",
    kinds={"meta", "duckdb"},
    deps=[synthetic_revenue, attributed_revenue, "hubspot_contacts", "meta_leads"],
    pool="duckdb",
)
def capi_events(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Conversion Leads events to send (one per stage change not yet accepted)."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    changes = _pending_changes(wh)
    events, not_sent = capi_domain.build_events(
        changes, now=now, currency=settings.defaults.get("currency", "USD")
    )
    accounts = changes.select("event_id", "account_id").unique("event_id")
    pixels = pixel_ids(optimizer, meta, accounts["account_id"].drop_nulls().unique().to_list())
    events, not_sent = _route_to_pixels(events, not_sent, accounts, pixels, now)
    wh.replace("capi_events", events)
    if not_sent.height:
        wh.upsert("capi_not_sent", not_sent.select(list(NOT_SENT_SCHEMA)), ["event_id"])
    reasons = not_sent.group_by("reason").agg(changes=pl.len()).sort("changes", descending=True)
    return dg.MaterializeResult(
        metadata={
            "row_count": events.height,
            "stage_changes_pending": changes.height,
            "not_sent": not_sent.height,
            "too_old": not_sent.filter(pl.col("reason") == "too_old").height,
            "with_value": events["value"].is_not_null().sum(),
            "purchases": events.filter(pl.col("event_name") == "Purchase").height,
            "pixels": len(set(pixels.values())),
            "not_sent_reasons": md_table(reasons),
        }
    )


def payload_problems(events: pl.DataFrame) -> pl.DataFrame:
    """Events whose payload would carry an unhashed identifier: event_id, problem (no values)."""
    if events.is_empty() or "payload" not in events.columns:
        return pl.DataFrame(schema={"event_id": pl.Utf8, "problem": pl.Utf8})
    return capi_domain.unhashed_identifier_problems(events)


@dg.asset_check(
    asset=capi_events,
    blocking=True,
    description="No payload carries an unhashed email, phone or name (stops the upload).",
)
def capi_payloads_hashed(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Blocking: a raw identifier in any payload stops capi_uploads before anything is sent."""
    problems = payload_problems(read_tables(warehouse.get(), "capi_events")[0])
    return dg.AssetCheckResult(
        passed=problems.is_empty(),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "events_with_problems": problems["event_id"].n_unique(),
            "problems": md_table(problems),
        },
    )


def _ledger_rows(events: pl.DataFrame, outcomes: list[tuple[str, str, str | None]], now):
    """Ledger rows (LEDGER_SCHEMA) for (event_id, status, reason) outcomes."""
    if not outcomes:
        return pl.DataFrame(schema=LEDGER_SCHEMA)
    result = pl.DataFrame(
        outcomes, schema={"event_id": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8}, orient="row"
    )
    return (
        result.join(events, on="event_id", how="left")
        .with_columns(sent_at=pl.lit(now).cast(pl.Datetime("us", "UTC")))
        .select(list(LEDGER_SCHEMA))
    )


def send_pending(capi, events: pl.DataFrame) -> tuple[list, BaseException | None]:
    """Send ``events`` per pixel in batches of <= 1,000; bisect a rejected batch.

    Returns ((event_id, status, reason) outcomes, the error that stopped sending or None).
    Throttling and 5xx are retried inside the client; when its retries run out, sending stops
    and the outcomes so far are still returned so the ledger records them.
    """
    outcomes: list[tuple[str, str, str | None]] = []

    def rejection(exc: BaseException) -> bool:
        return isinstance(exc, CapiRejectedError) and not exc.retryable

    for (pixel_id,), group in events.sort("pixel_id", "event_time").group_by(
        "pixel_id", maintain_order=True
    ):
        for batch in capi_domain.chunk(group):
            payloads = capi_domain.to_payload_dicts(batch)
            try:
                accepted, rejected = capi_domain.isolate_bad_events(
                    payloads,
                    lambda evs, pixel=pixel_id: capi.send_events(pixel, evs),
                    is_rejection=rejection,
                )
            except capi_domain.UploadInterrupted as stop:
                outcomes += [(e["event_id"], "accepted", None) for e in stop.accepted]
                outcomes += [(e["event_id"], "rejected", why) for e, why in stop.rejected]
                return outcomes, stop.__cause__ or stop
            outcomes += [(e["event_id"], "accepted", None) for e in accepted]
            outcomes += [(e["event_id"], "rejected", why) for e, why in rejected]
    return outcomes, None


def capi_match(optimizer: OptimizerResource) -> dict:
    """Sandbox mode: match rate of the received events against truth; {} in live mode."""
    if optimizer.mode != "sandbox":
        return {}
    summary = sandbox_truth(optimizer, "capi").get("summary") or {}
    if not summary.get("unique_events"):
        return {}
    return {
        "match_rate": float(summary["match_rate"]),
        "events_received_by_meta": int(summary["events_received"]),
    }


@dg.asset(group_name="capi", kinds={"meta", "duckdb"}, deps=[capi_events], pool="duckdb")
def capi_uploads(
    context: dg.AssetExecutionContext,
    optimizer: OptimizerResource,
    meta: MetaResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Pending events sent to Meta; every outcome recorded in ``capi_ledger``."""
    wh, now = warehouse.get(), optimizer.now()
    events, ledger_before = read_tables(wh, "capi_events", LEDGER)
    if events.height and ledger_before.height:  # uploads re-run alone: skip what went already
        events = events.join(ledger_before.select("event_id"), on="event_id", how="anti")
    with meta.capi() as capi:
        outcomes, stopped = send_pending(capi, events) if events.height else ([], None)
        requests_made = capi.request_count
    ledger = _ledger_rows(events, outcomes, now)
    if ledger.height:
        wh.append_new(LEDGER, ledger, ["event_id"])
    if stopped is not None:
        context.log.error(f"upload stopped after {len(outcomes)} outcomes: {stopped}")
        raise stopped
    rejected = ledger.filter(pl.col("status") == "rejected")
    return dg.MaterializeResult(
        metadata={
            "events_sent": events.height,
            "accepted": ledger.height - rejected.height,
            "rejected": rejected.height,
            "http_requests": requests_made,
            "rejections": md_table(rejected.select("event_id", "deal_id", "event_name", "reason")),
            "ledger_accepted_total": (
                (ledger_before["status"] == "accepted").sum() if ledger_before.height else 0
            )
            + ledger.height
            - rejected.height,
            **capi_match(optimizer),
        }
    )


assets = [capi_events, capi_uploads]
asset_checks = [capi_payloads_hashed]


def demo_report(world, warehouse: Warehouse) -> list[tuple[str, pl.DataFrame]]:
    """`make demo` tables: per day, revenue, value per layer, recovery/precision vs the world's
    truth (deals by creation day, final attribution), CAPI sent/accepted; match rate per pixel."""
    revenue, daily, credits, deals, ledger = read_tables(
        warehouse,
        "synthetic_revenue",
        "attributed_value_daily",
        "attributed_revenue",
        "hubspot_deals",
        LEDGER,
    )
    if revenue.is_empty() or credits.is_empty():
        return []
    by_day = revenue.group_by(date=pl.col("occurred_at").dt.date()).agg(
        revenue=pl.col("value_delta").sum()
    )
    layers = daily.group_by("date").agg(
        *[
            pl.col(f"value_layer{n}").sum().alias(f"L{n} $" if n else "unattributed $")
            for n in (1, 2, 3, 0)
        ]
    )
    truth = world.truth_deals().select("deal_id", "true_ad_id")
    per_deal = (
        credits.join(truth, on="deal_id")
        .group_by("deal_id")
        .agg(
            pl.col("deal_value").first().fill_null(0.0),
            pl.col("layer").first(),
            hit=pl.col("credit").filter(pl.col("ad_id") == pl.col("true_ad_id")).sum(),
        )
        .join(deals.select("deal_id", date=pl.col("created_at").dt.date()), on="deal_id")
    )
    scores = per_deal.group_by("date").agg(
        deals=pl.len(),
        recovery=(pl.col("deal_value") * pl.col("hit")).sum() / pl.col("deal_value").sum(),
        precision_l12=pl.col("hit").filter(pl.col("layer").is_in([1, 2])).mean(),
    )
    capi = (
        # a run at midnight sends the day that just ended
        ledger.group_by(date=(pl.col("sent_at") - timedelta(seconds=1)).dt.date()).agg(
            capi_sent=pl.len(), capi_accepted=(pl.col("status") == "accepted").sum()
        )
        if ledger.height
        else pl.DataFrame(
            schema={"date": pl.Date, "capi_sent": pl.UInt32, "capi_accepted": pl.UInt32}
        )
    )
    table = (
        by_day.join(layers, on="date", how="full", coalesce=True)
        .join(scores, on="date", how="full", coalesce=True)
        .join(capi, on="date", how="full", coalesce=True)
        .sort("date")
        .with_columns(pl.col("recovery", "precision_l12").round(4))
    )
    match = world.capi_match()
    pixels = pl.DataFrame(match.get("pixels") or []).drop("by_key", strict=False)
    total = attribution_domain.score_against_truth(
        credits, truth, credits.group_by("deal_id").agg(value=pl.col("deal_value").first())
    )
    summary = pl.DataFrame(
        {
            "metric": ["recovery", "precision layer 1-2", "CAPI match rate", "CAPI events"],
            "value": [
                total["recovery"],
                total["precision_l12"],
                match.get("match_rate"),
                float(match.get("unique_events") or 0),
            ],
        }
    )
    return [
        ("Revenue, attribution (vs sandbox truth) and CAPI uploads, per day", table),
        ("Attribution and CAPI overall (sandbox truth)", summary),
        ("CAPI events received per pixel and their match rate (sandbox truth)", pixels),
    ]
