"""Near-real-time orchestration: webhook deal states, the HubSpot changes sensor, insights
schedules and the automation sensor.

- ``hubspot_webhook_deal_states`` (group ``crm``) turns landing-table rows (the receiver's
  ``hubspot_webhook_events``) into deal states appended to ``hubspot_deal_snapshots`` -- the
  table the deal search fills too -- so ``deal_stage_events`` derives one set of stage events
  from both. Its progress (the newest ``received_at`` consumed, per run) is the warehouse table
  ``hubspot_webhook_progress``: if it fails, the rows wait for the next run (the assets after it
  recompute from the whole snapshot table, so a later failure loses nothing either).
- ``hubspot_changes_sensor`` reads new landing rows (``received_at`` watermark minus a little
  overlap, deduplicated on ``event_key``) and, as the fallback for missed deliveries, polls the
  deal search with an overlapping ``hs_lastmodifieddate`` watermark (one ``limit=1`` request when
  nothing changed). It requests ONE run of ``hubspot_changes_loop`` (deals, webhook states, stage
  events and everything downstream of them: revenue -> attribution -> CAPI -> scores -> plan ->
  apply) with a ``run_key`` hashed from the events it covers. The JSON cursor only moves past
  what was requested; Dagster stores cursor and run requests together in the tick and never
  starts a ``run_key`` twice, so a daemon restart neither loses nor repeats a run. While a loop
  run waits in the queue the sensor requests nothing: that run reads every row landed by then.
- Schedules: ``meta_insights_hourly`` (catalog, leads and today's insights partition) and
  ``meta_insights_repull`` (the last ``REPULL_DAYS`` days as one ranged run: Meta revises recent
  days). "Today" is the optimizer's clock (the sandbox's in sandbox mode). Crons come from
  ``OPTIMIZER_INSIGHTS_CRON`` / ``OPTIMIZER_INSIGHTS_REPULL_CRON`` (``optimizer ui`` speeds the
  re-pull up because its sandbox clock runs 3600x).
- ``winner_index`` and ``cross_account_patterns`` (issue 7) are kept out of the per-change loop
  and rebuilt on their own cadence: each declares ``AutomationCondition.on_cron`` (crons in
  ``CADENCES``: after the tick, once its inputs have updated since), and ``online_learner``
  follows each insights pull (eager, without waiting for every past insights partition).
  ``optimizer_automation`` evaluates those conditions; no job or schedule here runs them too.

Runs that touch Meta carry ``META_WRITES_TAG`` (``dagster.yaml`` lets one go at a time); every
asset here sits in the ``duckdb`` pool.

DuckDB lets one process write a file at a time, and Dagster's pool only serializes Dagster steps.
The receiver writes whenever HubSpot posts, so it can keep the landing table in a file of its own
(``optimizer webhook serve --warehouse F`` and ``OPTIMIZER_WEBHOOK_WAREHOUSE=F`` here; default:
the warehouse itself). Then only the sensor and ``hubspot_webhook_deal_states`` touch the
receiver's file (reads, retried briefly while it commits), and the warehouse sees Dagster steps
only -- the sensor reads it just to confirm a state the deal search found missing.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import dagster as dg
import duckdb
import polars as pl
from pydantic import Field

from optimizer_assets.defs.ingestion import (
    OVERLAP,
    hubspot_contacts,
    hubspot_deals,
    meta_ad_insights,
    meta_ads,
    meta_leads,
)
from optimizer_assets.defs.partitions import daily_partitions
from optimizer_assets.defs.resources import (
    HubSpotResource,
    OptimizerResource,
    WarehouseResource,
)
from optimizer_assets.domain import crm
from optimizer_assets.domain import webhooks as webhooks_domain
from optimizer_assets.warehouse import Warehouse

LANDING = webhooks_domain.LANDING_TABLE
SNAPSHOTS = "hubspot_deal_snapshots"
SNAPSHOT_KEY = ["deal_id", "updated_at", "dealstage"]
PROGRESS = "hubspot_webhook_progress"
META_WRITES_TAG = "optimizer/meta-writes"  # dagster.yaml: tag_concurrency_limits, limit 1
LOOP_JOB = "hubspot_changes_loop"
INSIGHTS_JOB = "meta_insights"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

# receivers stamp received_at under their write lock; the overlap covers a second receiver's
# clock or a commit racing the sensor's read
RECEIVED_OVERLAP = timedelta(seconds=10)
SEARCH_OVERLAP = OVERLAP  # HubSpot's search index lags writes; same overlap as hubspot_deals
# The sensor daemon evaluates sensors at most every 5 s (its loop) and skips a sensor whose
# previous tick ENDED less than minimum_interval_seconds ago (dagster/_daemon/sensor.py): with 5
# a loop that starts < 5 s after the last tick ended is skipped; below it, every loop ticks.
SENSOR_INTERVAL_SECONDS = 1
MAX_EVENTS_PER_RUN = 20_000  # events one run request lists (its key); the run reads them all
MAX_PENDING = 1_000  # searched states awaiting confirmation that webhooks missed them
SHORT_KEY = 16  # hex chars of event_key kept in the cursor (64 bits)
REPULL_DAYS = 3
HOURLY_CRON = os.environ.get("OPTIMIZER_INSIGHTS_CRON", "5 * * * *")
REPULL_CRON = os.environ.get("OPTIMIZER_INSIGHTS_REPULL_CRON", "30 4 * * *")
BUSY_ERRORS = (duckdb.IOException, duckdb.ConnectionException, duckdb.TransactionException)
T = TypeVar("T")


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _digest(parts: Iterable[str], length: int = 20) -> str:
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:length]


def retry_busy(read: Callable[[], T], attempts: int = 6, first_delay: float = 0.05) -> T:
    """``read()``, retried with backoff (~1.5 s in all) while another process holds the DuckDB
    file (the webhook receiver commits a batch, a run writes); the last error is re-raised."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return read()
        except BUSY_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- warehouse reads
