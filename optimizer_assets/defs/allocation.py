"""The budget allocator (group `allocation`): ad performance -> ad scores -> ad-set budgets.

``ad_performance`` is one row per live ad with its spend, clicks, attributed pipeline value and
the value corrected for what recent spend has not delivered yet (lag curve estimated from the
warehouse's deal history, stored as ``value_lag_cdf``). ``ad_scores`` runs the Thompson
allocator per account (its settings, its total budget, an rng seeded from (account, now));
every run is also kept in ``ad_score_history`` for ``HISTORY_RETENTION_DAYS`` (90) days by
``scored_at`` (each run deletes older ones; counts in its metadata). For the accounts whose
``learning:`` flags are on, ``ad_scores`` also reads the learners' tables
(``cross_account_patterns``, the newest ``winner_index`` build, ``detected_drifts``) and hands
their boosts, cold-start priors and drift-discounted counts to the allocator
(``performance.apply_learning``), and with ``learning.forget_changes`` the evidence from before
each ad's CTR change day forgotten (``performance.forget_changes``, ``sampler.evidence_weights``
on ``daily_evidence``); a table that is not there yet changes nothing.
``budget_recommendations`` sums the ads' budgets per ad set in minor units: the input of the
guarded change plan, which also pauses the ads whose ``ad_scores.action`` is ``kill``. A
blocking check keeps the plan from running on budgets that do not add up.
"""

from datetime import datetime, timedelta

import dagster as dg
import polars as pl

from optimizer_assets.defs.learning import DRIFTS_TABLE, latest_index
from optimizer_assets.defs.resources import MetaResource, OptimizerResource, WarehouseResource
from optimizer_assets.defs.revenue import md_table, read_tables
from optimizer_assets.domain import lag as lag_domain
from optimizer_assets.domain import performance
from optimizer_assets.domain.guardrails import min_budget_from_rows
from optimizer_assets.domain.sampler import SamplerConfig
from optimizer_assets.settings import Settings
from optimizer_assets.warehouse import Warehouse

MAX_LAG_DAYS = 28  # value arriving later than this counts as arriving on day 28
HISTORY = "ad_score_history"
# runs scored longer ago than this are deleted from HISTORY by each ad_scores run; 90 days keeps
# a quarter of weekly reviews (and the 30-day demo report) while the table stops growing
HISTORY_RETENTION_DAYS = 90


def prune_history(wh: Warehouse, cutoff: datetime) -> dict:
    """Delete the ``ad_score_history`` runs scored before ``cutoff``; counts for the metadata."""
    with wh.connect() as con:
        con.execute("BEGIN")
        runs, rows = con.execute(
            f"SELECT count(DISTINCT scored_at), count(*) FROM {HISTORY} WHERE scored_at < ?",
            [cutoff],
        ).fetchone()
        if rows:
            con.execute(f"DELETE FROM {HISTORY} WHERE scored_at < ?", [cutoff])
        con.execute("COMMIT")
    return {
        "history_runs_removed": int(runs),
        "history_rows_removed": int(rows),
        "history_kept_since": dg.MetadataValue.timestamp(cutoff),
    }


def sampler_configs(settings: Settings, account_ids: list[str]) -> dict[str, SamplerConfig]:
    """Each account's allocator config: its ``sampler:`` settings and its ``mode``."""
    configs = {}
    for account_id in account_ids:
        account = settings.for_account(account_id)
        configs[account_id] = SamplerConfig.from_mapping({**account.sampler, "mode": account.mode})
    return configs


def minimum_budgets(meta: MetaResource, currencies: dict[str, str]) -> dict[str, int]:
    """Meta's minimum ad-set daily budget per account (minor units, ``minimum_budgets`` edge)."""
    with meta.graph() as graph:
        return {
            account_id: min_budget_from_rows(graph.minimum_budgets(account_id), currency)
            for account_id, currency in currencies.items()
        }


