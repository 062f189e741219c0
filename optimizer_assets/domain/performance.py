"""From warehouse tables to the allocator's input and back to ad-set budgets (issue 5).

Pure polars/numpy, no Dagster, no I/O. The pieces, in loop order:

- :func:`value_events` and :func:`lag_events`: attributed synthetic revenue as value events per
  ad, and the same events with their click day (cohort) for the lag estimate. Only warehouse
  data: lead-form lead time, else contact creation, else deal creation marks the click day.
- :func:`performance_frame`: one row per live ad (``sampler.ad_performance`` plus ids, the
  ad set's budget, the account minimum and the per-ad floor that keeps each ad set at it).
- :func:`apply_learning`: the learners' inputs for the accounts whose ``learning:`` flags are on
  (cross-account ``boost``, winner priors for new ads, evidence decayed after a drift, and
  :func:`forget_changes`: evidence from before an ad's own CTR change forgotten).
- :func:`allocate_accounts`: ``sampler.allocate`` per account (its settings, its total budget,
  an rng seeded from (account, now)), then :func:`enforce_adset_floors`.
- :func:`budget_recommendations`: per ad set, current and recommended budget in minor units.
- :func:`allocation_summary`, :func:`top_movers`, :func:`truth_allocation_report`: figures.

Money: ``*_minor`` and the recommendation budgets are Int64 minor units (Meta's currency
offset); ``budget``, ``current_budget`` and ``min_budget`` in ad rows are major units (dollars),
as ``sampler.allocate`` takes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from optimizer_assets.domain import cross_account, instant_learner, sampler
from optimizer_assets.domain import lag as lag_mod
from optimizer_assets.domain import winner_index as winners_mod
from optimizer_assets.domain.ads import INSIGHTS_SCHEMA, META_ADS_SCHEMA

__all__ = [
    "ADSET_ACTIONS",
    "PERFORMANCE_COLUMNS",
    "RECOMMENDATION_SCHEMA",
    "SCORE_SCHEMA",
    "account_rng",
    "allocate_accounts",
    "allocation_summary",
    "apply_learning",
    "budget_recommendations",
    "currency_offset",
    "enforce_adset_floors",
    "forget_changes",
    "lag_events",
    "performance_frame",
    "recommendation_summary",
    "top_adset_movers",
    "top_movers",
    "truth_allocation_report",
    "value_events",
]

_TS = pl.Datetime("us", "UTC")
# Meta's currency offsets: 1 for these zero-decimal currencies, 100 for every other one
# (developers.facebook.com/docs/marketing-api/currencies).
_OFFSET_ONE = frozenset(
    {"CLP", "COP", "CRC", "HUF", "ISK", "IDR", "JPY", "KRW", "PYG", "TWD", "VND"}
)
ADSET_ACTIONS = ("scale", "hold", "reduce", "kill")

PERFORMANCE_COLUMNS = (
    "ad_id",
    "adset_id",
    "campaign_id",
    "account_id",
    "currency",
    "created_at",
    "age_hours",
    "spend",
    "impressions",
    "clicks",
    "pipeline_value",
    "conversions",
    "matured_spend",
    "lag_corrected_value",
    "frequency",
    "ctr_3d_change",
    "current_budget",
    "min_budget",
    "adset_budget_minor",
    "adset_min_budget_minor",
    "currency_offset",
)

SCORE_SCHEMA = {
    "ad_id": pl.Utf8,
    "adset_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "account_id": pl.Utf8,
    "currency": pl.Utf8,
    "current_budget": pl.Float64,
    "budget": pl.Float64,
    "budget_minor": pl.Int64,
    "score": pl.Float64,
    "p_best": pl.Float64,
    "action": pl.Utf8,
    "reason": pl.Utf8,
    "confidence": pl.Float64,
    "floor_adjustment_minor": pl.Int64,
    "scored_at": _TS,
}

RECOMMENDATION_SCHEMA = {
    "adset_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "account_id": pl.Utf8,
    "currency": pl.Utf8,
    "current_budget": pl.Int64,
    "recommended_budget": pl.Int64,
    "min_budget": pl.Int64,
    "ads": pl.UInt32,
    "ads_killed": pl.UInt32,
    "action": pl.Utf8,
    "reason": pl.Utf8,
    "confidence": pl.Float64,
    "recommended_at": _TS,
}


def currency_offset(currency: str | None) -> int:
    """Minor units per major unit as Meta counts budgets (100 for USD, 1 for JPY)."""
    return 1 if (currency or "").upper() in _OFFSET_ONE else 100


def _money(expr: pl.Expr) -> pl.Expr:
    """12.5 -> '12.50'."""
    return expr.round(2).cast(pl.Decimal(18, 2)).cast(pl.Utf8)


# ----------------------------------------------------------------------------- value inputs


def _credits(credits: pl.DataFrame) -> pl.DataFrame:
    """Credit rows with an ad (layer-0 / unattributed rows carry no ad and are dropped)."""
    if credits.is_empty() or "ad_id" not in credits.columns:
        return pl.DataFrame(
            schema={"deal_id": pl.Utf8, "ad_id": pl.Utf8, "credit": pl.Float64},
        )
    return credits.filter(pl.col("ad_id").is_not_null()).select(
        pl.col("deal_id").cast(pl.Utf8),
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("credit").cast(pl.Float64).fill_null(0.0),
        *[pl.col(c).cast(pl.Utf8) for c in ("contact_id", "lead_id") if c in credits.columns],
    )


def _revenue(revenue: pl.DataFrame) -> pl.DataFrame:
    if revenue.is_empty():
        return pl.DataFrame(
            schema={"deal_id": pl.Utf8, "occurred_at": _TS, "value_delta": pl.Float64}
        )
    return revenue.select(
        pl.col("deal_id").cast(pl.Utf8),
        pl.col("occurred_at").cast(_TS),
        pl.col("value_delta").cast(pl.Float64),
    ).drop_nulls(["occurred_at", "value_delta"])


def value_events(revenue: pl.DataFrame, credits: pl.DataFrame) -> pl.DataFrame:
    """Each synthetic-revenue event split over the deal's credited ads.

    ``revenue``: ``synthetic_revenue`` (deal_id, occurred_at, value_delta); ``credits``:
    ``attributed_revenue`` (deal_id, ad_id, credit). Returns ``ad_id``, ``occurred_at``,
    ``value`` (value_delta x credit, negative for stage regressions) and ``credit``.
    """
    return (
        _revenue(revenue)
        .join(_credits(credits).select("deal_id", "ad_id", "credit"), on="deal_id", how="inner")
        .select(
            "ad_id",
            "occurred_at",
            (pl.col("value_delta") * pl.col("credit")).alias("value"),
            "credit",
        )
    )


def lag_events(
    revenue: pl.DataFrame,
    credits: pl.DataFrame,
    *,
    leads: pl.DataFrame | None = None,
    contacts: pl.DataFrame | None = None,
    deals: pl.DataFrame | None = None,
    by_ad: bool = False,
) -> pl.DataFrame:
    """Attributed value events with their click day, for ``lag.estimate_lag_cdf``.

    The cohort (click day) of a credit row is its lead-form lead's ``created_at`` when it has a
    ``lead_id`` in ``meta_leads``, else its contact's ``created_at`` (``hubspot_contacts``),
    else the deal's ``created_at`` (``hubspot_deals``). Warehouse data only, never truth.
    Returns ``cohort_at``, ``occurred_at``, ``value`` (credit-weighted value_delta), and with
    ``by_ad`` first the credited ``ad_id`` (for :func:`forget_changes`' value by click day).
    """
    c = _credits(credits)
    if "lead_id" not in c.columns:
        c = c.with_columns(pl.lit(None, pl.Utf8).alias("lead_id"))
    if "contact_id" not in c.columns:
        c = c.with_columns(pl.lit(None, pl.Utf8).alias("contact_id"))

    def times(frame: pl.DataFrame | None, key: str, name: str) -> pl.DataFrame:
        if frame is None or frame.is_empty() or key not in frame.columns:
            return pl.DataFrame(schema={key: pl.Utf8, name: _TS})
        return frame.select(
            pl.col(key).cast(pl.Utf8), pl.col("created_at").cast(_TS).alias(name)
        ).unique(key, keep="first")

    c = (
        c.join(times(leads, "lead_id", "_lead_at"), on="lead_id", how="left")
        .join(times(contacts, "contact_id", "_contact_at"), on="contact_id", how="left")
        .join(times(deals, "deal_id", "_deal_at"), on="deal_id", how="left")
        .with_columns(pl.coalesce("_lead_at", "_contact_at", "_deal_at").alias("cohort_at"))
    )
    return (
        _revenue(revenue)
        .join(c.select("deal_id", "ad_id", "credit", "cohort_at"), on="deal_id", how="inner")
        .select(
            *(["ad_id"] if by_ad else []),
            "cohort_at",
            "occurred_at",
            (pl.col("value_delta") * pl.col("credit")).alias("value"),
        )
        .drop_nulls("cohort_at")
    )


# ------------------------------------------------------------------------------ performance


def performance_frame(
    ads: pl.DataFrame,
    insights: pl.DataFrame,
    events: pl.DataFrame,
    *,
    now: datetime,
    lag_cdf: pl.DataFrame | None,
    currencies: Mapping[str, str],
    min_adset_budgets: Mapping[str, int],
) -> pl.DataFrame:
    """One row per live ad (``PERFORMANCE_COLUMNS``): the allocator's input.

    ``ads`` is ``meta_ads``, ``insights`` ``meta_ad_insights``, ``events`` from
    :func:`value_events`. Live = ad and ad set ACTIVE with an ad-set daily budget (ad sets on
    campaign budgets are not the allocator's to move). ``currencies`` and
    ``min_adset_budgets`` (minor units, Meta's ``minimum_budgets``) are per account.
    ``min_budget`` is the per-ad floor: the account minimum split over the ad set's live ads,
    so an ad set whose ads all sit at their floors still meets Meta's minimum.
    """
    if ads.is_empty():
        ads = pl.DataFrame(schema=META_ADS_SCHEMA)
    if insights.is_empty():
        insights = pl.DataFrame(schema=INSIGHTS_SCHEMA)
    live = ads.filter(
        (pl.col("ad_status") == "ACTIVE")
        & (pl.col("adset_status") == "ACTIVE")
        & pl.col("daily_budget").is_not_null()
    )
    ev = events.filter(pl.col("value") != 0) if events.height else events
    if ev.is_empty():
        ev = pl.DataFrame(schema={"ad_id": pl.Utf8, "occurred_at": _TS, "value": pl.Float64})
    perf = sampler.ad_performance(live, insights, ev, now=now, lag_cdf=lag_cdf, minor_per_unit=1.0)
    # Value events with fractional credit count as that fraction of an event.
    conversions = (
        events.filter(pl.col("value") > 0, pl.col("occurred_at") <= now)
        .group_by("ad_id")
        .agg(pl.col("credit").sum().alias("_conv"))
        if events.height
        else pl.DataFrame(schema={"ad_id": pl.Utf8, "_conv": pl.Float64})
    )
    accounts = perf["account_id"].unique().to_list()
    per_account = pl.DataFrame(
        {
            "account_id": accounts,
            "currency": [currencies.get(a, "USD") for a in accounts],
            "adset_min_budget_minor": [int(min_adset_budgets.get(a, 1)) for a in accounts],
        },
        schema={"account_id": pl.Utf8, "currency": pl.Utf8, "adset_min_budget_minor": pl.Int64},
    ).with_columns(
        pl.col("currency")
        .map_elements(currency_offset, return_dtype=pl.Int64)
        .alias("currency_offset")
    )
    ids = live.select(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("campaign_id").cast(pl.Utf8),
        pl.col("daily_budget").cast(pl.Int64).alias("adset_budget_minor"),
    )
    offset = pl.col("currency_offset").cast(pl.Float64)
    return (
        perf.join(ids, on="ad_id", how="left")
        .join(conversions, on="ad_id", how="left")
        .join(per_account, on="account_id", how="left")
        .with_columns(
            pl.col("_conv").fill_null(0.0).alias("conversions"),
            (pl.col("current_budget") / offset).alias("current_budget"),
            (
                pl.col("adset_min_budget_minor").cast(pl.Float64)
                / offset
                / pl.len().over("adset_id")
            ).alias("min_budget"),
        )
        .select(PERFORMANCE_COLUMNS)
        .sort("account_id", "adset_id", "ad_id")
    )


# ------------------------------------------------------------------------------- allocation


NEW_AD_HOURS = 168.0  # boosts and winner priors are priors for ads younger than a week


def _new_ads(perf: pl.DataFrame, accounts: set[str], now: datetime, hours: float) -> pl.Expr:
    age_h = (pl.lit(now).cast(_TS) - pl.col("created_at").cast(_TS)).dt.total_seconds(
        fractional=True
    ) / 3600.0
    return pl.col("account_id").is_in(sorted(accounts)) & (age_h < hours)


FORGET_COLUMNS = (
    "impressions",
    "clicks",
    "spend",
    "matured_spend",
    "pipeline_value",
    "lag_corrected_value",
    "conversions",
)


def daily_evidence(
    insights: pl.DataFrame, arrived: pl.DataFrame, clicked: pl.DataFrame
) -> pl.DataFrame:
    """Per (ad, day): ``impressions``, ``clicks``, ``spend`` (insights rows with ``ad_id`` and
    ``date``), the attributed value that arrived that day (``pipeline_value``, from ``arrived``:
    ad_id, occurred_at, value; the day split ``decay_counts`` needs to discount only pre-drift
    evidence) and the value by its click day (``click_value``, from ``clicked``: ad_id,
    cohort_at, value; for ``forget_changes``). Empty when there are no insights."""
    if insights.is_empty():
        return pl.DataFrame()
    ins = insights.select(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("date").cast(pl.Date),
        *(pl.col(c).cast(pl.Float64) for c in ("impressions", "clicks", "spend")),
    )

    def by_day(events: pl.DataFrame, moment: str, name: str) -> pl.DataFrame:
        day = pl.col(moment).dt.date().alias("date")
        return events.group_by(pl.col("ad_id").cast(pl.Utf8), day).agg(
            pl.col("value").cast(pl.Float64).sum().alias(name)
        )

    return (
        ins.join(
            by_day(arrived, "occurred_at", "pipeline_value"),
            on=["ad_id", "date"],
            how="full",
            coalesce=True,
        )
        .join(
            by_day(clicked, "cohort_at", "click_value"),
            on=["ad_id", "date"],
            how="full",
            coalesce=True,
        )
        .fill_null(0.0)
    )


def forget_changes(
    perf: pl.DataFrame,
    daily: pl.DataFrame | None,
    *,
    accounts: set[str] | frozenset[str],
    now: datetime,
    lag_cdf: pl.DataFrame | None = None,
    options: Mapping[str, float | None] | None = None,
) -> pl.DataFrame:
    """``perf`` with the evidence from before each ad's CTR change forgotten (``learning.
    forget_changes``): ``sampler.evidence_weights`` on the ads' daily impressions / clicks.

    ``daily``: per (ad, day) ``ad_id``, ``date``, ``impressions``, ``clicks``, ``spend`` (the
    insights days up to ``now``), optionally ``click_value`` (attributed value by its click
    day, as :func:`lag_events` with ``by_ad`` dates it). For the live ads of ``accounts``, the
    (days x ads) matrices go to ``evidence_weights`` with the account as ``groups`` (so a
    change shared by the account also reaches ads too starved to show it), and each column
    of ``FORGET_COLUMNS`` is replaced by its weighted sum, computed as the column times the
    ad's weighted / total ratio (the same thing when the daily rows add up to ``perf``'s totals,
    and robust when they do not):

    - impressions, clicks, spend: each day's count times that day's weight.
    - matured_spend: each day's spend x weight x the lag CDF at that day's age
      (``lag.matured_spend`` on the weighted spend, when ``lag_cdf`` is given); without a
      curve, the days before the cut count as fully matured (they are the older ones):
      matured - (1 - w) x their spend.
    - pipeline_value, lag_corrected_value, conversions: by click day when ``click_value`` is
      there (each value event weighted by its click day's weight; click days before the first
      insights day take that day's weight). Without it (or with no positive value by click
      day) there is no click-day split, and the most faithful stand-in is the ad's weighted /
      total matured spend: the value that has arrived from a day's spend is expected to be
      proportional to spend x CDF(age). That keeps the ad's ROAS estimate and only widens its
      posterior. lag_corrected_value and conversions follow pipeline_value's ratio.

    ``options``: keyword arguments for ``evidence_weights`` (its defaults when None).
    Adds ``forget_cut`` (Date of the change: days before it were weighted down; null when
    none) and ``forget_weight`` (the weight of those days; 1.0 when none) for the reason text.
    Ads without daily rows, accounts not in ``accounts``, and an absent ``daily`` change
    nothing but those two columns.
    """
    out = perf.with_columns(
        pl.lit(None, pl.Date).alias("forget_cut"), pl.lit(1.0).alias("forget_weight")
    )
    if perf.is_empty() or not accounts or daily is None or daily.is_empty():
        return out
    need = {"ad_id", "date", "impressions", "clicks", "spend"}
    if not need <= set(daily.columns):
        return out
    ads = perf.filter(pl.col("account_id").cast(pl.Utf8).is_in(sorted(accounts))).select(
        pl.col("ad_id").cast(pl.Utf8), pl.col("account_id").cast(pl.Utf8)
    )
    today = now.date()
    d = (
        daily.select(
            pl.col("ad_id").cast(pl.Utf8),
            pl.col("date").cast(pl.Date),
            *[
                pl.col(c).cast(pl.Float64).fill_null(0.0)
                for c in ("impressions", "clicks", "spend")
            ],
        )
        .filter(pl.col("date") <= today)
        .join(ads, on="ad_id", how="inner")
    )
    if d.is_empty():
        return out
    ads = ads.filter(pl.col("ad_id").is_in(d["ad_id"].unique().implode())).with_row_index("_a")
    day0 = d["date"].min()
    n_days = int((d["date"].max() - day0).days) + 1
    d = d.join(ads.select("ad_id", "_a"), on="ad_id").with_columns(
        (pl.col("date") - pl.lit(day0)).dt.total_days().cast(pl.Int64).alias("_d")
    )
    k = ads.height
    di, ai = d["_d"].to_numpy(), d["_a"].to_numpy().astype(np.int64)

    def matrix(col: str) -> np.ndarray:
        m = np.zeros((n_days, k))
        np.add.at(m, (di, ai), d[col].to_numpy())
        return m

    imps, clicks, spend = matrix("impressions"), matrix("clicks"), matrix("spend")
    codes = ads["account_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    codes = np.unique(codes, return_inverse=True)[1]
    w = sampler.evidence_weights(imps, clicks, groups=codes, **dict(options or {}))
    low = w < 1.0
    cut = low.sum(axis=0)  # days before the cut carry weight < 1, the rest 1
    keep = np.where(cut > 0, w[0], 1.0)

    def ratio(m: np.ndarray) -> np.ndarray:
        tot = m.sum(axis=0)
        return np.where(tot > 0, (w * m).sum(axis=0) / np.where(tot > 0, tot, 1.0), 1.0)

    r_spend = ratio(spend)
    if lag_cdf is not None and lag_cdf.height:
        keys = lag_mod._key_columns(lag_cdf)
        sbd = d.with_columns((pl.col("spend") * pl.Series(w[di, ai])).alias("spend"))
        mat_w = lag_mod.matured_spend(sbd.select("ad_id", *keys, "date", "spend"), lag_cdf, now)
        mat_1 = lag_mod.matured_spend(
            d.select("ad_id", *keys, "date", "spend"), lag_cdf, now
        ).rename({"matured_spend": "_m1"})
        m = ads.join(mat_w, on="ad_id", how="left").join(
            mat_1.select("ad_id", "_m1"), on="ad_id", how="left"
        )
        mw, m1 = m["matured_spend"].fill_null(0.0).to_numpy(), m["_m1"].fill_null(0.0).to_numpy()
        r_matured = np.where(m1 > 0, mw / np.where(m1 > 0, m1, 1.0), r_spend)
        matured_expr = pl.col("matured_spend").cast(pl.Float64) * pl.col("_r_matured")
    else:
        pre_loss = ((1.0 - w) * spend).sum(axis=0)  # spend lost to the weights (pre-cut days)
        r_matured = r_spend  # only for the value fallback below
        matured_expr = (pl.col("matured_spend").cast(pl.Float64) - pl.col("_pre_loss")).clip(
            lower_bound=0.0
        )
    r_value = r_matured
    if "click_value" in daily.columns:
        cv = (
            daily.select(
                pl.col("ad_id").cast(pl.Utf8),
                pl.col("date").cast(pl.Date),
                pl.col("click_value").cast(pl.Float64).fill_null(0.0),
            )
            .filter(pl.col("click_value") != 0)
            .join(ads.select("ad_id", "_a"), on="ad_id", how="inner")
        )
        if cv.height:
            ci = np.clip(
                (cv["date"] - day0).dt.total_days().to_numpy().astype(np.int64), 0, n_days - 1
            )
            ca = cv["_a"].to_numpy().astype(np.int64)
            v = cv["click_value"].to_numpy()
            tot = np.bincount(ca, weights=v, minlength=k)
            wsum = np.bincount(ca, weights=v * w[ci, ca], minlength=k)
            r_value = np.where(
                tot > 0, np.clip(wsum / np.where(tot > 0, tot, 1.0), 0.0, 1.0), r_value
            )
    day_list = [day0 + timedelta(days=int(c)) for c in cut]
    got = ads.select("ad_id").with_columns(
        pl.Series("_r_imps", ratio(imps)),
        pl.Series("_r_clicks", ratio(clicks)),
        pl.Series("_r_spend", r_spend),
        pl.Series("_r_matured", np.asarray(r_matured, dtype=np.float64)),
        pl.Series("_r_value", np.asarray(r_value, dtype=np.float64)),
        pl.Series("_pre_loss", pre_loss if lag_cdf is None or not lag_cdf.height else np.zeros(k)),
        pl.Series("_cut", day_list, dtype=pl.Date),
        pl.Series("_keep", keep),
        pl.Series("_any", cut > 0),
    )
    out = out.join(got, on="ad_id", how="left", maintain_order="left")
    hit = pl.col("_any").fill_null(False)
    scale = {
        "impressions": "_r_imps",
        "clicks": "_r_clicks",
        "spend": "_r_spend",
        "pipeline_value": "_r_value",
        "lag_corrected_value": "_r_value",
        "conversions": "_r_value",
    }
    cols = [
        pl.when(hit)
        .then(pl.col(c).cast(pl.Float64) * pl.col(r))
        .otherwise(pl.col(c).cast(pl.Float64))
        .alias(c)
        for c, r in scale.items()
        if c in out.columns
    ]
    if "matured_spend" in out.columns:
        cols.append(
            pl.when(hit)
            .then(matured_expr)
            .otherwise(pl.col("matured_spend").cast(pl.Float64))
            .alias("matured_spend")
        )
    return out.with_columns(
        *cols,
        pl.when(hit).then(pl.col("_cut")).alias("forget_cut"),
        pl.when(hit).then(pl.col("_keep")).otherwise(1.0).alias("forget_weight"),
    ).drop(
        "_r_imps",
        "_r_clicks",
        "_r_spend",
        "_r_matured",
        "_r_value",
        "_pre_loss",
        "_cut",
        "_keep",
        "_any",
    )


def _drift_decay(
    perf: pl.DataFrame, factors: pl.DataFrame, daily: pl.DataFrame | None
) -> pl.DataFrame:
    """``instant_learner.decay_counts``; ads with no evidence before the change keep
    ``evidence_factor`` 1 (nothing was discounted)."""
    decayed = instant_learner.decay_counts(perf, factors, daily=daily)
    counts = [c for c in ("impressions", "spend") if c in perf.columns]
    less = pl.any_horizontal([decayed[c] < perf[c].cast(pl.Float64) - 1e-9 for c in counts])
    return decayed.with_columns(pl.when(less).then(pl.col("evidence_factor")).otherwise(1.0))


def apply_learning(
    perf: pl.DataFrame,
    *,
    now: datetime,
    boost_accounts: set[str] | frozenset[str] = frozenset(),
    prior_accounts: set[str] | frozenset[str] = frozenset(),
    decay_accounts: set[str] | frozenset[str] = frozenset(),
    forget_accounts: set[str] | frozenset[str] = frozenset(),
    creatives: pl.DataFrame | None = None,
    patterns: pl.DataFrame | None = None,
    index: winners_mod.WinnerIndex | None = None,
    drifts: pl.DataFrame | None = None,
    daily: pl.DataFrame | None = None,
    lag_cdf: pl.DataFrame | None = None,
    forget_options: Mapping[str, float | None] | None = None,
    new_ad_hours: float = NEW_AD_HOURS,
) -> pl.DataFrame:
    """``perf`` with the learners' allocator inputs for the accounts that turned them on.

    - ``forget_accounts`` (``learning.forget_changes``): :func:`forget_changes` on ``daily``
      (and ``lag_cdf`` for the matured spend): each ad's evidence from before its own (or its
      account's) CTR change day is weighted by ``sampler.evidence_weights``. It runs first;
      the drift discount below then skips the ads it already cut (both discount the same
      pre-change evidence, so applying both would count the change twice), and still
      applies to the other ads of the account. Adds ``forget_cut`` / ``forget_weight`` when
      at least one ad was cut.
    - ``decay_accounts`` (``learning.drift_discount``): evidence from before each account's
      latest detected drift (``drifts``: ``detected_drifts`` rows) is weighted down by
      ``instant_learner.evidence_decay`` / ``decay_counts`` (``daily``: ad_id, date and
      impressions / clicks / spend / pipeline_value per day, so only the pre-change part is
      scaled). Adds ``evidence_factor`` (1.0 = untouched).
    - ``boost_accounts`` (``learning.cross_account_boost``): ads younger than ``new_ad_hours``
      take the strongest matching ``cross_account_patterns`` row: ``boost`` and a
      ``boost_reason`` naming the pattern (the allocator puts it in the reason text).
    - ``prior_accounts`` (``learning.winner_priors``): ads younger than ``new_ad_hours`` get
      ``prior_alpha`` / ``prior_beta`` / ``prior_roas`` from their nearest winners in
      ``index`` (itself excluded), weak matches shrunk to the account's pooled ROAS, and a
      ``prior_reason``.

    ``creatives`` (``meta_ads``: ad_id + traits + title/body) supplies traits and copy when
    ``perf`` lacks them. A missing table (None / empty) changes nothing, and with no account
    on, ``perf`` comes back unchanged (same columns).
    """
    out = perf
    if perf.is_empty():
        return out
    if forget_accounts:
        forgot = forget_changes(
            out, daily, accounts=forget_accounts, now=now, lag_cdf=lag_cdf, options=forget_options
        )
        if forgot["forget_cut"].is_not_null().any():  # else: unchanged, same columns
            out = forgot
    if decay_accounts and drifts is not None and drifts.height and "detected_at" in drifts.columns:
        mine = drifts.filter(pl.col("account_id").cast(pl.Utf8).is_in(sorted(decay_accounts)))
        factors = instant_learner.evidence_decay(mine, now)
        if factors.height:
            if "forget_cut" in out.columns:  # ads already cut by forget_changes: not again
                cut = out["forget_cut"].is_not_null().to_numpy()
                row = np.arange(out.height)
                rest = _drift_decay(out.filter(~cut), factors, daily)
                done = out.filter(cut).with_columns(pl.lit(1.0).alias("evidence_factor"))
                out = (
                    pl.concat(
                        [
                            rest.with_columns(pl.Series("_i", row[~cut])),
                            done.with_columns(pl.Series("_i", row[cut])),
                        ],
                        how="diagonal_relaxed",
                    )
                    .sort("_i")
                    .drop("_i")
                )
            else:
                out = _drift_decay(out, factors, daily)
    want_boost = bool(boost_accounts) and patterns is not None and patterns.height > 0
    want_prior = bool(prior_accounts) and index is not None and index.size > 0
    if not (want_boost or want_prior):
        return out
    traits = [*cross_account.TRAITS, "title", "body"]
    missing = [c for c in traits if c not in out.columns]
    base = out
    if missing and creatives is not None and creatives.height:
        cols = [c for c in missing if c in creatives.columns]
        base = out.join(
            creatives.select(pl.col("ad_id").cast(pl.Utf8), *cols).unique("ad_id"),
            on="ad_id",
            how="left",
            maintain_order="left",
        )
    if want_boost:
        boosted = cross_account.boosts_for(base, patterns, now=now, max_age_hours=new_ad_hours)
        on = _new_ads(boosted, set(boost_accounts), now, new_ad_hours)
        out = out.with_columns(
            pl.when(on).then(boosted["boost"]).otherwise(1.0).alias("boost"),
            pl.when(on).then(boosted["boost_reason"]).alias("boost_reason"),
        )
    if want_prior:
        out = out.with_columns(
            pl.lit(None, pl.Float64).alias(c) for c in ("prior_alpha", "prior_beta", "prior_roas")
        ).with_columns(pl.lit(None, pl.Utf8).alias("prior_reason"))
        new = base.with_row_index("_row").filter(
            _new_ads(base, set(prior_accounts), now, new_ad_hours)
        )
        parts = []
        for (account_id,), rows in new.group_by("account_id", maintain_order=True):
            acc = perf.filter(pl.col("account_id") == account_id)
            spend = float(acc["spend"].sum() or 0.0)
            value_col = "lag_corrected_value" if "lag_corrected_value" in acc.columns else None
            value = float(acc[value_col or "pipeline_value"].sum() or 0.0)
            baseline = value / spend if spend > 0 and value > 0 else 1.0
            parts.append(
                winners_mod.priors_from_winners(rows, index, baseline_roas=baseline).select(
                    "_row", "prior_alpha", "prior_beta", "prior_roas", "prior_reason"
                )
            )
        if parts:
            got = pl.concat(parts)
            out = out.with_row_index("_row").update(got, on="_row", how="left").drop("_row")
    return out


def _learning_notes(perf: pl.DataFrame) -> pl.DataFrame:
    """ad_id + the reason text of winner priors, drift-discounted and forgotten evidence
    ("" when none; boosts are named by the allocator itself through ``boost_reason``)."""
    notes = []
    if "prior_reason" in perf.columns:
        notes.append(
            pl.when(pl.col("prior_reason").is_not_null())
            .then(pl.format(" Cold-start prior: {}.", pl.col("prior_reason")))
            .otherwise(pl.lit(""))
        )
    if "evidence_factor" in perf.columns:
        notes.append(
            pl.when(pl.col("evidence_factor") < 1.0)
            .then(
                pl.format(
                    " Evidence from before the detected drift weighted x{}.",
                    pl.col("evidence_factor").round(2),
                )
            )
            .otherwise(pl.lit(""))
        )
    if "forget_cut" in perf.columns:
        notes.append(
            pl.when(pl.col("forget_cut").is_not_null())
            .then(
                pl.format(
                    " CTR changed on {}: evidence before it weighted x{}.",
                    pl.col("forget_cut").cast(pl.Utf8),
                    pl.col("forget_weight").round(2),
                )
            )
            .otherwise(pl.lit(""))
        )
    note = pl.concat_str(notes) if notes else pl.lit("")
    return perf.select(pl.col("ad_id"), note.alias("_learning_note"))


def account_rng(account_id: str, now: datetime) -> np.random.Generator:
    """A generator seeded from (account, now): re-running the same moment gives the same draws."""
    digest = hashlib.sha256(f"{account_id}|{now.isoformat()}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32))


def _apportion(frame: pl.DataFrame, group: str, weight: str, total: str, out: str) -> pl.DataFrame:
    """Split each group's integer ``total`` over its rows by ``weight`` exactly (largest
    remainder; rows with weight 0 share evenly when the whole group weighs 0)."""
    w = pl.col(weight).cast(pl.Float64).clip(0.0, None)
    w_sum = w.sum().over(group)
    share = pl.when(w_sum > 0).then(w / w_sum).otherwise(1.0 / pl.len().over(group))
    exact = pl.col(total).cast(pl.Float64) * share
    return (
        frame.with_columns(exact.alias("_exact"))
        .with_columns(pl.col("_exact").floor().cast(pl.Int64).alias("_base"))
        .with_columns(
            (pl.col(total) - pl.col("_base").sum().over(group)).alias("_left"),
            (pl.col("_exact") - pl.col("_base"))
            .rank("ordinal", descending=True)
            .over(group)
            .alias("_rank"),
        )
        .with_columns(
            (pl.col("_base") + (pl.col("_rank") <= pl.col("_left")).cast(pl.Int64)).alias(out)
        )
        .drop("_exact", "_base", "_left", "_rank")
    )


def enforce_adset_floors(scores: pl.DataFrame) -> pl.DataFrame:
    """Keep every ad set that still has a live ad at the account minimum, budgets conserved.

    ``scores``: ``account_id``, ``adset_id``, ``budget_minor``, ``action``,
    ``adset_min_budget_minor``, ``min_budget`` (per-ad floor) and ``currency_offset``. An ad
    set with a non-killed ad below the minimum (its other ads were killed, or funding ran
    short) gets the shortfall, split evenly over its live ads; the account's ad sets above the
    minimum give it up in proportion to their headroom. Killed ads stay at 0. Adds
    ``floor_adjustment_minor`` (the change, in minor units).
    """
    alive = pl.col("action") != "kill"
    sets = scores.group_by("account_id", "adset_id").agg(
        pl.col("budget_minor").sum().alias("_sum"),
        alive.sum().alias("_alive"),
        pl.col("adset_min_budget_minor").first().alias("_min"),
    )
    sets = sets.with_columns(
        pl.when((pl.col("_alive") > 0) & (pl.col("_sum") < pl.col("_min")))
        .then(pl.col("_min") - pl.col("_sum"))
        .otherwise(0)
        .alias("_deficit"),
        (pl.col("_sum") - pl.col("_min")).clip(0, None).alias("_headroom"),
    ).with_columns(
        pl.min_horizontal(
            pl.col("_deficit").sum().over("account_id"),
            pl.col("_headroom").sum().over("account_id"),
        ).alias("_moved")
    )
    if sets["_moved"].max() in (None, 0):
        return scores.with_columns(pl.lit(0, pl.Int64).alias("floor_adjustment_minor"))
    # what each ad set gets (+) or gives (-), exact per account
    gets = _apportion(sets, "account_id", "_deficit", "_moved", "_get")
    gives = _apportion(sets, "account_id", "_headroom", "_moved", "_give")
    sets = gets.select("adset_id", "_get").join(gives.select("adset_id", "_give"), on="adset_id")
    rows = scores.join(sets, on="adset_id", how="left").with_columns(
        pl.col("_get").fill_null(0),
        pl.col("_give").fill_null(0),
        pl.when(alive).then(1.0).otherwise(0.0).alias("_w_get"),
        (pl.col("budget_minor") - pl.col("min_budget") * pl.col("currency_offset").cast(pl.Float64))
        .clip(0.0, None)
        .alias("_w_give"),
    )
    rows = _apportion(rows, "adset_id", "_w_get", "_get", "_ad_get")
    # donors give from what their ads hold above their floors (from budgets if none does)
    rows = rows.with_columns(
        pl.when(pl.col("_w_give").sum().over("adset_id") > 0)
        .then(pl.col("_w_give"))
        .otherwise(pl.col("budget_minor").cast(pl.Float64))
        .alias("_w_give")
    )
    rows = _apportion(rows, "adset_id", "_w_give", "_give", "_ad_give")
    adjust = pl.col("_ad_get") - pl.col("_ad_give")
    return rows.with_columns(
        (pl.col("budget_minor") + adjust).alias("budget_minor"),
        adjust.alias("floor_adjustment_minor"),
    ).drop("_get", "_give", "_w_get", "_w_give", "_ad_get", "_ad_give")


def allocate_accounts(
    perf: pl.DataFrame,
    configs: Mapping[str, sampler.SamplerConfig],
    *,
    now: datetime,
) -> pl.DataFrame:
    """``sampler.allocate`` per account, then ad-set floors; ``SCORE_SCHEMA`` rows.

    Each account's total is the sum of its live ad sets' current daily budgets; its config is
    ``configs[account_id]`` (else ``configs["*"]``, else the defaults), with ``minor_unit``
    set from the account currency; its rng comes from :func:`account_rng`.
    """
    if perf.is_empty():
        return pl.DataFrame(schema=SCORE_SCHEMA)
    default = configs.get("*", sampler.SamplerConfig())
    parts = []
    # one allocate call per account (hundreds at most): per-account rng, config and total
    for (account_id,), part in perf.group_by("account_id", maintain_order=True):
        offset = int(part["currency_offset"][0])
        total_minor = int(part.unique("adset_id")["adset_budget_minor"].sum())
        cfg = dataclasses.replace(configs.get(str(account_id), default), minor_unit=1 / offset)
        out = sampler.allocate(
            part, total_minor / offset, now=now, rng=account_rng(str(account_id), now), config=cfg
        )
        parts.append(
            part.select(
                "ad_id", "adset_id", "campaign_id", "account_id", "currency", "current_budget",
                "min_budget", "adset_min_budget_minor", "currency_offset",
            )
            .join(out, on="ad_id", how="left")
            .with_columns((pl.col("budget") * offset).round(0).cast(pl.Int64).alias("budget_minor"))
        )  # fmt: skip
    scores = enforce_adset_floors(pl.concat(parts)).join(
        _learning_notes(perf), on="ad_id", how="left"
    )
    moved = pl.col("floor_adjustment_minor")
    money = _money(moved.abs().cast(pl.Float64) / pl.col("currency_offset"))
    note = (
        pl.when(moved > 0)
        .then(pl.format(" Ad set minimum: +{} to keep its ad set at Meta's minimum.", money))
        .when(moved < 0)
        .then(pl.format(" Ad set minimums elsewhere: -{}.", money))
        .otherwise(pl.lit(""))
    )
    return scores.with_columns(
        (pl.col("budget_minor").cast(pl.Float64) / pl.col("currency_offset")).alias("budget"),
        pl.concat_str(pl.col("reason"), pl.col("_learning_note").fill_null(""), note).alias(
            "reason"
        ),
        pl.lit(now).cast(_TS).alias("scored_at"),
    ).select(SCORE_SCHEMA.keys())


def budget_recommendations(
    scores: pl.DataFrame,
    perf: pl.DataFrame,
    *,
    change_band: Mapping[str, float] | float = 0.1,
    now: datetime,
) -> pl.DataFrame:
    """Per ad set (``RECOMMENDATION_SCHEMA``): current and recommended daily budget in minor
    units (the sum of its ads' budgets), action, a reason naming the ad behind the move, and
    the confidence of the ads that move it (change-weighted).

    Action: ``kill`` when every ad is killed (budget 0: pause; the money went to the account's
    other ad sets), ``scale`` / ``reduce`` beyond +-``change_band`` (per account or one value),
    else ``hold``.
    """
    if scores.is_empty():
        return pl.DataFrame(schema=RECOMMENDATION_SCHEMA)
    band = (
        pl.col("account_id").replace_strict(dict(change_band), default=0.1, return_dtype=pl.Float64)
        if isinstance(change_band, Mapping)
        else pl.lit(float(change_band))
    )
    setinfo = perf.unique("adset_id").select(
        "adset_id", "adset_budget_minor", "adset_min_budget_minor", "currency_offset"
    )
    cols = ("ad_id", "adset_id", "campaign_id", "account_id", "currency", "current_budget")
    rows = scores.select(*cols, "budget_minor", "action", "reason", "confidence")
    rows = rows.join(setinfo, on="adset_id", how="left").with_columns(
        (pl.col("budget_minor") - pl.col("current_budget") * pl.col("currency_offset"))
        .abs()
        .alias("_move")
    )
    driver = (
        rows.sort("_move", "ad_id", descending=[True, False])
        .group_by("adset_id", maintain_order=True)
        .agg(
            pl.col("ad_id").first().alias("_ad"),
            pl.col("action").first().alias("_ad_action"),
            pl.col("reason").first().alias("_ad_reason"),
        )
    )
    w = pl.col("_move") + 1e-9
    sets = (
        rows.group_by("adset_id", maintain_order=True)
        .agg(
            pl.col("campaign_id").first(),
            pl.col("account_id").first(),
            pl.col("currency").first(),
            pl.col("adset_budget_minor").first().alias("current_budget"),
            pl.col("budget_minor").sum().alias("recommended_budget"),
            pl.col("adset_min_budget_minor").first().alias("min_budget"),
            pl.len().alias("ads"),
            (pl.col("action") == "kill").sum().alias("ads_killed"),
            ((pl.col("confidence") * w).sum() / w.sum()).alias("confidence"),
            pl.col("currency_offset").first().alias("_offset"),
        )
        .join(driver, on="adset_id", how="left")
    )
    cur, rec = pl.col("current_budget"), pl.col("recommended_budget")
    change = pl.when(cur > 0).then(rec / cur - 1.0).otherwise(pl.lit(None, pl.Float64))
    action = (
        pl.when(pl.col("ads_killed") == pl.col("ads"))
        .then(pl.lit("kill"))
        .when((cur <= 0) & (rec > 0))
        .then(pl.lit("scale"))
        .when(change >= band)
        .then(pl.lit("scale"))
        .when(change <= -band)
        .then(pl.lit("reduce"))
        .otherwise(pl.lit("hold"))
    )

    def money(expr: pl.Expr) -> pl.Expr:
        return _money(expr.cast(pl.Float64) / pl.col("_offset"))

    pct = (change * 100).round(0).cast(pl.Int64).cast(pl.Utf8)
    reason = (
        pl.when(pl.col("_action") == "kill")
        .then(
            pl.format(
                "Kill: all {} ads are killed; pause them and move its ${} to the account's "
                "other ad sets.",
                pl.col("ads"),
                money(cur),
            )
        )
        .otherwise(
            pl.format(
                "{}: daily budget ${} -> ${} ({}%), the sum of its {} ads; "
                "biggest move ad {} ({}): {}",
                pl.col("_action").str.to_titlecase(),
                money(cur),
                money(rec),
                pl.when(change >= 0).then(pl.format("+{}", pct)).otherwise(pct),
                pl.col("ads") - pl.col("ads_killed"),
                pl.col("_ad"),
                pl.col("_ad_action"),
                pl.col("_ad_reason"),
            )
        )
    )
    return (
        sets.with_columns(action.alias("_action"))
        .with_columns(
            pl.col("_action").alias("action"),
            reason.alias("reason"),
            pl.col("confidence").clip(0.0, 1.0),
            pl.lit(now).cast(_TS).alias("recommended_at"),
        )
        .select(RECOMMENDATION_SCHEMA.keys())
        .cast(RECOMMENDATION_SCHEMA)
        .sort("account_id", "adset_id")
    )


# ---------------------------------------------------------------------------------- figures


def allocation_summary(scores: pl.DataFrame) -> dict[str, float | int]:
    """Counts per action, spend shifted (half the summed absolute moves, in major units) and
    its share, and the expected value gain per day: sum of (budget - current) x score."""
    counts = {a: int((scores["action"] == a).sum()) for a in sampler.ACTIONS}
    if scores.is_empty():
        return {**counts, "spend_shifted": 0.0, "spend_shifted_share": 0.0, "total_budget": 0.0}
    delta = scores["budget"] - scores["current_budget"].fill_null(0.0)
    total = float(scores["current_budget"].fill_null(0.0).sum())
    shifted = float(delta.abs().sum()) / 2.0
    return {
        **counts,
        "total_budget": round(total, 2),
        "spend_shifted": round(shifted, 2),
        "spend_shifted_share": shifted / total if total > 0 else 0.0,
        "expected_value_gain": float((delta * scores["score"].fill_null(0.0)).sum()),
    }


def recommendation_summary(recs: pl.DataFrame) -> dict[str, float | int]:
    """Ad sets per action and the daily budget moved between ad sets (major units)."""
    counts = {a: int((recs["action"] == a).sum()) for a in ADSET_ACTIONS} if recs.height else {}
    if recs.is_empty():
        return {**{a: 0 for a in ADSET_ACTIONS}, "spend_shifted": 0.0}
    offset = recs["currency"].map_elements(currency_offset, return_dtype=pl.Int64)
    moved = (recs["recommended_budget"] - recs["current_budget"]).abs() / offset
    return {**counts, "spend_shifted": round(float(moved.sum()) / 2.0, 2)}


def top_adset_movers(recs: pl.DataFrame, n: int = 10) -> pl.DataFrame:
    """The ``n`` ad sets whose budget moves most (minor units), with action and reason."""
    change = pl.col("recommended_budget") - pl.col("current_budget")
    return (
        recs.with_columns(change.alias("change"))
        .sort(pl.col("change").abs(), "adset_id", descending=[True, False])
        .head(n)
        .select(
            "account_id", "adset_id", "current_budget", "recommended_budget", "change", "action",
            pl.col("confidence").round(2), "reason",
        )
    )  # fmt: skip


def top_movers(scores: pl.DataFrame, n: int = 10) -> pl.DataFrame:
    """The ``n`` ads whose budget moves most, with the action and the reason behind it."""
    return (
        scores.with_columns((pl.col("budget") - pl.col("current_budget")).alias("change"))
        .sort(pl.col("change").abs(), "ad_id", descending=[True, False])
        .head(n)
        .select(
            "account_id",
            "ad_id",
            pl.col("current_budget").round(2).alias("current"),
            pl.col("budget").round(2).alias("recommended"),
            pl.col("change").round(2),
            "action",
            pl.col("confidence").round(2),
            "reason",
        )
    )


def truth_allocation_report(
    history: pl.DataFrame, truth: pl.DataFrame, *, start: datetime
) -> pl.DataFrame:
    """Per account and week: how much recommended budget sits on the truly best ads.

    ``history``: ``scored_at, account_id, ad_id, budget, action`` and optionally
    ``current_budget`` (every run's ``ad_scores``); ``truth``: ``date, ad_id,
    true_value_per_impression`` (sandbox truth, demo/bench only). Each run is compared with
    the truth of the day before it (the last closed day). Columns: ``top_quartile_share``
    (recommended budget on the account's top quarter of scored ads by true value per
    impression; an even split gives ~0.25), the account's first-run share,
    ``current_share`` (the same for the budgets live at scoring time) and ``value_index``
    (true value per impression of the recommended mix / of an even split).
    """
    if history.is_empty() or truth.is_empty():
        return pl.DataFrame()
    if "current_budget" not in history.columns:
        history = history.with_columns(pl.lit(None, pl.Float64).alias("current_budget"))
    h = history.with_columns(
        (pl.col("scored_at") - timedelta(days=1)).dt.date().alias("date")
    ).join(truth.select("date", "ad_id", "true_value_per_impression"), on=["date", "ad_id"])
    v = pl.col("true_value_per_impression")
    by_run = ["account_id", "scored_at"]
    runs = (
        h.with_columns(
            (
                v.rank("ordinal", descending=True).over(by_run)
                <= (pl.len().over(by_run) / 4).ceil()
            ).alias("_top"),
        )
        .group_by(*by_run)
        .agg(
            pl.col("date").first(),
            (pl.col("budget").filter(pl.col("_top")).sum() / pl.col("budget").sum()).alias(
                "top_quartile_share"
            ),
            (
                pl.col("current_budget").filter(pl.col("_top")).sum()
                / pl.col("current_budget").sum()
            ).alias("current_share"),
            ((pl.col("budget") * v).sum() / pl.col("budget").sum() / v.mean()).alias("value_index"),
            (pl.col("action") == "kill").sum().alias("kills"),
        )
        .sort(by_run)
        .with_columns(
            ((pl.col("date") - pl.lit(start.date())).dt.total_days() // 7 + 1).alias("week"),
            pl.col("top_quartile_share").first().over("account_id").alias("first_run_share"),
        )
    )
    return (
        runs.group_by("account_id", "week", maintain_order=True)
        .agg(
            pl.len().alias("runs"),
            pl.col("first_run_share").first().round(3),
            pl.col("current_share").mean().round(3),
            pl.col("top_quartile_share").mean().round(3),
            pl.col("value_index").mean().round(3),
            pl.col("kills").last().alias("ads_killed_at_week_end"),
        )
        .sort("account_id", "week")
    )