def landing_warehouse(warehouse: WarehouseResource) -> Warehouse:
    """The DuckDB file holding the receiver's landing table: ``OPTIMIZER_WEBHOOK_WAREHOUSE``,
    else the warehouse."""
    return Warehouse(os.environ.get("OPTIMIZER_WEBHOOK_WAREHOUSE") or warehouse.path)


def consumed_watermark(wh: Warehouse) -> datetime | None:
    """Newest ``received_at`` a run has consumed (``hubspot_webhook_progress``), or None."""
    if not wh.has_table(PROGRESS):
        return None
    return wh.query(f'SELECT max(max_received_at) AS m FROM "{PROGRESS}"')["m"][0]


def landing_rows_of_new_deals(wh: Warehouse, since: datetime | None) -> pl.DataFrame:
    """Every landing row of the deals with a row received at or after ``since`` (all when None):
    a state's pipeline, amount and creation time may have been delivered earlier."""
    if not wh.has_table(LANDING):
        return pl.DataFrame(schema=webhooks_domain.LANDING_SCHEMA)
    recent = "" if since is None else "WHERE received_at >= ?"
    return wh.query(
        f'SELECT * FROM "{LANDING}" WHERE object_id IN '
        f'(SELECT object_id FROM "{LANDING}" {recent}) ORDER BY received_at, event_key',
        [] if since is None else [since],
    )


def landing_since(wh: Warehouse, after: datetime | None) -> pl.DataFrame:
    """event_key, received_at, subscription_type of landing rows received after ``after``."""
    if not wh.has_table(LANDING):
        return pl.DataFrame(
            schema={"event_key": pl.Utf8, "received_at": crm.UTC_US, "subscription_type": pl.Utf8}
        )
    where = "" if after is None else "WHERE received_at > ?"
    return wh.query(
        f'SELECT event_key, received_at, subscription_type FROM "{LANDING}" {where} '
        "ORDER BY received_at, event_key",
        [] if after is None else [after],
    )


KNOWN_SCHEMA = {"deal_id": pl.Utf8, "dealstage": pl.Utf8, "at_ms": pl.Int64}