def performance_inputs(wh: Warehouse) -> dict[str, pl.DataFrame]:
    """The catalog, insights, value events per ad and their click-day history (one connection;
    a table not materialized yet reads as empty)."""
    names = ("meta_ads", "meta_ad_insights", "synthetic_revenue", "attributed_revenue")
    ads, insights, revenue, credits, leads, contacts, deals = read_tables(
        wh, *names, "meta_leads", "hubspot_contacts", "hubspot_deals"
    )
    history = performance.lag_events(revenue, credits, leads=leads, contacts=contacts, deals=deals)
    return {
        "ads": ads,
        "insights": insights,
        "events": performance.value_events(revenue, credits),
        "history": history,
        "value_source": "attributed_revenue"
        if credits.width  # a table that does not exist reads as a frame without columns
        else "missing: attributed_revenue not materialized, pipeline value treated as 0",
    }


def performance_metadata(perf: pl.DataFrame, lag_cdf: pl.DataFrame, value_source: str) -> dict:
    """Totals, how much of the spend has matured, and the lag curve at 1/3/7/14 days."""
    spend = float(perf["spend"].sum() or 0.0)
    cdf = dict(zip(lag_cdf["lag_days"].to_list(), lag_cdf["cdf"].to_list(), strict=True))
    return {
        "row_count": perf.height,
        "accounts": perf["account_id"].n_unique(),
        "spend": spend,
        "pipeline_value": float(perf["pipeline_value"].sum() or 0.0),
        "lag_corrected_value": float(perf["lag_corrected_value"].sum() or 0.0),
        "matured_spend_share": float(perf["matured_spend"].sum() or 0.0) / spend if spend else 1.0,
        **{f"value_arrived_by_day_{d}": float(cdf.get(d, 1.0)) for d in (1, 3, 7, 14)},
        "value_source": value_source,
    }


