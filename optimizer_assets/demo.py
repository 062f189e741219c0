"""`make demo`: the loop on the embedded sandbox, one simulated day at a time, then a table.

The sandbox runs in this process behind real loopback HTTP; every asset runs through Dagster
(in-process materialization against a temporary local instance) and the production clients.
The final tables compare what the world did (sandbox truth) with what the warehouse ingested.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import requests

from optimizer_assets.instance import REPO_ROOT
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.settings_file import settings_yaml
from optimizer_assets.sandbox.world import META_TOKEN, World, WorldConfig
from optimizer_assets.warehouse import Warehouse

DEMO_WAREHOUSE = REPO_ROOT / "data" / "demo.duckdb"


def _table(frame: pl.DataFrame) -> str:
    with pl.Config(
        tbl_rows=200,
        tbl_cols=30,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_formatting="ASCII_MARKDOWN",
        fmt_str_lengths=40,
        tbl_width_chars=250,
        thousands_separator=",",
        float_precision=2,
    ):
        return str(frame)


def _materialize(assets, resources, instance, **kwargs) -> dict[str, dict]:
    result = dg.materialize(
        assets, resources=resources, instance=instance, raise_on_error=True, **kwargs
    )
    return {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def _stage_labels(world: World) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "pipeline": p["id"],
                "dealstage": s["id"],
                "stage": s["label"],
                "order": s["displayOrder"],
            }
            for p in world.pipelines()
            for s in p["stages"]
        ]
    )


def world_table(world: World) -> pl.DataFrame:
    """Per account: what the sandbox world really did (spend, clicks, leads, deals per stage)."""
    accounts = world.accounts().select("account_id", "name", "hubspot_pipeline_id")
    start, end = world.config.start.date(), (world.now - timedelta(seconds=1)).date()
    insights = pl.concat([world.insights(a, start, end) for a in accounts["account_id"]])
    spend = insights.group_by("account_id").agg(
        pl.col("spend").sum(),
        pl.col("impressions").sum(),
        pl.col("clicks").sum(),
        pl.col("leads").sum(),
    )
    labels = _stage_labels(world)
    deals = world.deals().join(labels, on=["pipeline", "dealstage"], how="left")
    per_stage = (
        deals.join(accounts, left_on="pipeline", right_on="hubspot_pipeline_id")
        .group_by("account_id", "stage")
        .len()
        .pivot(on="stage", index="account_id", values="len")
        .fill_null(0)
    )
    stage_order = labels.sort("order")["stage"].unique(maintain_order=True).to_list()
    table = accounts.select("account_id", "name").join(spend, on="account_id", how="left")
    table = table.join(per_stage, on="account_id", how="left").fill_null(0)
    missing = [pl.lit(0, pl.UInt32).alias(s) for s in stage_order if s not in table.columns]
    return table.with_columns(missing).select(
        "account_id", "name", "spend", "impressions", "clicks", "leads", *stage_order
    )


def ingested_table(wh: Warehouse) -> pl.DataFrame:
    """Per account: rows the ingestion assets put in the warehouse."""
    return wh.query(
        """
        WITH ads AS (SELECT account_id, count(*) AS ads FROM meta_ads GROUP BY 1),
        ins AS (SELECT account_id, count(*) AS insight_rows, round(sum(spend), 2) AS spend,
                       sum(clicks) AS clicks FROM meta_ad_insights GROUP BY 1),
        leads AS (SELECT account_id, count(*) AS lead_form_leads FROM meta_leads GROUP BY 1),
        deals AS (SELECT account_id, count(*) AS deals FROM hubspot_deals GROUP BY 1),
        ev AS (SELECT account_id, count(*) AS stage_events FROM deal_stage_events GROUP BY 1),
        con AS (SELECT d.account_id, count(DISTINCT c.contact_id) AS contacts,
                       count(DISTINCT c.contact_id) FILTER (WHERE c.fbclid IS NOT NULL)
                           AS with_fbclid
                FROM hubspot_contacts c JOIN deal_contacts dc USING (contact_id)
                JOIN hubspot_deals d USING (deal_id) GROUP BY 1)
        SELECT * FROM ads LEFT JOIN ins USING (account_id) LEFT JOIN leads USING (account_id)
        LEFT JOIN deals USING (account_id) LEFT JOIN ev USING (account_id)
        LEFT JOIN con USING (account_id) ORDER BY account_id
        """
    )


# per simulated day, one line: (asset, metadata key, label, format); stages add theirs here
DAY_COLUMNS = [
    ("meta_ad_insights", "spend", "spend $", "{:>9,.2f}"),
    ("meta_ad_insights", "clicks", "clicks", "{:>6,}"),
    ("meta_leads", "new_leads", "new form leads", "{:>4}"),
    ("deal_stage_events", "new_events", "new stage events", "{:>4}"),
    ("hubspot_deals", "row_count", "deals", "{:>5}"),
    ("ad_change_log", "applied", "changes applied", "{:>3}"),
    ("ad_change_log", "http_requests", "API calls", "{:>3}"),
    ("synthetic_revenue", "value_24h", "revenue $", "{:>8,.0f}"),
    ("attributed_revenue", "value_24h_layer1", "L1 $", "{:>7,.0f}"),
    ("attributed_revenue", "value_24h_layer2", "L2 $", "{:>6,.0f}"),
    ("attributed_revenue", "value_24h_layer3", "L3 $", "{:>7,.0f}"),
    ("attributed_revenue", "recovery", "recovery", "{:.1%}"),
    ("attributed_revenue", "precision_l12", "precision L1-2", "{:.1%}"),
    ("capi_uploads", "events_sent", "CAPI sent", "{:>3}"),
    ("capi_uploads", "accepted", "accepted", "{:>3}"),
    ("ad_scores", "scale", "scale", "{:>2}"),
    ("ad_scores", "kill", "kill", "{:>2}"),
    ("budget_recommendations", "spend_shifted", "budget shifted $", "{:>7,.2f}"),
    ("online_learner", "drifts_detected", "drifts detected", "{:>2}"),
    ("winner_index", "winners", "winners", "{:>3}"),
]


def _day_line(day_index: int, day, meta: dict[str, dict]) -> str:
    parts = []
    for asset, key, label, fmt in DAY_COLUMNS:
        value = meta.get(asset, {}).get(key)
        parts.append(f"{label} {fmt.format(value) if value is not None else '-'}")
    return f"day {day_index + 1:>2} {day}: " + "  ".join(parts)


def report_sections(world: World, wh: Warehouse) -> list[tuple[str, pl.DataFrame]]:
    """The final tables: the world's truth, then each stage's own report (``demo_report``)."""
    from optimizer_assets import definitions

    sections = [
        ("What the world did (sandbox truth), per account", world_table(world)),
        ("What the ingestion assets stored in the warehouse, per account", ingested_table(wh)),
    ]
    for module in definitions._modules:
        report = getattr(module, "demo_report", None)
        if report is not None:
            sections += report(world, wh)
    return sections


def run_demo(days: int = 30, seed: int = 7, warehouse_path: Path = DEMO_WAREHOUSE) -> None:
    """Run ``days`` simulated days on a fresh sandbox and print what happened."""
    started = time.perf_counter()
    world = World(WorldConfig(seed=seed))
    for path in (warehouse_path, Path(f"{warehouse_path}.wal")):
        path.unlink(missing_ok=True)
    with SandboxServer(world=world) as server, tempfile.TemporaryDirectory() as tmp:
        accounts_file = Path(tmp) / "accounts.yaml"
        accounts_file.write_text(settings_yaml(world.accounts()))
        os.environ.update(
            OPTIMIZER_MODE="sandbox",
            OPTIMIZER_SANDBOX_URL=server.base_url,
            OPTIMIZER_ACCOUNTS_FILE=str(accounts_file),
            OPTIMIZER_WAREHOUSE=str(warehouse_path),
        )
        from optimizer_assets.definitions import loop_assets, loop_checks
        from optimizer_assets.defs.resources import build_resources

        resources = build_resources()
        print(
            f"sandbox seed {seed}: {world.accounts().height} accounts, {world.ads().height} ads, "
            f"serving on {server.base_url}; running {days} simulated days through Dagster\n",
            flush=True,
        )
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {META_TOKEN}"
        with dg.instance_for_test(temp_dir=tmp) as instance:
            for day_index in range(days):
                day = world.now.date()
                advance = f"{server.base_url}/_sandbox/advance"
                session.post(advance, json={"hours": 24}, timeout=60).raise_for_status()
                # checks run too: a blocking one stops the uploads or changes behind it
                loop = [*loop_assets, *loop_checks]
                meta = _materialize(loop, resources, instance, partition_key=day.isoformat())
                print(_day_line(day_index, day, meta), flush=True)
        for title, frame in report_sections(world, Warehouse(warehouse_path)):
            print(f"\n{title}:\n")
            print(_table(frame))
    from optimizer_assets.bench import learning_regret

    print(
        "\nLearning: regret difference each learner makes (in-process sandbox worlds, "
        "`python -m optimizer_assets.bench learning_regret --quick`; 2 seeds, a smoke run: "
        "the README has the 16-seed table):\n"
    )
    print(learning_regret.main(quick=True), flush=True)
    print(f"\nwarehouse: {warehouse_path}  ({time.perf_counter() - started:.0f} s)")
