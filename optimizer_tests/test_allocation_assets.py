"""Allocation assets end to end on a small sandbox: ad_performance -> ad_scores ->
budget_recommendations, plus the pure pieces of domain/performance.py they rely on."""

from __future__ import annotations

import datetime as dt
import shutil

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from optimizer_assets.defs import allocation, attribution, ingestion, revenue
from optimizer_assets.defs.resources import WarehouseResource, build_resources
from optimizer_assets.domain import performance
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.settings_file import account_entries
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fixtures_sandbox import sandbox_world

KILL_LINE = 40.0  # account A's settings: a kill line far above the default 0.5
ALLOCATION = [*allocation.assets, *allocation.asset_checks]
UPSTREAM = [
    *[a for a in ingestion.assets if a.key.path[0] != "meta_ad_insights"],
    *revenue.assets,
    *attribution.assets,
]
INSIGHTS = [a for a in ingestion.assets if a.key.path[0] == "meta_ad_insights"]


def _run(assets, resources, **kwargs) -> tuple[dict[str, dict], dict[str, bool]]:
    result = dg.materialize(
        assets, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kwargs
    )
    assert result.success
    meta = {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return meta, checks


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Sandbox (2 accounts x 12 ads, 12 days), ingestion + revenue + attribution, then the
    allocation assets once. Account A has a high kill line in its ``sampler:`` settings."""
    tmp = tmp_path_factory.mktemp("allocation")
    world = sandbox_world()
    entries = account_entries(world.accounts())
    entries[0]["sampler"] = {
        "kill_roas": KILL_LINE,
        "ignorance_days": 0,
        "ignorance_spend": 0,
        "kill_min_spend": 50,
    }
    accounts_file = tmp / "accounts.yaml"
    accounts_file.write_text(yaml.safe_dump({"defaults": {}, "accounts": entries}))
    with SandboxServer(world=world) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTIMIZER_MODE", "sandbox")
        mp.setenv("OPTIMIZER_SANDBOX_URL", server.base_url)
        mp.setenv("OPTIMIZER_ACCOUNTS_FILE", str(accounts_file))
        mp.setenv("OPTIMIZER_WAREHOUSE", str(tmp / "warehouse.duckdb"))
        resources = build_resources()
        first, last = world.config.start.date(), world.now.date() - dt.timedelta(days=1)
        _run(
            INSIGHTS,
            resources,
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
        _run(UPSTREAM, resources)
        meta, checks = _run(ALLOCATION, resources)
        yield {
            "server": server,
            "resources": resources,
            "wh": Warehouse(tmp / "warehouse.duckdb"),
            "meta": meta,
            "checks": checks,
            "account_a": entries[0]["account_id"],
            "tmp": tmp,
        }


def _live_adsets(world) -> pl.DataFrame:
    """Active ad sets that have an active ad: the budgets the allocator controls."""
    ads = world.ads().filter(pl.col("status") == "ACTIVE").select("adset_id").unique()
    return world.adsets().filter(pl.col("status") == "ACTIVE").join(ads, on="adset_id")


def test_performance_has_one_row_per_live_ad_with_value_and_lag(loop):
    world, wh = loop["server"].world, loop["wh"]
    perf = wh.read("ad_performance")
    live = (
        world.ads()
        .filter(pl.col("status") == "ACTIVE")
        .join(_live_adsets(world).select("adset_id"), on="adset_id")
    )
    assert set(perf["ad_id"]) == set(live["ad_id"])
    assert perf["ad_id"].is_unique().all()
    assert set(performance.PERFORMANCE_COLUMNS) <= set(perf.columns)
    assert perf["pipeline_value"].sum() > 0  # attributed revenue reached the ads
    assert (perf["matured_spend"] <= perf["spend"] + 1e-9).all()
    assert perf["age_hours"].min() > 0
    cdf = wh.read("value_lag_cdf").sort("lag_days")["cdf"]
    assert (cdf.diff().drop_nulls() >= -1e-12).all() and cdf[-1] == 1.0
    assert cdf[0] < 1.0  # some value arrives days after the click: a lag was found
    assert loop["meta"]["ad_performance"]["value_source"] == "attributed_revenue"


def test_budgets_conserved_floors_respected_killed_ads_get_nothing(loop):
    world, wh = loop["server"].world, loop["wh"]
    recs, scores = wh.read("budget_recommendations"), wh.read("ad_scores")
    expected = _live_adsets(world).group_by("account_id").agg(pl.col("daily_budget").sum())
    totals = recs.group_by("account_id").agg(
        pl.col("current_budget").sum(), pl.col("recommended_budget").sum()
    )
    joined = totals.join(expected, on="account_id")
    assert joined.height == world.accounts().height
    assert (joined["recommended_budget"] == joined["current_budget"]).all()
    assert (joined["current_budget"] == joined["daily_budget"]).all()
    # each ad set's recommendation is the sum of its ads' budgets
    sums = scores.group_by("adset_id").agg(pl.col("budget_minor").sum())
    both = recs.join(sums, on="adset_id")
    assert (both["recommended_budget"] == both["budget_minor"]).all()
    minimum = world.config.min_daily_budget
    alive = recs.filter(pl.col("action") != "kill")
    assert (alive["recommended_budget"] >= minimum).all()
    assert (recs["min_budget"] == minimum).all()
    killed = scores.filter(pl.col("action") == "kill")
    assert killed.height > 0, "account A's kill line should kill its weakest ads"
    assert (killed["budget"] == 0).all() and (killed["budget_minor"] == 0).all()
    assert (killed["account_id"] == loop["account_a"]).all()
    assert killed["reason"].str.contains("40.0 kill line").all()
    assert set(scores["action"]) <= {"scale", "hold", "reduce", "kill"}
    assert scores["confidence"].is_between(0, 1).all()
    assert not any(scores.select(pl.col(pl.Float64).is_nan().any()).row(0))
    assert loop["checks"] == {"budgets_are_consistent": True}


def test_metadata_counts_actions_and_shows_top_movers(loop):
    meta, scores = loop["meta"], loop["wh"].read("ad_scores")
    m = meta["ad_scores"]
    assert sum(m[a] for a in ("scale", "hold", "reduce", "kill")) == scores.height
    assert m["kill"] == scores.filter(pl.col("action") == "kill").height
    assert m["spend_shifted"] > 0 and isinstance(m["expected_value_gain"], float)
    assert m["top_movers"].startswith("| account_id | ad_id |")
    r = meta["budget_recommendations"]
    assert r["spend_shifted"] >= 0 and "| adset_id |" in r["top_movers"]
    # the demo's per-day line reads these keys
    from optimizer_assets.demo import DAY_COLUMNS

    for asset, key, *_ in DAY_COLUMNS:
        if asset in meta:
            assert key in meta[asset], f"{asset} has no metadata {key!r} for the demo line"


def test_rerun_agrees_and_never_reads_sandbox_truth(loop, monkeypatch):
    world, wh = loop["server"].world, loop["wh"]
    before = {t: wh.read(t) for t in ("ad_performance", "ad_scores", "budget_recommendations")}

    def refuse(*args, **kwargs):
        raise AssertionError("the allocation assets must not read sandbox truth")

    for name in ("truth_contacts", "truth_deals", "truth_ads_daily", "truth_drifts"):
        monkeypatch.setattr(world, name, refuse)
    _run(ALLOCATION, loop["resources"])
    for table, frame in before.items():
        assert wh.read(table).equals(frame), f"{table} changed on a re-run at the same moment"
    history = wh.read("ad_score_history")
    assert history.height == before["ad_scores"].height  # same moment: replaced, not appended


def test_missing_attribution_counts_as_zero_value(loop):
    tmp, resources = loop["tmp"], dict(loop["resources"])
    path = tmp / "no_attribution.duckdb"
    shutil.copy(tmp / "warehouse.duckdb", path)
    wh = Warehouse(path)
    with wh.connect() as con:
        for table in ("attributed_revenue", "synthetic_revenue", "ad_scores", "ad_performance"):
            con.execute(f'DROP TABLE IF EXISTS "{table}"')
    resources["warehouse"] = WarehouseResource(path=str(path))
    meta, checks = _run(ALLOCATION, resources)
    assert meta["ad_performance"]["value_source"].startswith("missing")
    assert wh.read("ad_performance")["pipeline_value"].sum() == 0
    recs = wh.read("budget_recommendations")
    assert recs["recommended_budget"].sum() == recs["current_budget"].sum()
    assert checks == {"budgets_are_consistent": True}


def test_score_history_keeps_the_retention_window_and_reports_what_it_removed(loop):
    """Runs scored more than HISTORY_RETENTION_DAYS before now are deleted by ad_scores (counts
    in its metadata); newer runs and the current one stay; a second run removes nothing."""
    tmp, resources = loop["tmp"], dict(loop["resources"])
    path = tmp / "history_retention.duckdb"
    shutil.copy(tmp / "warehouse.duckdb", path)
    wh = Warehouse(path)
    current = wh.read(allocation.HISTORY)
    (now,) = current["scored_at"].unique().to_list()
    keep = allocation.HISTORY_RETENTION_DAYS
    ages = {"old": [keep + 30, keep + 1], "kept": [keep - 1, 1]}
    seeded = pl.concat(
        current.with_columns(
            scored_at=pl.lit(now - dt.timedelta(days=d)).cast(pl.Datetime("us", "UTC"))
        )
        for d in ages["old"] + ages["kept"]
    )
    wh.replace(allocation.HISTORY, pl.concat([seeded, current], how="vertical_relaxed"))
    resources["warehouse"] = WarehouseResource(path=str(path))
    meta, _ = _run(ALLOCATION, resources)
    scores = meta["ad_scores"]
    assert scores["history_runs_removed"] == 2
    assert scores["history_rows_removed"] == 2 * current.height
    history = wh.read(allocation.HISTORY)
    left = sorted(history["scored_at"].unique().to_list())
    assert left == sorted([now - dt.timedelta(days=d) for d in ages["kept"]] + [now])
    assert history.height == 3 * current.height
    again, _ = _run(ALLOCATION, resources)
    assert again["ad_scores"]["history_runs_removed"] == 0
    assert wh.read(allocation.HISTORY).height == history.height


# ------------------------------------------------------------------ pure domain pieces


def _scores(budgets: list[int], actions: list[str], adsets: list[str]) -> pl.DataFrame:
    n = len(budgets)
    return pl.DataFrame(
        {
            "account_id": ["1"] * n,
            "adset_id": adsets,
            "ad_id": [f"a{i}" for i in range(n)],
            "budget_minor": budgets,
            "action": actions,
            "adset_min_budget_minor": [500] * n,
            "min_budget": [1.25] * n,
            "currency_offset": [100] * n,
        }
    )


def test_floor_repair_tops_up_a_partly_killed_ad_set_from_the_others():
    # set s1 lost two ads to kills: 2 x 130 = 260 < 500; s2 and s3 have headroom
    scores = _scores(
        [130, 130, 0, 0, 3000, 1000, 700, 700],
        ["hold", "hold", "kill", "kill", "scale", "hold", "hold", "reduce"],
        ["s1", "s1", "s1", "s1", "s2", "s2", "s3", "s3"],
    )
    fixed = performance.enforce_adset_floors(scores)
    per_set = dict(fixed.group_by("adset_id").agg(pl.col("budget_minor").sum()).iter_rows())
    assert per_set["s1"] == 500
    assert sum(per_set.values()) == scores["budget_minor"].sum()
    assert per_set["s2"] < 4000 and per_set["s3"] < 1400
    assert fixed.filter(pl.col("action") == "kill")["budget_minor"].to_list() == [0, 0]
    assert fixed["floor_adjustment_minor"].sum() == 0
    assert (fixed["budget_minor"] >= 0).all()


def test_an_ad_set_whose_ads_are_all_killed_is_recommended_zero_and_kill():
    scores = _scores(
        [0, 0, 2000, 2000], ["kill", "kill", "scale", "hold"], ["s1", "s1", "s2", "s2"]
    )
    scores = performance.enforce_adset_floors(scores).with_columns(
        pl.lit("10").alias("campaign_id"),
        pl.lit("USD").alias("currency"),
        pl.col("budget_minor").truediv(100).alias("budget"),
        pl.Series("current_budget", [10.0, 10.0, 10.0, 10.0]),
        pl.lit("why").alias("reason"),
        pl.lit(0.8).alias("confidence"),
    )
    perf = scores.select(
        "ad_id",
        "adset_id",
        pl.Series("adset_budget_minor", [2000, 2000, 2000, 2000]),
        "adset_min_budget_minor",
        "currency_offset",
    )
    now = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    recs = performance.budget_recommendations(scores, perf, now=now)
    s1 = recs.filter(pl.col("adset_id") == "s1").row(0, named=True)
    assert (s1["action"], s1["recommended_budget"], s1["ads_killed"]) == ("kill", 0, 2)
    assert s1["reason"].startswith("Kill: all 2 ads are killed")
    s2 = recs.filter(pl.col("adset_id") == "s2").row(0, named=True)
    assert (s2["action"], s2["recommended_budget"]) == ("scale", 4000)
    assert recs["recommended_budget"].sum() == recs["current_budget"].sum()


def test_rng_is_seeded_by_account_and_moment():
    now = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    draw = lambda a, t: performance.account_rng(a, t).random(3)  # noqa: E731
    assert np.array_equal(draw("1", now), draw("1", now))
    assert not np.array_equal(draw("1", now), draw("2", now))
    assert not np.array_equal(draw("1", now), draw("1", now + dt.timedelta(hours=1)))


def test_truth_report_measures_budget_on_the_truly_best_quarter():
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    ads = [f"a{i}" for i in range(8)]
    truth = pl.DataFrame(
        {
            "date": [start.date()] * 8 + [(start + dt.timedelta(days=7)).date()] * 8,
            "ad_id": ads * 2,
            "true_value_per_impression": [float(i) for i in range(8)] * 2,
        }
    )
    even = [1.0] * 8
    best = [0.0] * 6 + [4.0, 4.0]  # all budget on the two truly best ads (a6, a7)
    history = pl.DataFrame(
        {
            "scored_at": [start + dt.timedelta(days=1)] * 8 + [start + dt.timedelta(days=8)] * 8,
            "account_id": ["1"] * 16,
            "ad_id": ads * 2,
            "budget": even + best,
            "current_budget": even * 2,
            "action": ["hold"] * 16,
        }
    )
    report = performance.truth_allocation_report(history, truth, start=start)
    week1, week2 = report.row(0, named=True), report.row(1, named=True)
    assert week1["top_quartile_share"] == pytest.approx(0.25)
    assert week1["value_index"] == pytest.approx(1.0)
    assert week2["top_quartile_share"] == pytest.approx(1.0)
    assert week2["first_run_share"] == pytest.approx(0.25)
    assert week2["current_share"] == pytest.approx(0.25)  # live budgets did not move
    assert week2["value_index"] == pytest.approx(6.5 / 3.5, abs=1e-3)