@dg.asset(
    group_name="allocation",
    kinds={"meta", "duckdb", "polars"},
    deps=[
        "meta_ads",
        "meta_ad_insights",
        "synthetic_revenue",
        "attributed_revenue",
        "meta_leads",
        "hubspot_contacts",
        "hubspot_deals",
    ],
    pool="duckdb",
)
def ad_performance(
    optimizer: OptimizerResource, meta: MetaResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """One row per live ad: age, spend, impressions, clicks, attributed pipeline value,
    lag-corrected value, fatigue signals, current budget and the per-ad budget floor."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    inputs = performance_inputs(wh)
    ads = inputs["ads"]
    accounts = sorted(ads["account_id"].unique().to_list()) if ads.height else []
    currencies = {a: settings.for_account(a).currency for a in accounts}
    lag_cdf = lag_domain.estimate_lag_cdf(inputs["history"], now=now, max_lag_days=MAX_LAG_DAYS)
    perf = performance.performance_frame(
        ads,
        inputs["insights"],
        inputs["events"],
        now=now,
        lag_cdf=lag_cdf,
        currencies=currencies,
        min_adset_budgets=minimum_budgets(meta, currencies),
    )
    wh.replace("ad_performance", perf)
    wh.replace("value_lag_cdf", lag_cdf)
    metadata = performance_metadata(perf, lag_cdf, inputs["value_source"])
    return dg.MaterializeResult(metadata=metadata)


LEARNING_FLAGS = ("cross_account_boost", "winner_priors", "drift_discount", "forget_changes")


def learning_accounts(settings: Settings, account_ids: list[str]) -> dict[str, set[str]]:
    """Per ``learning:`` flag, the accounts that turned it on."""
    return {
        flag: {a for a in account_ids if getattr(settings.for_account(a).learning, flag)}
        for flag in LEARNING_FLAGS
    }


def daily_evidence(wh: Warehouse) -> pl.DataFrame:
    """``performance.daily_evidence`` from the warehouse: arrived value split by credits, click
    days dated like the lag curve's cohorts (lead, else contact, else deal creation)."""
    insights, revenue, credits, leads, contacts, deals = read_tables(
        wh,
        "meta_ad_insights",
        "synthetic_revenue",
        "attributed_revenue",
        "meta_leads",
        "hubspot_contacts",
        "hubspot_deals",
    )
    if insights.is_empty():
        return pl.DataFrame()
    return performance.daily_evidence(
        insights,
        performance.value_events(revenue, credits),
        performance.lag_events(
            revenue, credits, leads=leads, contacts=contacts, deals=deals, by_ad=True
        ),
    )


def learning_inputs(
    wh: Warehouse, settings: Settings, perf: pl.DataFrame, now: datetime, log=None
) -> tuple[pl.DataFrame, dict]:
    """``perf`` with the inputs of the learners each account turned on, and metadata.

    Reads only what an enabled flag needs; absent tables (first run) or an unreadable winner
    index change nothing (the metadata says so).
    """
    accounts = perf["account_id"].unique().to_list() if perf.height else []
    on = learning_accounts(settings, accounts)
    meta: dict = {f"learning_{flag}_accounts": len(on[flag]) for flag in LEARNING_FLAGS}
    if not perf.height or not any(on.values()):
        return perf, meta
    kwargs: dict = {}
    if on["cross_account_boost"] or on["winner_priors"]:
        kwargs["creatives"] = wh.read("meta_ads")
    if on["cross_account_boost"]:
        patterns = wh.read("cross_account_patterns")
        kwargs |= {"boost_accounts": on["cross_account_boost"], "patterns": patterns}
        meta["boost_patterns_available"] = patterns.height
    if on["winner_priors"]:
        try:
            index = latest_index(wh)
        except (OSError, ValueError, RuntimeError) as exc:  # files gone or inconsistent
            index = None
            if log is not None:
                log.warning(f"winner index not loaded, no winner priors this run: {exc}")
        kwargs |= {"prior_accounts": on["winner_priors"], "index": index}
        meta["winner_index_size"] = index.size if index is not None else 0
    if on["drift_discount"]:
        drifts = wh.read(DRIFTS_TABLE)
        kwargs |= {"decay_accounts": on["drift_discount"], "drifts": drifts}
        if drifts.height:
            kwargs["daily"] = daily_evidence(wh)
        meta["drifts_available"] = drifts.height
    if on["forget_changes"]:
        if "daily" not in kwargs:
            kwargs["daily"] = daily_evidence(wh)
        kwargs |= {"forget_accounts": on["forget_changes"], "lag_cdf": wh.read("value_lag_cdf")}
    out = performance.apply_learning(perf, now=now, **kwargs)
    meta |= {
        "ads_boosted": int((out["boost"] != 1.0).sum()) if "boost" in out.columns else 0,
        "ads_with_winner_prior": int(out["prior_alpha"].is_not_null().sum())
        if "prior_alpha" in out.columns
        else 0,
        "ads_with_decayed_evidence": int((out["evidence_factor"] < 1.0).sum())
        if "evidence_factor" in out.columns
        else 0,
        "ads_with_forgotten_evidence": int(out["forget_cut"].is_not_null().sum())
        if "forget_cut" in out.columns
        else 0,
    }
    return out, meta


@dg.asset(
    group_name="allocation",
    kinds={"duckdb", "polars"},
    # the learners run first when they are in the same run (their tables are read, if on)
    deps=[ad_performance, "cross_account_patterns", "winner_index", "online_learner"],
    pool="duckdb",
)
def ad_scores(
    context: dg.AssetExecutionContext, optimizer: OptimizerResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Per ad: recommended budget, score, P(best), action (scale/hold/reduce/kill), the reason
    with its numbers, and confidence; Thompson allocation per account, re-runs agree. Accounts
    with ``learning:`` flags on also get cross-account boosts, winner priors for new ads,
    evidence forgotten before each ad's CTR change day and drift-discounted evidence."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    perf = wh.read("ad_performance")
    accounts = perf["account_id"].unique().to_list() if perf.height else []
    perf, learning_meta = learning_inputs(wh, settings, perf, now, log=context.log)
    scores = performance.allocate_accounts(perf, sampler_configs(settings, accounts), now=now)
    wh.replace("ad_scores", scores)
    wh.replace_where(HISTORY, scores, "scored_at", [now])
    retention = prune_history(wh, now - timedelta(days=HISTORY_RETENTION_DAYS))
    if retention["history_runs_removed"]:
        context.log.info(
            f"{HISTORY}: removed {retention['history_runs_removed']} runs "
            f"({retention['history_rows_removed']:,} rows) scored over "
            f"{HISTORY_RETENTION_DAYS} days ago"
        )
    summary = performance.allocation_summary(scores)
    return dg.MaterializeResult(
        metadata={
            "row_count": scores.height,
            "accounts": len(accounts),
            **summary,
            **learning_meta,
            **retention,
            "top_movers": md_table(performance.top_movers(scores), limit=10),
        }
    )


@dg.asset(group_name="allocation", kinds={"duckdb", "polars"}, deps=[ad_scores], pool="duckdb")
def budget_recommendations(
    optimizer: OptimizerResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Per ad set: current and recommended daily budget (Int64 minor units, the sum of its
    ads' budgets, at least Meta's minimum unless all its ads are killed), action, reason."""
    wh, settings, now = warehouse.get(), optimizer.settings(), optimizer.now()
    scores, perf = wh.read("ad_scores"), wh.read("ad_performance")
    accounts = scores["account_id"].unique().to_list() if scores.height else []
    bands = {a: c.change_band for a, c in sampler_configs(settings, accounts).items()}
    recs = performance.budget_recommendations(scores, perf, change_band=bands, now=now)
    wh.replace("budget_recommendations", recs)
    return dg.MaterializeResult(
        metadata={
            "row_count": recs.height,
            **performance.recommendation_summary(recs),
            "top_movers": md_table(performance.top_adset_movers(recs), limit=10),
        }
    )


@dg.asset_check(
    asset=budget_recommendations,
    blocking=True,
    description="Budgets add up per account, ad sets meet Meta's minimum, killed ads get 0.",
)
def budgets_are_consistent(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Blocks the change plan when the recommendations would overspend, underspend, go below
    Meta's minimum, or keep money on killed ads."""
    wh = warehouse.get()
    recs, scores = wh.read("budget_recommendations"), wh.read("ad_scores")
    if recs.is_empty():
        return dg.AssetCheckResult(passed=True, metadata={"ad_sets": 0})
    totals = recs.group_by("account_id").agg(
        (pl.col("recommended_budget").sum() - pl.col("current_budget").sum()).abs().alias("gap")
    )
    below = recs.filter(
        (pl.col("action") != "kill") & (pl.col("recommended_budget") < pl.col("min_budget"))
    )
    killed_money = scores.filter((pl.col("action") == "kill") & (pl.col("budget_minor") != 0))
    worst = int(totals["gap"].max() or 0)
    return dg.AssetCheckResult(
        passed=worst == 0 and below.is_empty() and killed_money.is_empty(),
        metadata={
            "ad_sets": recs.height,
            "max_account_budget_gap_minor": worst,
            "ad_sets_below_minimum": below.height,
            "killed_ads_with_budget": killed_money.height,
        },
    )


def demo_report(world, warehouse: Warehouse) -> list[tuple[str, pl.DataFrame]]:
    """Sandbox truth vs the allocation: budget share on the truly best quarter of the ads."""
    history = warehouse.read(HISTORY)
    table = performance.truth_allocation_report(
        history, world.truth_ads_daily(), start=world.config.start
    )
    title = (
        "Allocation vs sandbox truth, per account and week: share of recommended budget on the "
        "top quarter of ads by true value per impression (even split ~0.25; current_share: "
        "the budgets live when scored, moved by the guarded plan), and the true value per "
        "impression of the recommended mix vs an even split (value_index)"
    )
    return [(title, table)] if table.height else []


assets = [ad_performance, ad_scores, budget_recommendations]
asset_checks = [budgets_are_consistent]