def _known(wh: Warehouse, table: str, sql: str, deal_ids: list[str]) -> pl.DataFrame:
    if not deal_ids or not wh.has_table(table):
        return pl.DataFrame(schema=KNOWN_SCHEMA)
    ids = pl.DataFrame({"deal_id": deal_ids}, schema={"deal_id": pl.Utf8})
    with wh.connect(read_only=True) as con:
        con.register("ids", ids)
        frame = con.execute(sql).pl()
    return frame.rename(dict(zip(frame.columns, KNOWN_SCHEMA, strict=True))).cast(KNOWN_SCHEMA)


def landing_states(wh: Warehouse, deal_ids: list[str]) -> pl.DataFrame:
    """Stage values of these deals delivered by webhooks (deal_id, dealstage, at_ms)."""
    sql = (
        f'SELECT object_id, property_value, epoch_ms(occurred_at) FROM "{LANDING}" '
        f"WHERE subscription_type = '{webhooks_domain.DEAL_PROPERTY_CHANGE}' AND property_name = "
        f"'{webhooks_domain.STAGE_PROPERTY}' AND object_id IN (SELECT deal_id FROM ids)"
    )
    return _known(wh, LANDING, sql, deal_ids)


def snapshot_states(wh: Warehouse, deal_ids: list[str]) -> pl.DataFrame:
    """States of these deals in ``hubspot_deal_snapshots`` (deal_id, dealstage, at_ms)."""
    sql = (
        f'SELECT deal_id, dealstage, epoch_ms(updated_at) FROM "{SNAPSHOTS}" '
        "WHERE deal_id IN (SELECT deal_id FROM ids)"
    )
    return _known(wh, SNAPSHOTS, sql, deal_ids)


# ----------------------------------------------------------------------------- sensor logic
@dataclass(frozen=True)
class ChangesCursor:
    """The sensor's state, stored as a small JSON string by Dagster.

    ``received``: newest ``received_at`` covered by a requested run (ISO, None before the first);
    ``seen``: short keys of the covered rows received within ``RECEIVED_OVERLAP`` of it;
    ``search_ms``: newest ``hs_lastmodifieddate`` the fallback poll has looked at;
    ``pending``: searched states ("deal|ms|stage") not in the warehouse at the last tick (they
    become a run if still missing one tick later: a webhook in flight gets that long).
    """

    received: datetime | None = None
    seen: tuple[str, ...] = ()
    search_ms: int | None = None
    pending: tuple[str, ...] = ()

    def dump(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "received": None if self.received is None else self.received.isoformat(),
                "seen": list(self.seen),
                "search_ms": self.search_ms,
                "pending": list(self.pending),
            },
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, text: str | None) -> "ChangesCursor":
        if not text:
            return cls()
        raw = json.loads(text)
        received = raw.get("received")
        return cls(
            received=None if received is None else datetime.fromisoformat(received),
            seen=tuple(raw.get("seen") or ()),
            search_ms=raw.get("search_ms"),
            pending=tuple(raw.get("pending") or ()),
        )


@dataclass(frozen=True)
class TickPlan:
    """What one sensor tick covers: new landing rows, confirmed missed states, next cursor."""

    events: pl.DataFrame  # landing rows not covered before (event_key, received_at, ...)
    missed: pl.DataFrame  # searched states webhooks did not deliver (deal_id, at_ms, dealstage)
    cursor: ChangesCursor
    triggering: int = 0  # deal.* rows among ``events`` (other subscriptions need no run)

    @property
    def wants_run(self) -> bool:
        return self.triggering > 0 or self.missed.height > 0

    @property
    def covered(self) -> list[str]:
        """Stable identities of everything the run covers."""
        return self.events["event_key"].to_list() + state_keys(self.missed)

    @property
    def run_key(self) -> str:
        """Derived only from the covered events: same events -> same key -> one run."""
        return f"hubspot-changes-{_digest(self.covered)}"

    def run_config(self) -> dict[str, Any]:
        if self.missed.is_empty():
            return {}
        window = {
            "search_since_ms": int(self.missed["at_ms"].min()),
            "search_until_ms": int(self.missed["at_ms"].max()) + 1,
        }
        return {"ops": {"hubspot_webhook_deal_states": {"config": window}}}

    def tags(self) -> dict[str, str]:
        tags = {
            "optimizer/webhook_events": str(self.events.height),
            "optimizer/missed_states": str(self.missed.height),
        }
        if self.events.height:
            tags["optimizer/received_from"] = self.events["received_at"].min().isoformat()
            tags["optimizer/received_to"] = self.events["received_at"].max().isoformat()
        return tags


