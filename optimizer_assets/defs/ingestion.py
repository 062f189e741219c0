"""Ingestion assets: HubSpot deals, stage events and contacts (group `crm`); the Meta catalog,
lead-form leads and daily insights (group `ads`). Each run is idempotent: re-running a window
adds nothing new, and re-materializing an insights day replaces that day only."""

import itertools
import warnings
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
from pydantic import Field

from optimizer_assets.clients.graph import AD_FIELDS_WITH_TRAITS
from optimizer_assets.defs.partitions import daily_partitions
from optimizer_assets.defs.resources import (
    HubSpotResource,
    MetaResource,
    OptimizerResource,
    WarehouseResource,
)
from optimizer_assets.domain import ads as ads_domain
from optimizer_assets.domain import crm
from optimizer_assets.settings import AccountSettings

# re-read a little of the previous window: late-indexed changes are caught, duplicates dropped
OVERLAP = timedelta(minutes=15)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ALL_STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED")
# insights runs covering more days than this use one async report run per account: the hourly
# (1 day) and re-pull (3 days) runs stay synchronous, a 30-day backfill does not
INSIGHTS_REPORT_RUN_AFTER_DAYS = 7
# deals stored per warehouse write in `hubspot_deals` (progress is logged after each)
DEAL_CHUNK = 20_000
# deals per chunk in `hubspot_contacts` (associations, then their new contacts, stored per chunk;
# a multiple of HubSpot's 100-id batch reads)
CONTACT_DEAL_CHUNK = 20_000


def _ms(moment: datetime) -> int:
    return int((moment - EPOCH) / timedelta(milliseconds=1))


def _watermark(warehouse, table: str, column: str) -> datetime:
    """Newest ``column`` stored in ``table`` minus the overlap; the epoch when empty."""
    if not warehouse.has_table(table):
        return EPOCH
    latest = warehouse.query(f'SELECT max("{column}") AS m FROM "{table}"')["m"][0]
    return EPOCH if latest is None else latest - OVERLAP


def managed_accounts(optimizer: OptimizerResource, meta: MetaResource) -> list[AccountSettings]:
    """The accounts of the settings file, else every ad account the token can see."""
    settings = optimizer.settings()
    if settings.accounts:
        return list(settings.accounts)
    with meta.graph() as graph:
        rows = graph.ad_accounts()
    return [settings.for_account(r["account_id"], name=r.get("name") or "") for r in rows]


