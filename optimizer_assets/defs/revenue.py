"""Synthetic revenue (group `revenue`): every deal stage change valued in money.

Stage values per account come from the settings file (``revenue_preset`` + ``stage_values``);
HubSpot stage ids map to preset stages through the pipeline metadata (labels, probability,
isClosed), never through hard-coded ids. Stages that cannot be valued are reported in metadata
and by an asset check, never silently valued at 0.
"""

from datetime import timedelta

import dagster as dg
import polars as pl

from optimizer_assets.defs.resources import HubSpotResource, OptimizerResource, WarehouseResource
from optimizer_assets.domain import revenue as revenue_domain
from optimizer_assets.settings import Settings
from optimizer_assets.warehouse import Warehouse

DAY = timedelta(hours=24)


def read_tables(wh: Warehouse, *names: str) -> list[pl.DataFrame]:
    """Several whole tables through one connection (each DuckDB connect costs ~0.1 s);
    a table that does not exist yet comes back as an empty frame."""
    with wh.connect(read_only=True) as con:
        tables = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        present = {r[0] for r in tables}
        return [
            con.execute(f'SELECT * FROM "{name}"').pl() if name in present else pl.DataFrame()
            for name in names
        ]


def stage_value_table(settings: Settings, pipelines: list[dict]) -> pl.DataFrame:
    """Stage values of every HubSpot pipeline, each valued with its ad account's preset.

    A pipeline named by an account in the settings uses that account's ``revenue_preset`` and
    ``stage_values``; any other pipeline uses the file's defaults.
    """
    owner = settings.pipeline_accounts()
    frames = [pl.DataFrame(schema=revenue_domain.STAGE_VALUES_SCHEMA)]
    for pipeline in pipelines:  # a handful of pipelines, not a hot path
        account_id = owner.get(str(pipeline.get("id")))
        account = settings.for_account(account_id or "0")
        table = revenue_domain.preset_table(account.revenue_preset, account.stage_values)
        frames.append(revenue_domain.map_pipeline_stages([pipeline], preset=table))
    return pl.concat(frames)


def currencies(settings: Settings, account_ids: pl.Series) -> dict[str, str]:
    """Account id -> ISO currency (its settings entry, else the file's default)."""
    ids = set(account_ids.drop_nulls().to_list()) | {a.account_id for a in settings.accounts}
    return {a: settings.for_account(a).currency for a in sorted(ids)}


def md_table(frame: pl.DataFrame, limit: int = 20) -> dg.MetadataValue:
    """A small markdown table for the UI (first ``limit`` rows)."""
    if frame.is_empty():
        return dg.MetadataValue.md("_none_")
    head = frame.head(limit)
    lines = [
        "| " + " | ".join(head.columns) + " |",
        "|" + "---|" * len(head.columns),
        *(
            "| " + " | ".join("" if v is None else _fmt(v) for v in row) + " |"
            for row in head.iter_rows()
        ),
    ]
    if frame.height > limit:
        lines.append(f"\n_{frame.height - limit} more rows_")
    return dg.MetadataValue.md("\n".join(lines))


def _fmt(value: object) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def revenue_metadata(revenue: pl.DataFrame, unknown: pl.DataFrame, now) -> dict:
    """Totals, the last 24 h (one demo day), value per current stage, unknown stages."""
    recent = revenue.filter(pl.col("occurred_at") >= now - DAY, pl.col("occurred_at") < now)
    values = revenue_domain.deal_values(revenue) if revenue.height else pl.DataFrame()
    by_stage = (
        values.group_by("stage")
        .agg(deals=pl.len(), value=pl.col("value").sum())
        .sort("value", descending=True, nulls_last=True)
        if values.height
        else pl.DataFrame()
    )
    return {
        "row_count": revenue.height,
        "deals": values.height,
        "value_total": float(revenue["value_delta"].sum() or 0.0),
        "value_won": float(
            values.filter(pl.col("stage") == "closed_won")["value"].sum() or 0.0
            if values.height
            else 0.0
        ),
        "value_24h": float(recent["value_delta"].sum() or 0.0),
        "events_24h": recent.height,
        "unknown_stages": unknown.height,
        "unknown_stage_events": int(unknown["events"].sum() or 0) if unknown.height else 0,
        "unknown_stage_list": md_table(unknown),
        "value_by_stage": md_table(by_stage),
    }


@dg.asset(
    group_name="revenue",
    kinds={"hubspot", "duckdb"},
    deps=["deal_stage_events", "hubspot_deals"],
    pool="duckdb",
)
def synthetic_revenue(
    optimizer: OptimizerResource, hubspot: HubSpotResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Each stage change worth value(to) - value(from), so a deal sums to its current stage;
    also stores the stage value table (``stage_values``) and ``unknown_stages``."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    with hubspot.client() as client:
        pipelines = client.pipelines()
    stage_values = stage_value_table(settings, pipelines)
    events, deals = read_tables(wh, "deal_stage_events", "hubspot_deals")
    accounts = deals["account_id"] if "account_id" in deals.columns else pl.Series([], dtype=str)
    revenue, unknown = revenue_domain.synthetic_revenue(
        events, stage_values, deals, currency=currencies(settings, accounts)
    )
    wh.replace("stage_values", stage_values)
    wh.replace("synthetic_revenue", revenue)
    wh.replace("unknown_stages", unknown)
    return dg.MaterializeResult(metadata=revenue_metadata(revenue, unknown, now))


@dg.asset_check(asset=synthetic_revenue, description="Every stage a deal reached has a value.")
def stages_are_valued(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Fails (warning) when deals sit in or pass through stages with no value: their money
    would be missing from attribution and CAPI, so the stage needs a mapping or a value."""
    (unknown,) = read_tables(warehouse.get(), "unknown_stages")
    return dg.AssetCheckResult(
        passed=unknown.is_empty(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "unknown_stages": unknown.height,
            "unknown_stage_events": int(unknown["events"].sum() or 0) if unknown.height else 0,
            "unknown_stage_list": md_table(unknown),
        },
    )


assets = [synthetic_revenue]
asset_checks = [stages_are_valued]