def state_keys(states: pl.DataFrame) -> list[str]:
    """``deal|ms|stage`` strings of (deal_id, at_ms, dealstage) rows."""
    if states.is_empty():
        return []
    key = pl.concat_str(
        [pl.col("deal_id"), pl.col("at_ms").cast(pl.Utf8), pl.col("dealstage")], separator="|"
    )
    return states.select(key).to_series().to_list()


def parse_state_keys(keys: Iterable[str]) -> pl.DataFrame:
    rows = [k.split("|", 2) for k in keys]
    return pl.DataFrame(
        {
            "deal_id": [r[0] for r in rows],
            "at_ms": [int(r[1]) for r in rows],
            "dealstage": [r[2] for r in rows],
        },
        schema=KNOWN_SCHEMA,
    )


def new_landing_rows(
    cursor: ChangesCursor,
    landing: pl.DataFrame,
    *,
    overlap: timedelta = RECEIVED_OVERLAP,
    max_events: int = MAX_EVENTS_PER_RUN,
) -> tuple[pl.DataFrame, datetime | None, tuple[str, ...]]:
    """Rows of ``landing`` (received after ``cursor.received - overlap``, ordered) not covered
    yet, capped to the oldest ``max_events``; plus the watermark and seen keys once covered."""
    short = pl.col("event_key").str.slice(0, SHORT_KEY)
    if cursor.received is not None:
        landing = landing.filter(pl.col("received_at") > cursor.received - overlap)
    new = landing.filter(~short.is_in(list(cursor.seen))).head(max_events)
    if new.is_empty():
        return new, cursor.received, cursor.seen
    watermark = new["received_at"].max()
    if cursor.received is not None:
        watermark = max(watermark, cursor.received)
    # remember what is covered (before, or by this run) within the overlap of the new watermark
    covered = set(new.select(short).to_series()) | set(cursor.seen)
    window = landing.filter(
        (pl.col("received_at") > watermark - overlap) & short.is_in(list(covered))
    )
    return new, watermark, tuple(window.select(short).to_series().unique(maintain_order=True))


def missed_states(searched: pl.DataFrame, known: pl.DataFrame) -> pl.DataFrame:
    """Searched states (deal_id, at_ms, dealstage) the warehouse cannot explain: the deal's
    newest known state at or before ``at_ms`` has another stage, or the deal is unknown. A search
    that sees a later ``hs_lastmodifieddate`` of a known stage (another property changed) is
    explained; a middle state that webhooks never delivered is not."""
    if searched.is_empty():
        return searched.select(list(KNOWN_SCHEMA))
    asof = (
        searched.select(list(KNOWN_SCHEMA))
        .unique(maintain_order=True)
        .sort("at_ms")
        .join_asof(
            known.sort("at_ms").select(
                "deal_id", "at_ms", pl.col("dealstage").alias("_known"), _at=pl.col("at_ms")
            ),
            on="at_ms",
            by="deal_id",
            strategy="backward",
            check_sortedness=False,
        )
    )
    explained = pl.col("_known").is_not_null() & (pl.col("_known") == pl.col("dealstage"))
    return asof.filter(~explained).select(list(KNOWN_SCHEMA)).sort("deal_id", "at_ms")