@dg.asset(group_name="crm", kinds={"hubspot", "duckdb"}, pool="duckdb")
def hubspot_deals(
    context: dg.AssetExecutionContext,
    optimizer: OptimizerResource,
    hubspot: HubSpotResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """The current state of every deal (upserted), plus each newly observed state in
    ``hubspot_deal_snapshots`` from which stage transitions are derived."""
    wh, now = warehouse.get(), optimizer.now()
    since = _watermark(wh, "hubspot_deal_snapshots", "updated_at")
    accounts = optimizer.settings().pipeline_accounts()
    fetched = new_states = 0
    unmapped: set[str] = set()
    with hubspot.client() as client:
        # The search yields deals by ascending hs_lastmodifieddate, so each stored chunk moves the
        # watermark forward: a crash loses at most one chunk, and the next run resumes there.
        found = client.search_deals_modified(_ms(since), _ms(now))
        while records := list(itertools.islice(found, DEAL_CHUNK)):
            deals = crm.deals_frame(records, accounts)
            wh.upsert("hubspot_deals", deals, ["deal_id"])
            new_states += wh.append_new(
                "hubspot_deal_snapshots", deals, ["deal_id", "updated_at", "dealstage"]
            ).height
            fetched += deals.height
            unmapped.update(deals.filter(pl.col("account_id").is_null())["pipeline"].unique())
            context.log.info(
                f"hubspot_deals: {fetched:,} deals stored, modified up to "
                f"{deals['updated_at'].max()}, {client.request_count:,} HTTP requests"
            )
        http_requests = client.request_count
    if unmapped:
        context.log.warning(f"deals in pipelines not mapped to an ad account: {sorted(unmapped)}")
    return dg.MaterializeResult(
        metadata={
            "row_count": wh.query("SELECT count(*) AS n FROM hubspot_deals")["n"][0],
            "fetched": fetched,
            "new_states": new_states,
            "unmapped_pipelines": len(unmapped),
            "http_requests": http_requests,
            "window_start": dg.MetadataValue.timestamp(since),
            "window_end": dg.MetadataValue.timestamp(now),
        }
    )


@dg.asset(
    group_name="crm",
    kinds={"duckdb"},
    deps=[hubspot_deals, "hubspot_webhook_deal_states"],  # both fill hubspot_deal_snapshots
    pool="duckdb",
)
def deal_stage_events(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Deduplicated stage entries (deal, to, occurred_at), one row each; a late-arriving
    earlier state corrects the ``from_stage`` of the stored entry after it, never adds one."""
    wh = warehouse.get()
    events = crm.stage_events(wh.read("hubspot_deal_snapshots"))
    stored = wh.read("deal_stage_events")
    new = events if stored.is_empty() else events.join(stored, on="event_key", how="anti")
    corrected = (
        events.join(stored.select("event_key", "from_stage"), on="event_key", suffix="_stored")
        .filter(pl.col("from_stage").ne_missing(pl.col("from_stage_stored")))
        .drop("from_stage_stored")
        if stored.height
        else events.clear()
    )
    wh.upsert("deal_stage_events", pl.concat([new, corrected]), ["event_key"])
    metadata = {
        "row_count": wh.query("SELECT count(*) AS n FROM deal_stage_events")["n"][0],
        "new_events": new.height,
        "corrected_events": corrected.height,
    }
    if new.height:
        metadata["window_start"] = dg.MetadataValue.timestamp(new["occurred_at"].min())
        metadata["window_end"] = dg.MetadataValue.timestamp(new["occurred_at"].max())
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(group_name="crm", kinds={"hubspot", "duckdb"}, deps=[hubspot_deals], pool="duckdb")
def hubspot_contacts(
    context: dg.AssetExecutionContext,
    optimizer: OptimizerResource,
    hubspot: HubSpotResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Contacts behind the deals, identities hashed at ingestion; click ids and UTMs parsed.

    Works in chunks of ``CONTACT_DEAL_CHUNK`` deals: their associations are stored, then the
    contacts not stored yet are read and stored, and progress is logged; only one chunk's
    contact records are held in memory. Contacts of associations stored by an earlier run whose
    records were never stored (a crash between the two writes) are read first.
    """
    wh, settings = warehouse.get(), optimizer.settings()
    deals = wh.read("hubspot_deals").select("deal_id", "account_id")
    known = wh.read("deal_contacts")
    todo = deals if known.is_empty() else deals.join(known, on="deal_id", how="anti")
    stored = wh.read("hubspot_contacts")
    # ids only (not records): contacts already stored, or asked for in this run
    seen: set[str] = set() if stored.is_empty() else set(stored["contact_id"].to_list())
    del stored
    leftover = (
        known.join(deals, on="deal_id", how="left").filter(~pl.col("contact_id").is_in(list(seen)))
        if known.height
        else None
    )
    new_associations = new_contacts = with_click_id = chunks = 0

    def store_contacts(client, links: pl.DataFrame) -> None:
        """Read and store the not yet seen contacts of (contact_id, account_id) links."""
        nonlocal new_contacts, with_click_id
        links = links.unique("contact_id", keep="first", maintain_order=True)
        fresh = [c not in seen for c in links["contact_id"].to_list()]
        needed = links.filter(pl.Series(fresh, dtype=pl.Boolean))
        if needed.is_empty():
            return
        seen.update(needed["contact_id"].to_list())
        country = {
            c: settings.for_account(a).default_country
            if a
            else settings.defaults["default_country"]
            for c, a in needed.select("contact_id", "account_id").iter_rows()
        }
        contacts = crm.contacts_frame(client.read_contacts(needed["contact_id"].to_list()), country)
        wh.upsert("hubspot_contacts", contacts, ["contact_id"])
        new_contacts += contacts.height
        with_click_id += int(contacts["fbclid"].is_not_null().sum())

    with hubspot.client() as client:
        if leftover is not None:
            for start in range(0, leftover.height, CONTACT_DEAL_CHUNK):
                store_contacts(client, leftover.slice(start, CONTACT_DEAL_CHUNK))
        for start in range(0, todo.height, CONTACT_DEAL_CHUNK):
            chunk = todo["deal_id"].slice(start, CONTACT_DEAL_CHUNK).to_list()
            pairs = client.deal_contact_ids(chunk)
            new_associations += wh.append_new(
                "deal_contacts", pairs, ["deal_id", "contact_id"]
            ).height
            store_contacts(
                client, pairs.join(deals, on="deal_id", how="left", maintain_order="left")
            )
            chunks += 1
            context.log.info(
                f"hubspot_contacts: {start + len(chunk):,} of {todo.height:,} deals done, "
                f"{new_associations:,} associations and {new_contacts:,} contacts stored, "
                f"{client.request_count:,} HTTP requests"
            )
        http_requests = client.request_count
    if not wh.has_table("hubspot_contacts"):  # downstream reads the table even when empty
        wh.upsert("hubspot_contacts", crm.contacts_frame([], {}), ["contact_id"])
    return dg.MaterializeResult(
        metadata={
            "row_count": wh.query("SELECT count(*) AS n FROM hubspot_contacts")["n"][0],
            "new_contacts": new_contacts,
            "new_associations": new_associations,
            "with_click_id": with_click_id,
            "chunks": chunks,
            "http_requests": http_requests,
        }
    )


@dg.asset(group_name="ads", kinds={"meta", "duckdb"}, pool="duckdb")
def meta_ads(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The catalog: campaign, ad set, ad, creative traits and copy, budget, status."""
    frames = []
    with meta.graph() as graph:
        for account in managed_accounts(optimizer, meta):
            aid = account.account_id
            frames.append(
                ads_domain.catalog_frame(
                    graph.campaigns(aid, effective_status=ALL_STATUSES),
                    graph.adsets(aid, effective_status=ALL_STATUSES),
                    graph.ads(aid, fields=AD_FIELDS_WITH_TRAITS, effective_status=ALL_STATUSES),
                )
            )
        http_requests = graph.request_count
    catalog = pl.concat(frames) if frames else pl.DataFrame(schema=ads_domain.META_ADS_SCHEMA)
    warehouse.get().replace("meta_ads", catalog)
    return dg.MaterializeResult(
        metadata={
            "row_count": catalog.height,
            "accounts": len(frames),
            "active_ads": catalog.filter(pl.col("ad_status") == "ACTIVE").height,
            "http_requests": http_requests,
        }
    )


@dg.asset(group_name="ads", kinds={"meta", "duckdb"}, deps=[meta_ads], pool="duckdb")
def meta_leads(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Lead-form leads with their ad and lead id, identities hashed at ingestion."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    since = _watermark(wh, "meta_leads", "created_at")
    forms = wh.read("meta_ads").filter(pl.col("form_id").is_not_null())
    forms = forms.select("account_id", "form_id").unique(maintain_order=True)
    frames = []
    with meta.graph() as graph:
        for account_id, form_id in forms.iter_rows():
            leads = graph.leads(
                form_id, since=None if since == EPOCH else since, account_id=account_id
            )
            country = settings.for_account(account_id).default_country
            frames.append(ads_domain.leads_frame(leads, account_id, country))
        http_requests = graph.request_count
    leads = pl.concat(frames) if frames else pl.DataFrame(schema=ads_domain.LEADS_SCHEMA)
    new = wh.append_new("meta_leads", leads, ["lead_id"])
    return dg.MaterializeResult(
        metadata={
            "row_count": wh.query("SELECT count(*) AS n FROM meta_leads")["n"][0],
            "fetched": leads.height,
            "new_leads": new.height,
            "forms": forms.height,
            "http_requests": http_requests,
            "window_start": dg.MetadataValue.timestamp(since),
            "window_end": dg.MetadataValue.timestamp(now),
        }
    )


class InsightsConfig(dg.Config):
    """Run config of ``meta_ad_insights``."""

    report_run_after_days: int = Field(
        default=INSIGHTS_REPORT_RUN_AFTER_DAYS,
        ge=0,
        description="Runs covering more days than this read each account's insights through one "
        "async report run (start, poll until 'Job Completed', page the results); shorter runs "
        "page the synchronous insights edge. Both store the same rows.",
    )


# BackfillPolicy.single_run() is a beta parameter of @asset in dagster 1.13 (BetaWarning at load),
# yet `dagster asset materialize --partition-range` refuses ranges without it (dagster/_cli/asset.py
# in 1.13.27), and the insights re-pull schedule launches ranged runs: silence exactly that warning.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"Parameter `backfill_policy` of function `asset` is currently in beta",
        category=dg.BetaWarning,
    )

    @dg.asset(
        group_name="ads",
        kinds={"meta", "duckdb"},
        partitions_def=daily_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="duckdb",
    )
    def meta_ad_insights(
        context: dg.AssetExecutionContext,
        config: InsightsConfig,
        optimizer: OptimizerResource,
        meta: MetaResource,
        warehouse: WarehouseResource,
    ) -> dg.MaterializeResult:
        """Daily ad-level insights; re-materializing a day replaces that day only. A backfill runs
        as one run over its whole range; past ``report_run_after_days`` days each account is read
        through one async report run instead of paging the synchronous edge."""
        window = context.partition_time_window
        since, until = window.start.date(), (window.end - timedelta(days=1)).date()
        days = [since + timedelta(days=i) for i in range((until - since).days + 1)]
        report_run = len(days) > config.report_run_after_days
        frames = []
        with meta.graph() as graph:
            accounts = managed_accounts(optimizer, meta)
            for account in accounts:
                raw = graph.insights(
                    account.account_id,
                    since,
                    until,
                    report_run=report_run,
                    on_progress=lambda s, a=account.account_id: context.log.info(
                        f"account {a}: insights report run {s.report_run_id} {s.async_status} "
                        f"({s.percent_completion}%, {s.elapsed_s:.0f} s)"
                    ),
                )
                frames.append(ads_domain.insights_rows(raw, account.account_id))
            http_requests = graph.request_count
        rows = pl.concat(frames) if frames else pl.DataFrame(schema=ads_domain.INSIGHTS_SCHEMA)
        warehouse.get().replace_where("meta_ad_insights", rows, "date", days)
        return dg.MaterializeResult(
            metadata={
                "row_count": rows.height,
                "days": len(days),
                "spend": float(rows["spend"].sum()),
                "clicks": int(rows["clicks"].sum()),
                "impressions": int(rows["impressions"].sum()),
                "http_requests": http_requests,
                "report_runs": len(accounts) if report_run else 0,
                "window_start": dg.MetadataValue.timestamp(window.start),
                "window_end": dg.MetadataValue.timestamp(window.end),
            }
        )


assets = ingestion_assets = [
    hubspot_deals,
    deal_stage_events,
    hubspot_contacts,
    meta_ads,
    meta_leads,
    meta_ad_insights,
]