def plan_tick(
    cursor: ChangesCursor,
    landing: pl.DataFrame,
    *,
    searched: pl.DataFrame | None = None,
    known: pl.DataFrame | None = None,
    search_ms: int | None = None,
    overlap: timedelta = RECEIVED_OVERLAP,
    max_events: int = MAX_EVENTS_PER_RUN,
) -> TickPlan:
    """Pure planning of one tick.

    ``landing``: rows read with received_at > cursor.received - overlap; ``searched``: states
    from the fallback poll (deal_id, at_ms, dealstage) or None when it did not run; ``known``:
    stored states of the searched and pending deals (webhook stage rows, plus the snapshots of
    pending deals those cannot explain); ``search_ms``: the poll's new watermark. A searched
    state nothing explains waits one tick in ``pending`` and becomes part of the run if it is
    still unexplained then.
    """
    events, received, seen = new_landing_rows(
        cursor, landing, overlap=overlap, max_events=max_events
    )
    known = known if known is not None else pl.DataFrame(schema=KNOWN_SCHEMA)
    pending = parse_state_keys(cursor.pending)
    confirmed = missed_states(pending, known)
    candidates = (
        missed_states(searched, known)
        if searched is not None
        else pl.DataFrame(schema=KNOWN_SCHEMA)
    )
    fresh = candidates.join(pending, on=list(KNOWN_SCHEMA), how="anti")
    triggering = events.filter(pl.col("subscription_type").str.starts_with("deal.")).height
    next_cursor = ChangesCursor(
        received=received,
        seen=seen,
        search_ms=cursor.search_ms if search_ms is None else search_ms,
        pending=tuple(state_keys(fresh)[:MAX_PENDING]),
    )
    return TickPlan(events=events, missed=confirmed, cursor=next_cursor, triggering=triggering)


def poll_deal_search(
    hubspot: HubSpotResource, since_ms: int
) -> tuple[pl.DataFrame | None, int | None]:
    """The fallback poll: one ``limit=1`` search for anything modified after ``since_ms``; when
    there is, every deal modified since ``since_ms - SEARCH_OVERLAP``. Returns the searched
    states (None when nothing changed) and the newest ``hs_lastmodifieddate`` seen."""
    overlap_ms = int(SEARCH_OVERLAP / timedelta(milliseconds=1))
    with hubspot.client() as client:
        probe = client.search_deals_modified(since_ms + 1, page_size=1)
        newer = next(iter(probe), None)
        probe.close()
        if newer is None:
            return None, None
        records = list(client.search_deals_modified(since_ms - overlap_ms))
    deals = crm.deals_frame(records, {})
    if deals.is_empty():
        return None, None
    states = deals.select(
        "deal_id", "dealstage", at_ms=pl.col("updated_at").dt.epoch("ms")
    ).drop_nulls()
    return states.select(list(KNOWN_SCHEMA)), int(states["at_ms"].max())


def _waiting_loop_run(instance: dg.DagsterInstance) -> bool:
    """A loop run is queued or starting: it will read every row landed by the time it starts."""
    waiting = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
    ]
    runs = instance.get_run_records(
        filters=dg.RunsFilter(job_name=LOOP_JOB, statuses=waiting), limit=1
    )
    return bool(runs)


# ----------------------------------------------------------------------------- the asset
class WebhookStatesConfig(dg.Config):
    """Set by the sensor when the deal search found states that webhooks never delivered."""

    search_since_ms: int | None = Field(
        default=None, description="also read deals modified in [since, until) (epoch ms)"
    )
    search_until_ms: int | None = Field(default=None, description="end of that window")


@dg.asset(
    group_name="crm",
    kinds={"hubspot", "duckdb"},
    deps=[hubspot_deals],  # the deal search's watermark is read before webhook states move it
    pool="duckdb",
)
def hubspot_webhook_deal_states(
    context: dg.AssetExecutionContext,
    config: WebhookStatesConfig,
    optimizer: OptimizerResource,
    hubspot: HubSpotResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Deal states from webhook deliveries (and from a deal-search window the sensor found
    missed) appended to ``hubspot_deal_snapshots``; consumed rows recorded per run."""
    wh, accounts = warehouse.get(), optimizer.settings().pipeline_accounts()
    consumed = consumed_watermark(wh)
    since = None if consumed is None else consumed - RECEIVED_OVERLAP
    inbox = landing_warehouse(warehouse)
    rows = retry_busy(lambda: landing_rows_of_new_deals(inbox, since), attempts=10)
    states = [webhooks_domain.webhook_snapshots(rows, accounts)]
    if config.search_since_ms is not None:
        with hubspot.client() as client:
            found = client.search_deals_modified(config.search_since_ms, config.search_until_ms)
            states.append(crm.deals_frame(list(found), accounts))
    new = wh.append_new(SNAPSHOTS, pl.concat(states), SNAPSHOT_KEY)
    received = rows if consumed is None else rows.filter(pl.col("received_at") > consumed)
    newest = rows["received_at"].max() if rows.height else consumed
    if consumed is not None and newest is not None:
        newest = max(newest, consumed)
    wall = datetime.now(UTC)  # received_at is the receiver's wall clock
    progress = pl.DataFrame(
        {
            "run_id": [context.run.run_id],
            "processed_at": [wall],
            "max_received_at": [newest],
            "events": [received.height],
            "new_states": [new.height],
        },
        schema={
            "run_id": pl.Utf8,
            "processed_at": crm.UTC_US,
            "max_received_at": crm.UTC_US,
            "events": pl.Int64,
            "new_states": pl.Int64,
        },
    )
    wh.append_new(PROGRESS, progress, ["run_id"])
    metadata: dict[str, Any] = {
        "webhook_events": received.height,
        "deals": received["object_id"].n_unique() if received.height else 0,
        "new_states": new.height,
        "searched_states": states[-1].height if len(states) > 1 else 0,
    }
    if received.height:
        oldest = received["received_at"].min()
        metadata["oldest_wait_seconds"] = (wall - oldest).total_seconds()
        metadata["max_received_at"] = dg.MetadataValue.timestamp(newest)
    return dg.MaterializeResult(metadata=metadata)


# ----------------------------------------------------------------------------- jobs
# Periodically rebuilt assets (issue 7): their AutomationCondition.on_cron(cron) (declared on the
# assets in defs/learning.py, a test keeps the two equal), never the per-change loop.
CADENCES: dict[str, str] = {
    "winner_index": "0 */6 * * *",  # FAISS index of winning ads: four times a day
    "cross_account_patterns": "30 3 * * *",  # cross-account learner: once a day
}
_CADENCED = dg.AssetSelection.key_prefixes(*([key] for key in CADENCES))  # empty when absent

LOOP_SELECTION = (
    (
        dg.AssetSelection.assets(hubspot_deals, hubspot_contacts)
        | dg.AssetSelection.assets(hubspot_webhook_deal_states).downstream()
    )
    - dg.AssetSelection.assets(meta_ad_insights)  # partitioned: its schedules keep it fresh
    - _CADENCED
)

hubspot_changes_loop = dg.define_asset_job(
    LOOP_JOB,
    selection=LOOP_SELECTION,
    executor_def=dg.in_process_executor,  # one process: no per-step start-up on the hot path
    tags={META_WRITES_TAG: "loop"},
    description="The loop after a CRM change: deals, webhook states, stage events, revenue, "
    "attribution, CAPI, scores, budget plan and its application (one at a time).",
)

meta_insights = dg.define_asset_job(
    INSIGHTS_JOB,
    selection=dg.AssetSelection.assets(meta_ads, meta_leads, meta_ad_insights),
    executor_def=dg.in_process_executor,
    tags={META_WRITES_TAG: "insights"},
    description="The Meta catalog, lead-form leads and daily insights for a day or a range.",
)


# ----------------------------------------------------------------------------- the sensor
@dg.sensor(
    job=hubspot_changes_loop,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New HubSpot webhook events (and deal changes the deal search finds that "
    "webhooks missed) start the downstream loop.",
)
def hubspot_changes_sensor(
    context: dg.SensorEvaluationContext,
    optimizer: OptimizerResource,
    hubspot: HubSpotResource,
    warehouse: WarehouseResource,
) -> dg.SensorResult | dg.SkipReason:
    """One run per tick at most, keyed on the events it covers (see the module docstring)."""
    if _waiting_loop_run(context.instance):
        return dg.SkipReason("a loop run is waiting to start; it will cover the new events")
    cursor = ChangesCursor.load(context.cursor)
    wh, inbox = warehouse.get(), landing_warehouse(warehouse)
    now_ms = _ms(optimizer.now())
    searched = search_ms = None
    if cursor.search_ms is None or cursor.search_ms > now_ms:  # first tick, or a new sandbox
        cursor = replace(cursor, search_ms=now_ms, pending=())
    else:
        searched, search_ms = poll_deal_search(hubspot, cursor.search_ms)
    pending = parse_state_keys(cursor.pending)
    after = None if cursor.received is None else cursor.received - RECEIVED_OVERLAP
    ids = set(pending["deal_id"]) | set([] if searched is None else searched["deal_id"])
    try:
        landing = retry_busy(lambda: landing_since(inbox, after))
        known = retry_busy(lambda: landing_states(inbox, sorted(ids)))
        unexplained = missed_states(pending, known)
        if unexplained.height:  # only now read the warehouse: its writers are Dagster steps
            deals = sorted(set(unexplained["deal_id"]))
            known = pl.concat([known, retry_busy(lambda: snapshot_states(wh, deals))])
    except BUSY_ERRORS as exc:
        return dg.SkipReason(f"warehouse busy ({type(exc).__name__}); the next tick reads it")
    plan = plan_tick(cursor, landing, searched=searched, known=known, search_ms=search_ms)
    if not plan.wants_run:
        return dg.SensorResult(
            skip_reason=f"no new deal changes ({plan.events.height} other events)",
            cursor=plan.cursor.dump(),
        )
    request = dg.RunRequest(run_key=plan.run_key, run_config=plan.run_config(), tags=plan.tags())
    context.log.info(
        f"{plan.events.height} webhook events, {plan.missed.height} missed states -> {plan.run_key}"
    )
    return dg.SensorResult(run_requests=[request], cursor=plan.cursor.dump())


# ----------------------------------------------------------------------------- schedules
def _partition_or_none(day) -> str | None:
    key = day.isoformat()
    return key if daily_partitions.has_partition_key(key) else None


@dg.schedule(
    cron_schedule=HOURLY_CRON,
    job=meta_insights,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Catalog, leads and today's insights (today on the optimizer's clock).",
)
def meta_insights_hourly(
    context: dg.ScheduleEvaluationContext, optimizer: OptimizerResource
) -> dg.RunRequest | dg.SkipReason:
    key = _partition_or_none(optimizer.now().date())
    if key is None:
        return dg.SkipReason("today is outside the daily partitions")
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return dg.RunRequest(run_key=f"insights-{key}-{tick}", partition_key=key)


def repull_range(today) -> tuple[str, str] | None:
    """First and last partition key of the re-pull window ending today (clipped to the
    partitions), or None when today is outside them."""
    last = _partition_or_none(today)
    if last is None:
        return None
    days = [today - timedelta(days=n) for n in range(REPULL_DAYS - 1, -1, -1)]
    keys = [k for k in map(_partition_or_none, days) if k is not None]
    return keys[0], last


@dg.schedule(
    cron_schedule=REPULL_CRON,
    job=meta_insights,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Re-pull the last {REPULL_DAYS} days of insights (Meta revises them) as one run.",
)
def meta_insights_repull(
    context: dg.ScheduleEvaluationContext, optimizer: OptimizerResource
) -> dg.RunRequest | dg.SkipReason:
    window = repull_range(optimizer.now().date())
    if window is None:
        return dg.SkipReason("today is outside the daily partitions")
    first, last = window
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return dg.RunRequest(
        run_key=f"insights-{first}-{last}-{tick}",
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
    )


# ----------------------------------------------------------------------------- automation
# Assets that only need to follow their parents, or a cadence, declare an AutomationCondition
# (defs/learning.py: winner_index, cross_account_patterns, online_learner) instead of a schedule
# or a sensor; ``optimizer_automation``, running by default, evaluates them every 30 s.
optimizer_automation = dg.AutomationConditionSensorDefinition(
    "optimizer_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' AutomationConditions (cadenced rebuilds of the winner "
    "index and cross-account patterns; the online learner after each insights pull).",
)


assets = [hubspot_webhook_deal_states]
jobs = [hubspot_changes_loop, meta_insights]
sensors = [hubspot_changes_sensor, optimizer_automation]
schedules = [meta_insights_hourly, meta_insights_repull]
