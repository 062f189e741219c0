"""Three-layer attribution of HubSpot deals to Meta ads, vectorized with polars joins.

Layer 1 (deterministic): the ad named by the contact's first-URL ``utm_content`` (Meta's
``{{ad.id}}``) or the ad of the Meta lead-form lead the contact came from.
Layer 2 (identity): the contact's hashed email / phone equals the hashed identity of a lead-form
lead, or of another contact attributed at layer 1, created inside the window before the contact.
Layer 3 (probabilistic): fractional credit over candidate ads (the campaign named by UTM or
source data, else the account's ads with clicks then). Default weights (``landing_leads``): each
candidate's landing-page leads on the contact's day (lead actions minus its lead-form leads, less
a share of the leads already explained by layer-1 contacts) plus a smoothing share of the leads
its clicks that day predict, times an optional deal propensity; the three parameters are chosen
by the likelihood of the known ad of the layer-1 landing contacts, scored as if only their
campaign were known (so the model also estimates its own layer-3 precision). Where no candidate
has such a weight, and with ``weights="clicks"``, time-decayed daily clicks weigh them.

Every deal's credits sum to 1, so value is conserved; deals that cannot be attributed come back
as ``layer 0`` rows with a null ad and a ``reason``. Pure polars: no Dagster, no HTTP, no files.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import polars as pl

from optimizer_assets.domain.capi import fbc_expr

__all__ = [
    "ATTRIBUTION_SCHEMA",
    "CONFIDENCE",
    "NON_PAID_SOCIAL_SOURCES",
    "attribute",
    "attribute_value",
    "layer_summary",
    "score_against_truth",
]

_TS = pl.Datetime("us", "UTC")

# Confidence that the credited ad is the source, per method. Lead-form ids come from Meta
# itself; a URL utm can be shared/forwarded; an email match is stronger than a phone match
# (shared family phones). Layer 3 rows carry their credit (the model's share) instead.
CONFIDENCE: dict[str, float] = {
    "lead_form": 1.0,
    "utm_content": 0.98,
    "identity_lead_email": 0.95,
    "identity_contact_email": 0.93,
    "identity_lead_phone": 0.9,
    "identity_contact_phone": 0.88,
}

ATTRIBUTION_SCHEMA: dict[str, pl.DataType] = {
    "deal_id": pl.Utf8(),
    "contact_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "ad_id": pl.Utf8(),
    "credit": pl.Float64(),
    "layer": pl.Int8(),
    "confidence": pl.Float64(),
    "method": pl.Utf8(),
    "reason": pl.Utf8(),
    "lead_id": pl.Utf8(),
    "fbclid": pl.Utf8(),
    "fbc": pl.Utf8(),
}

_DEALS = {"deal_id": pl.Utf8(), "account_id": pl.Utf8(), "created_at": _TS}
_DEAL_CONTACTS = {"deal_id": pl.Utf8(), "contact_id": pl.Utf8()}
_CONTACTS = {
    "contact_id": pl.Utf8(),
    "created_at": _TS,
    "email_sha256": pl.Utf8(),
    "phone_sha256": pl.Utf8(),
    "source": pl.Utf8(),
    "source_data_1": pl.Utf8(),
    "source_data_2": pl.Utf8(),
    "fbclid": pl.Utf8(),
    "fbc": pl.Utf8(),
    "utm_source": pl.Utf8(),
    "utm_campaign": pl.Utf8(),
    "utm_content": pl.Utf8(),
    "lead_id": pl.Utf8(),
}
_LEADS = {
    "lead_id": pl.Utf8(),
    "created_at": _TS,
    "account_id": pl.Utf8(),
    "ad_id": pl.Utf8(),
    "email_sha256": pl.Utf8(),
    "phone_sha256": pl.Utf8(),
}
_ADS = {
    "ad_id": pl.Utf8(),
    "campaign_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "created_at": _TS,
    "campaign_name": pl.Utf8(),
}
_INSIGHTS = {"date": pl.Date(), "ad_id": pl.Utf8()}

# HubSpot original sources that rule out a paid-social origin (the contact is not credited to
# Meta at layer 3 unless it also carries a Meta signal). Null and PAID_SOCIAL stay eligible.
NON_PAID_SOCIAL_SOURCES = frozenset(
    {
        "ORGANIC_SEARCH",
        "PAID_SEARCH",
        "EMAIL_MARKETING",
        "SOCIAL_MEDIA",
        "REFERRALS",
        "OTHER_CAMPAIGNS",
        "DIRECT_TRAFFIC",
        "OFFLINE",
        "AI_REFERRALS",
    }
)
_META_WORDS = r"(?i)facebook|instagram|meta|\bfb\b|\big\b"


def _conform(df: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Select ``schema`` columns with their types; absent columns become nulls."""
    if not df.columns:  # a table not created yet: no rows (literals alone would make one)
        return pl.DataFrame(schema=dict(schema))
    return df.select(
        [
            pl.col(c).cast(t) if c in df.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items()
        ]
    )


def _empty(schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=dict(schema))


def _contact_layer1(contacts: pl.DataFrame, leads: pl.DataFrame, ads: pl.DataFrame) -> pl.DataFrame:
    """Per contact: the layer-1 ad (lead-form lead first, then utm_content naming a known ad)."""
    # ingestion fills lead_id from source_data_2; fall back to it when missing
    contacts = contacts.with_columns(_lead_key=pl.coalesce("lead_id", "source_data_2"))
    keys = contacts.get_column("_lead_key").drop_nulls().unique().implode()
    lead_ads = (
        leads.filter(pl.col("lead_id").is_in(keys) & pl.col("ad_id").is_not_null())
        .select(
            pl.col("lead_id").alias("_lead_key"),
            pl.col("ad_id").alias("_lead_ad"),
            pl.col("account_id").alias("_lead_account"),
        )
        .unique(subset="_lead_key", keep="first", maintain_order=True)
    )
    utm_ads = ads.select(
        pl.col("ad_id").alias("utm_content"), pl.col("account_id").alias("_utm_account")
    )
    return (
        contacts.join(lead_ads, on="_lead_key", how="left")
        .join(utm_ads, on="utm_content", how="left")
        .with_columns(
            l1_ad=pl.coalesce(
                "_lead_ad",
                pl.when(pl.col("_utm_account").is_not_null()).then(pl.col("utm_content")),
            ),
            l1_method=pl.when(pl.col("_lead_ad").is_not_null())
            .then(pl.lit("lead_form"))
            .when(pl.col("_utm_account").is_not_null())
            .then(pl.lit("utm_content")),
            l1_account=pl.coalesce("_lead_account", "_utm_account"),
            l1_lead=pl.when(pl.col("_lead_ad").is_not_null()).then(pl.col("_lead_key")),
        )
        .drop("_lead_key", "_lead_ad", "_lead_account", "_utm_account")
    )


def _identities(leads: pl.DataFrame, l1_contacts: pl.DataFrame) -> pl.DataFrame:
    """Long table of hashed identities with a known ad: (account, kind, hash, created_at, ...).

    ``prio`` 0 = lead-form lead, 1 = layer-1 contact; one row per (account, kind, hash,
    created_at): the tie rule keeps the lead, then the smallest ad_id.
    """
    sources = [
        leads.select(
            "account_id",
            "created_at",
            "email_sha256",
            "phone_sha256",
            "ad_id",
            "lead_id",
            prio=pl.lit(0, dtype=pl.Int8),
        ),
        l1_contacts.select(
            pl.col("l1_account").alias("account_id"),
            "created_at",
            "email_sha256",
            "phone_sha256",
            pl.col("l1_ad").alias("ad_id"),
            pl.col("l1_lead").alias("lead_id"),
            prio=pl.lit(1, dtype=pl.Int8),
        ),
    ]
    wide = pl.concat(sources).filter(
        pl.col("ad_id").is_not_null()
        & pl.col("account_id").is_not_null()
        & pl.col("created_at").is_not_null()
    )
    return (
        pl.concat(
            [
                wide.select(
                    "account_id",
                    pl.lit(kind).alias("kind"),
                    pl.col(f"{kind}_sha256").alias("hash"),
                    "created_at",
                    "ad_id",
                    "lead_id",
                    "prio",
                )
                for kind in ("email", "phone")
            ]
        )
        .filter(pl.col("hash").is_not_null())
        .sort("created_at", "prio", "ad_id")
        .unique(subset=["account_id", "kind", "hash", "created_at"], keep="first")
        .sort("created_at")
    )


def _layer2(pending: pl.DataFrame, identities: pl.DataFrame, window: timedelta) -> pl.DataFrame:
    """Per pending pair (_pair): most recent identity match inside ``window`` before the contact.

    Ties on time: lead-form lead before contact, email before phone, smallest ad_id.
    """
    left = (
        pl.concat(
            [
                pending.select(
                    "_pair",
                    "account_id",
                    pl.lit(kind).alias("kind"),
                    pl.col(f"{kind}_sha256").alias("hash"),
                    "created_at",
                )
                for kind in ("email", "phone")
            ]
        )
        .filter(pl.col("hash").is_not_null() & pl.col("created_at").is_not_null())
        .sort("created_at")
    )
    right = identities.select(
        "account_id",
        "kind",
        "hash",
        "created_at",
        pl.col("created_at").alias("_match_at"),
        "ad_id",
        "lead_id",
        "prio",
    )
    matched = left.join_asof(
        right,
        on="created_at",
        by=["account_id", "kind", "hash"],
        strategy="backward",
        tolerance=window,
        check_sortedness=False,  # both sides sorted on created_at above
    ).filter(pl.col("ad_id").is_not_null())
    return (
        matched.sort(
            ["_pair", "_match_at", "prio", "kind", "ad_id"],
            descending=[False, True, False, False, False],
        )
        .unique(subset="_pair", keep="first")
        .select(
            "_pair",
            pl.col("ad_id").alias("l2_ad"),
            pl.col("lead_id").alias("l2_lead"),
            pl.format(
                "identity_{}_{}",
                pl.when(pl.col("prio") == 0).then(pl.lit("lead")).otherwise(pl.lit("contact")),
                "kind",
            ).alias("l2_method"),
        )
    )


def _decayed_ad_day_weights(
    insights: pl.DataFrame,
    days: pl.Series,
    lookback_days: int,
    half_life_days: float,
    weight_column: str,
) -> pl.DataFrame:
    """w(ad, day D) = sum over k in 0..lookback of weight_column(ad, D-k) * 0.5**(k/half_life)."""
    offsets = pl.DataFrame({"_k": list(range(lookback_days + 1))}).with_columns(
        _decay=0.5 ** (pl.col("_k").cast(pl.Float64) / half_life_days)
    )
    if days.len() == 0:
        return pl.DataFrame(schema={"ad_id": pl.Utf8, "_day": pl.Date, "_w": pl.Float64})
    lo = days.min() - timedelta(days=lookback_days)  # type: ignore[operator]
    hi = days.max()
    daily = (
        insights.filter(pl.col("date").is_between(lo, hi))
        .group_by("ad_id", "date")
        .agg(pl.col(weight_column).cast(pl.Float64).fill_null(0.0).sum().alias("_x"))
        .filter(pl.col("_x") > 0)
    )
    return (
        daily.join(offsets, how="cross")
        .with_columns(_day=pl.col("date") + pl.duration(days=pl.col("_k")))
        .filter(pl.col("_day").is_in(days.implode()))
        .group_by("ad_id", "_day")
        .agg((pl.col("_x") * pl.col("_decay")).sum().alias("_w"))
    )


def _landing_features(
    insights: pl.DataFrame,
    leads: pl.DataFrame,
    ads: pl.DataFrame,
    weight_column: str,
    rate_prior_clicks: float,
) -> pl.DataFrame:
    """Per (ad, day): landing-page leads and the landing leads expected from that day's clicks.

    ``_land`` = the day's lead actions minus the ad's lead-form leads created that day (what the
    pixel reported from the landing page; a lead-form ad's form leads cannot produce a landing
    contact). ``_mu`` = the day's ``weight_column`` x the ad's landing leads per click over the
    whole history, shrunk towards its account's rate by ``rate_prior_clicks`` pseudo-clicks: it
    stands in for landing leads the pixel did not report. ``_land_tot``: the ad's total.
    """
    daily = insights.group_by("ad_id", "date").agg(
        _actions=pl.col("leads").cast(pl.Float64).fill_null(0.0).sum(),
        _clicks=pl.col(weight_column).cast(pl.Float64).fill_null(0.0).sum(),
    )
    form = (
        leads.filter(pl.col("ad_id").is_not_null() & pl.col("created_at").is_not_null())
        .group_by("ad_id", date=pl.col("created_at").dt.date())
        .agg(_form=pl.len().cast(pl.Float64))
    )
    daily = (
        daily.join(form, on=["ad_id", "date"], how="left")
        .with_columns(_land=(pl.col("_actions") - pl.col("_form").fill_null(0.0)).clip(0.0))
        .join(ads.select("ad_id", "account_id"), on="ad_id", how="left")
    )
    per_ad = daily.group_by("ad_id", "account_id").agg(
        _land_tot=pl.col("_land").sum(), _clicks_tot=pl.col("_clicks").sum()
    )
    rate = (
        pl.col("_land_tot").sum().over("account_id")
        / pl.col("_clicks_tot").sum().over("account_id")
    ).fill_nan(0.0)
    per_ad = per_ad.with_columns(
        _lpc=(pl.col("_land_tot") + rate_prior_clicks * rate)
        / (pl.col("_clicks_tot") + rate_prior_clicks)
    )
    return daily.join(per_ad.select("ad_id", "_lpc", "_land_tot"), on="ad_id", how="left").select(
        "ad_id",
        pl.col("date").alias("_day"),
        "_land",
        (pl.col("_clicks") * pl.col("_lpc").fill_nan(0.0)).alias("_mu"),
        "_land_tot",
    )


# Layer-3 model grid (calibrated on layer-1 landing contacts, whose ad is known): smoothing
# beta weighs the click-expected leads against the reported ones; power gamma weighs each
# ad's deal propensity (its layer-1 deals per landing lead, shrunk by PROPENSITY_PRIOR leads).
SMOOTHING_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0)
PROPENSITY_GRID = (0.0, 0.5, 1.0)
KNOWN_GRID = (0.0, 0.35, 0.7, 1.0)
PROPENSITY_PRIOR = 20.0
_P_FLOOR = 1e-6  # probability floor of the true ad in the calibration log-likelihood


def _candidates(
    needed: pl.DataFrame, group_ads: pl.DataFrame, features: pl.DataFrame
) -> pl.DataFrame:
    """(_g, _day) x the group's ads created by then, with their landing features (0 if none)."""
    return (
        needed.join(group_ads, on="_g")
        # an ad created after the day cannot have produced the contact
        .filter(pl.col("created_at").is_null() | (pl.col("created_at").dt.date() <= pl.col("_day")))
        .join(features, on=["ad_id", "_day"], how="left")
        .with_columns(pl.col("_land", "_mu").fill_null(0.0))
    )


def _propensity(labeled: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """Per ad: layer-1 landing deals (``_n1``) and landing leads (``_land_tot``) + the mean."""
    totals = features.group_by("ad_id").agg(pl.col("_land_tot").max().fill_null(0.0))
    n1 = labeled.group_by(pl.col("_true_ad").alias("ad_id")).agg(_n1=pl.len().cast(pl.Float64))
    out = totals.join(n1, on="ad_id", how="full", coalesce=True).with_columns(
        pl.col("_land_tot", "_n1").fill_null(0.0)
    )
    mean = out["_n1"].sum() / out["_land_tot"].sum() if out["_land_tot"].sum() > 0 else 1.0
    return out.with_columns(_gbar=pl.lit(mean, dtype=pl.Float64))


def _propensity_expr(loo: pl.Expr | float = 0.0) -> pl.Expr:
    """Shrunk deal propensity; ``loo`` removes a labeled contact's own deal (leave-one-out)."""
    return (
        pl.col("_n1").fill_null(0.0) - loo + PROPENSITY_PRIOR * pl.col("_gbar").fill_null(1.0)
    ) / (pl.col("_land_tot").fill_null(0.0) + PROPENSITY_PRIOR)


def _weight_expr(beta: float, gamma: float, delta: float) -> pl.Expr:
    """Layer-3 weight of a candidate ad for a contact of the day: (landing leads not explained
    by known layer-1 contacts + beta x click-expected leads) x deal propensity ** gamma."""
    unexplained = (pl.col("_land") - delta * pl.col("_k1").fill_null(0.0)).clip(0.0)
    return (unexplained + beta * pl.col("_mu")) * _propensity_expr().pow(gamma)


def _calibrate(
    labeled: pl.DataFrame,
    group_ads: pl.DataFrame,
    features: pl.DataFrame,
    propensity: pl.DataFrame,
    sample: int,
) -> dict[str, float]:
    """Grid-search (smoothing, propensity power, known share) by the likelihood of the known ad.

    ``labeled``: layer-1 landing contacts (``_g`` = their ad's campaign, ``_day``, ``_true_ad``);
    each is scored as if only its campaign were known, exactly like a layer-3 contact, with its
    own deal left out of every count it would otherwise be part of.
    """
    picked = (
        labeled.sort(pl.col("_key").hash(20261101)).head(sample).with_row_index("_i")
    )  # a deterministic sample, integer keys
    rows = (
        picked.join(
            _candidates(picked.select("_g", "_day").unique(), group_ads, features),
            on=["_g", "_day"],
        )
        .join(propensity, on="ad_id", how="left")
        .with_columns(_self=(pl.col("ad_id") == pl.col("_true_ad")).cast(pl.Float64))
    )
    shape = pl.DataFrame(
        [(g, k) for g in PROPENSITY_GRID for k in KNOWN_GRID],
        schema={"_gamma": pl.Float64, "_delta": pl.Float64},
        orient="row",
    )
    # the weight is linear in beta: sum over candidates once per (gamma, delta), then any beta
    unexplained = (pl.col("_land") - pl.col("_delta") * (pl.col("_k1") - pl.col("_self"))).clip(0.0)
    prop = _propensity_expr(pl.col("_self")).pow(pl.col("_gamma"))
    sums = (
        rows.join(shape, how="cross")
        .with_columns(_u=unexplained * prop, _v=pl.col("_mu") * prop)
        .group_by("_i", "_gamma", "_delta")
        .agg(
            _a=pl.col("_u").sum(),
            _b=pl.col("_v").sum(),
            _at=(pl.col("_u") * pl.col("_self")).sum(),
            _bt=(pl.col("_v") * pl.col("_self")).sum(),
        )
    )
    betas = pl.DataFrame({"_beta": SMOOTHING_GRID}, schema={"_beta": pl.Float64})
    params = ["_beta", "_gamma", "_delta"]
    scored = (
        sums.join(betas, how="cross")
        .with_columns(
            _p=(pl.col("_at") + pl.col("_beta") * pl.col("_bt"))
            / (pl.col("_a") + pl.col("_beta") * pl.col("_b"))
        )
        .with_columns(_p=pl.col("_p").fill_nan(0.0).fill_null(0.0))
        .with_columns(_ll=pl.col("_p").clip(_P_FLOOR).log())
        .group_by(*params)
        .agg(pl.col("_ll").mean(), pl.col("_p").mean())
        # best log-likelihood; ties: the simplest model (less smoothing, no propensity/known)
        .sort(["_ll", *params], descending=[True, False, False, False])
    )
    if scored.is_empty():
        return {}
    best = scored.head(1)
    return {
        "smoothing": float(best["_beta"][0]),
        "propensity_power": float(best["_gamma"][0]),
        "known_share": float(best["_delta"][0]),
        "calibration_contacts": float(picked.height),
        "calibration_loglik": float(best["_ll"][0]),
        "calibration_mean_p": float(best["_p"][0]),
    }


RATE_PRIOR_CLICKS = 200.0  # pseudo-clicks shrinking an ad's leads-per-click to its account's
DEFAULT_SMOOTHING = 0.35  # used when there are no layer-1 landing contacts to calibrate on


def _empty_features() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"ad_id": pl.Utf8, "_day": pl.Date, "_land": pl.Float64, "_mu": pl.Float64}
    )


def _landing_weights(
    cand: pl.DataFrame,
    group_ads: pl.DataFrame,
    insights: pl.DataFrame,
    leads: pl.DataFrame,
    ads: pl.DataFrame,
    labeled: pl.DataFrame,
    *,
    weight_column: str,
    day: pl.Expr,
    calibration_size: int,
    diagnostics: dict | None,
) -> pl.DataFrame:
    """Replace candidates' click weights ``_w`` by calibrated landing-lead weights.

    ``w = (landing leads that day + smoothing x click-expected leads) x propensity ** power``;
    (smoothing, power) maximize the likelihood of the known ad of layer-1 landing contacts.
    A (group, day) whose landing weights are all 0 keeps its decayed-click weights.
    """
    if "leads" not in insights.columns:  # no lead counts: nothing better than clicks
        return cand
    features = _landing_features(insights, leads, ads, weight_column, RATE_PRIOR_CLICKS)
    lab = labeled.with_columns(_day=day).select("_key", "_g", "_day", "_true_ad")
    # layer-1 landing contacts per (ad, day): reported leads they already explain
    known = lab.group_by(pl.col("_true_ad").alias("ad_id"), "_day").agg(
        _k1=pl.len().cast(pl.Float64)
    )
    features = features.join(known, on=["ad_id", "_day"], how="full", coalesce=True).with_columns(
        pl.col("_land", "_mu", "_k1").fill_null(0.0)
    )
    propensity = _propensity(lab, features)
    params = _calibrate(lab, group_ads, features, propensity, calibration_size)
    beta = params.get("smoothing", DEFAULT_SMOOTHING)
    gamma = params.get("propensity_power", 0.0)
    delta = params.get("known_share", 0.0)
    if diagnostics is not None:
        diagnostics.update(
            {
                "weights": "landing_leads",
                **params,
                "smoothing": beta,
                "propensity_power": gamma,
                "known_share": delta,
            }
        )
    out = (
        cand.drop("_land", "_mu")
        .join(
            features.select("ad_id", "_day", "_land", "_mu", "_k1"),
            on=["ad_id", "_day"],
            how="left",
        )
        .with_columns(pl.col("_land", "_mu", "_k1").fill_null(0.0))
        .join(propensity.select("ad_id", "_n1", "_land_tot", "_gbar"), on="ad_id", how="left")
        .with_columns(_lw=_weight_expr(beta, gamma, delta))
    )
    return out.with_columns(
        _w=pl.when(pl.col("_lw").sum().over("_g", "_day") > 0)
        .then(pl.col("_lw"))
        .otherwise(pl.col("_w"))
    ).drop("_land", "_mu", "_k1", "_n1", "_land_tot", "_gbar", "_lw")


def _layer3(
    chosen: pl.DataFrame,
    ads: pl.DataFrame,
    insights: pl.DataFrame,
    *,
    leads: pl.DataFrame,
    labeled: pl.DataFrame,
    lookback_days: int,
    half_life_days: float,
    weight_column: str,
    max_candidates: int | None,
    weights: str,
    click_lag: timedelta,
    calibration_size: int,
    diagnostics: dict | None,
) -> pl.DataFrame:
    """Fractional credit rows (deal_id, ad_id, credit, method) for the chosen pending contacts."""
    # candidate groups: campaign by id (global), campaign by name (within the deal's account),
    # the account's ads (fallback); "group" key strings keep one weight computation per group/day
    by_id = ads.filter(pl.col("campaign_id").is_not_null()).select(
        pl.format("c:{}", "campaign_id").alias("_g"), "ad_id", "created_at"
    )
    by_name = ads.filter(pl.col("campaign_name").is_not_null()).select(
        pl.format("n:{}:{}", "account_id", "campaign_name").alias("_g"), "ad_id", "created_at"
    )
    by_account = ads.filter(pl.col("account_id").is_not_null()).select(
        pl.format("a:{}", "account_id").alias("_g"), "ad_id", "created_at"
    )
    group_ads = pl.concat([by_id, by_name, by_account]).unique(subset=["_g", "ad_id"])
    known_groups = group_ads.get_column("_g").unique().implode()

    def first_known(*keys: pl.Expr) -> pl.Expr:
        out = pl.lit(None, dtype=pl.Utf8)
        for key in reversed(keys):  # a handful of expressions, not rows
            out = pl.when(key.is_in(known_groups)).then(key).otherwise(out)
        return out

    utm_id = pl.format("c:{}", "utm_campaign")
    utm_name = pl.format("n:{}:{}", "account_id", "utm_campaign")
    src_id = pl.format("c:{}", "source_data_2")
    src_name = pl.format("n:{}:{}", "account_id", "source_data_2")
    account = pl.format("a:{}", "account_id")
    day = (pl.col("created_at") - click_lag).dt.date()
    work = chosen.with_columns(
        _g=first_known(utm_id, utm_name, src_id, src_name, account),
        _day=day,
    ).with_columns(
        method=pl.when(pl.col("_g").str.starts_with("a:"))
        .then(pl.lit("account_activity"))
        .when((pl.col("_g") == utm_id) | (pl.col("_g") == utm_name))
        .then(pl.lit("utm_campaign"))
        .otherwise(pl.lit("source_data_campaign"))
    )
    needed = work.filter(pl.col("_g").is_not_null()).select("_g", "_day").unique()
    clicks = _decayed_ad_day_weights(
        insights, needed.get_column("_day").unique(), lookback_days, half_life_days, weight_column
    )
    cand = (
        _candidates(needed, group_ads, _empty_features())
        .join(clicks, on=["ad_id", "_day"], how="left")
        .with_columns(pl.col("_w").fill_null(0.0))
        # account fallback: only ads active (weighted clicks > 0) then
        .filter(~pl.col("_g").str.starts_with("a:") | (pl.col("_w") > 0))
    )
    if weights == "landing_leads" and cand.height:
        cand = _landing_weights(
            cand,
            group_ads,
            insights,
            leads,
            ads,
            labeled,
            weight_column=weight_column,
            day=day,
            calibration_size=calibration_size,
            diagnostics=diagnostics,
        )
    if max_candidates is not None:
        cand = cand.sort("_g", "_day", "ad_id").filter(  # ties: smallest ad_id stays
            pl.col("_w").rank("ordinal", descending=True).over("_g", "_day") <= max_candidates
        )
    cand = (
        cand.with_columns(
            _total=pl.col("_w").sum().over("_g", "_day"), _n=pl.len().over("_g", "_day")
        )
        .with_columns(
            # a named campaign with no clicks in the window: equal shares over its ads
            credit=pl.when(pl.col("_total") > 0)
            .then(pl.col("_w") / pl.col("_total"))
            .otherwise(1.0 / pl.col("_n"))
        )
        .filter(pl.col("credit") > 0)  # clicked neighbours take it all from unclicked ads
    )
    return work.join(cand.select("_g", "_day", "ad_id", "credit"), on=["_g", "_day"], how="left")


def attribute(
    deals: pl.DataFrame,
    deal_contacts: pl.DataFrame,
    contacts: pl.DataFrame,
    leads: pl.DataFrame,
    insights: pl.DataFrame,
    ads: pl.DataFrame,
    *,
    window_days: int = 7,
    half_life_days: float = 2.0,
    lookback_days: int | None = None,
    weight_column: str = "clicks",
    campaigns: pl.DataFrame | None = None,
    max_candidates: int | None = None,
    paid_sources_only: bool = True,
    weights: str = "landing_leads",
    click_lag_minutes: float = 15.0,
    calibration_size: int = 3_000,
    diagnostics: dict | None = None,
) -> pl.DataFrame:
    """Attribute each deal to Meta ads; one row per (deal, ad), ``ATTRIBUTION_SCHEMA`` columns.

    Inputs follow the warehouse contracts: ``deals`` (hubspot_deals: deal_id, account_id,
    created_at), ``deal_contacts``, ``contacts`` (hubspot_contacts), ``leads`` (meta_leads),
    ``insights`` (meta_ad_insights: date, ad_id, ``weight_column``), ``ads`` (meta_ads: ad_id,
    campaign_id, account_id, created_at, optional campaign_name). ``campaigns`` (campaign_id,
    name) optionally supplies campaign names, which ``meta_ads`` does not carry; without them
    campaign names in utm_campaign / source_data_2 cannot be resolved (ids still are).

    A deal is attributed through one of its contacts: the one with the best layer, then the
    earliest created, then the smallest contact_id. Layer 1: lead-form lead (contact lead_id or
    source_data_2 -> meta_leads) before utm_content naming an ad in ``ads``; credit 1. Layer 2:
    same account, email/phone hash equal to a lead-form lead or a layer-1 contact created in
    ``[contact.created_at - window_days, contact.created_at]`` (both ends inclusive); most
    recent wins, ties -> lead before contact, email before phone, smallest ad_id; credit 1.
    Layer 3: candidates are the ads of the campaign named by utm_campaign (id, then name in the
    deal's account), else by source_data_2, else the account's ads with clicks in the lookback.
    ``weights="landing_leads"`` (default, needs a ``leads`` column in ``insights``) weighs each
    by ``(max(0, landing leads - k x layer-1 contacts) + b x clicks x leads-per-click) x
    propensity ** g`` on the day of ``created_at - click_lag_minutes``; (b, k, g) are fitted
    on up to ``calibration_size`` layer-1 landing contacts (module docstring). Groups where that
    weight is 0 everywhere, and ``weights="clicks"``, use ``weight_column`` over the
    ``lookback_days`` (default ``window_days``) days up to the contact's day, decayed by
    ``0.5 ** (age_days / half_life_days)``. Credits are normalized to 1 (equal shares when a
    named campaign has no clicks). A ``diagnostics`` dict, when given, receives the fitted
    parameters and the calibration's mean probability of the true ad. ``max_candidates``
    keeps only the top-K candidates (renormalized). With ``paid_sources_only`` a contact whose
    HubSpot source is a known non-paid-social one (``NON_PAID_SOCIAL_SOURCES``) and which has
    no Meta signal is not given layer-3 credit.

    ``method``: lead_form, utm_content, identity_{lead,contact}_{email,phone}, utm_campaign,
    source_data_campaign, account_activity. Deals that cannot be attributed are returned as
    one row with ``layer`` 0, null ``ad_id``, credit 1 and ``reason`` in {no_contact,
    not_paid_social, no_candidates}. ``confidence`` is
    ``CONFIDENCE[method]`` at layers 1-2 and the credit at layer 3. ``fbc`` is the contact's
    fbc, else built from its fbclid as ``fb.1.{created_at ms}.{fbclid}``; ``lead_id`` is the
    contact's (or the identity-matched) Meta lead id for CAPI's ``user_data.lead_id``.
    """
    if weights not in ("landing_leads", "clicks"):
        raise ValueError(f"weights must be 'landing_leads' or 'clicks', got {weights!r}")
    window = timedelta(days=window_days)
    lookback = window_days if lookback_days is None else lookback_days
    deals_c = _conform(deals, _DEALS).unique(subset="deal_id", keep="last", maintain_order=True)
    leads_c = _conform(leads, _LEADS)
    ads_c = _conform(ads, _ADS).unique(subset="ad_id", keep="last", maintain_order=True)
    if campaigns is not None and campaigns.height:
        names = _conform(
            campaigns.rename({"name": "campaign_name"})
            if "name" in campaigns.columns
            else campaigns,
            {"campaign_id": pl.Utf8(), "campaign_name": pl.Utf8()},
        ).unique(subset="campaign_id", keep="last")
        ads_c = (
            ads_c.join(names, on="campaign_id", how="left", suffix="_cat")
            .with_columns(campaign_name=pl.coalesce("campaign_name", "campaign_name_cat"))
            .drop("campaign_name_cat")
        )
    with_leads = {"leads": pl.Float64()} if "leads" in insights.columns else {}
    insights_c = _conform(insights, {**_INSIGHTS, weight_column: pl.Float64(), **with_leads})
    contacts_c = _conform(contacts, _CONTACTS)

    # one row per (deal, contact) with the deal's account and the contact's layer-1 ad
    pairs = (
        _conform(deal_contacts, _DEAL_CONTACTS)
        .unique()
        .join(deals_c.select("deal_id", "account_id"), on="deal_id")
        .join(contacts_c, on="contact_id")
        .unique(subset=["deal_id", "contact_id"], keep="last", maintain_order=True)
        .pipe(_contact_layer1, leads_c, ads_c)
        .with_row_index("_pair")
    )
    pending = pairs.filter(pl.col("l1_ad").is_null())
    # identity pool limited to leads/contacts sharing a hash with a pending contact (the
    # full pool is ~all leads and contacts; only these can ever match)
    emails = pending.get_column("email_sha256").drop_nulls().unique().implode()
    phones = pending.get_column("phone_sha256").drop_nulls().unique().implode()
    shares_hash = pl.col("email_sha256").is_in(emails) | pl.col("phone_sha256").is_in(phones)
    pool_contacts = _contact_layer1(contacts_c.filter(shares_hash), leads_c, ads_c)
    identities = _identities(
        leads_c.filter(shares_hash), pool_contacts.filter(pl.col("l1_ad").is_not_null())
    )
    l2 = _layer2(pending, identities, window)
    meta_signal = (
        pl.col("fbclid").is_not_null()
        | pl.col("utm_campaign").is_not_null()
        | pl.col("utm_source").str.contains(_META_WORDS).fill_null(False)
        | pl.col("source_data_1").str.contains(_META_WORDS).fill_null(False)
    )
    eligible = (
        pl.col("source").is_null()
        | ~pl.col("source").str.to_uppercase().is_in(list(NON_PAID_SOCIAL_SOURCES))
        | meta_signal
        if paid_sources_only
        else pl.lit(True)
    )
    pairs = pairs.join(l2, on="_pair", how="left").with_columns(
        layer=pl.when(pl.col("l1_ad").is_not_null())
        .then(1)
        .when(pl.col("l2_ad").is_not_null())
        .then(2)
        .when(eligible)
        .then(3)
        .otherwise(9)
        .cast(pl.Int8),
        ad_id=pl.coalesce("l1_ad", "l2_ad"),
        method=pl.coalesce("l1_method", "l2_method"),
        lead_id=pl.coalesce("l1_lead", "l2_lead", "lead_id"),
        fbc=pl.coalesce("fbc", fbc_expr("fbclid", "created_at")),
    )
    chosen = pairs.sort("deal_id", "layer", "created_at", "contact_id", nulls_last=True).unique(
        subset="deal_id", keep="first"
    )
    known = chosen.filter(pl.col("layer") <= 2).with_columns(
        credit=pl.lit(1.0),
        confidence=pl.col("method").replace_strict(
            CONFIDENCE, default=None, return_dtype=pl.Float64
        ),
    )
    # landing contacts whose ad is known: the calibration set of layer 3
    labeled = (
        pairs.filter(pl.col("l1_method") == "utm_content")
        .unique(subset="contact_id")
        .join(ads_c.select(pl.col("ad_id").alias("l1_ad"), "campaign_id"), on="l1_ad")
        .select(
            pl.col("contact_id").alias("_key"),
            pl.format("c:{}", pl.col("campaign_id")).alias("_g"),
            "created_at",
            pl.col("l1_ad").alias("_true_ad"),
        )
        .filter(pl.col("created_at").is_not_null())
    )
    l3 = _layer3(
        chosen.filter(pl.col("layer") == 3).drop("ad_id", "method"),
        ads_c,
        insights_c,
        leads=leads_c,
        labeled=labeled,
        lookback_days=lookback,
        half_life_days=half_life_days,
        weight_column=weight_column,
        max_candidates=max_candidates,
        weights=weights,
        click_lag=timedelta(minutes=click_lag_minutes),
        calibration_size=calibration_size,
        diagnostics=diagnostics,
    )
    l3_rows = l3.filter(pl.col("credit").is_not_null()).with_columns(confidence=pl.col("credit"))
    unattributed = pl.concat(
        [
            l3.filter(pl.col("credit").is_null())
            .select("deal_id", "contact_id", "account_id", "lead_id", "fbclid", "fbc")
            .with_columns(reason=pl.lit("no_candidates")),
            chosen.filter(pl.col("layer") == 9)
            .select("deal_id", "contact_id", "account_id", "lead_id", "fbclid", "fbc")
            .with_columns(reason=pl.lit("not_paid_social")),
            deals_c.join(chosen.select("deal_id"), on="deal_id", how="anti")
            .select("deal_id", "account_id")
            .with_columns(reason=pl.lit("no_contact")),
        ],
        how="diagonal_relaxed",
    ).with_columns(layer=pl.lit(0, dtype=pl.Int8), credit=pl.lit(1.0), confidence=pl.lit(0.0))
    return pl.concat(
        [_conform(f, ATTRIBUTION_SCHEMA) for f in (known, l3_rows, unattributed)],
    ).sort("deal_id", "ad_id", nulls_last=True)


def attribute_value(attribution: pl.DataFrame, revenue: pl.DataFrame) -> pl.DataFrame:
    """Attributed value per (day, account, ad, currency) from ``synthetic_revenue`` events.

    Each event's ``value_delta`` is split over the deal's ads by credit and dated by the day
    of ``occurred_at`` (UTC). Events of deals with no attribution row, and layer-0 deals, land
    on ``ad_id`` null, so the day's total equals the revenue's total (value conserved; events
    into unknown stages carry null value and add nothing). Columns: date, account_id, ad_id,
    currency, value, value_layer0..value_layer3, events, deals.
    """
    rev = _conform(
        revenue,
        {
            "event_key": pl.Utf8(),
            "deal_id": pl.Utf8(),
            "account_id": pl.Utf8(),
            "occurred_at": _TS,
            "value_delta": pl.Float64(),
            "currency": pl.Utf8(),
        },
    )
    credits = _conform(
        attribution,
        {"deal_id": pl.Utf8(), "ad_id": pl.Utf8(), "credit": pl.Float64(), "layer": pl.Int8()},
    )
    split = (
        rev.join(credits, on="deal_id", how="left")
        .with_columns(
            pl.col("credit").fill_null(1.0),
            pl.col("layer").fill_null(0),
            date=pl.col("occurred_at").dt.date(),
        )
        .with_columns(_v=pl.col("value_delta") * pl.col("credit"))
    )
    return (
        split.group_by("date", "account_id", "ad_id", "currency")
        .agg(
            value=pl.col("_v").sum(),
            **{
                f"value_layer{n}": pl.col("_v").filter(pl.col("layer") == n).sum() for n in range(4)
            },
            events=pl.col("event_key").n_unique(),
            deals=pl.col("deal_id").n_unique(),
        )
        .sort("date", "account_id", "ad_id", nulls_last=True)
    )


def _per_deal(attribution: pl.DataFrame) -> pl.DataFrame:
    return (
        _conform(attribution, {"deal_id": pl.Utf8(), "layer": pl.Int8()})
        .group_by("deal_id")
        .agg(pl.col("layer").first())
    )


def layer_summary(
    attribution: pl.DataFrame, deal_values: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Share of deals and of value per layer (0 = unattributed, 1, 2, 3), one row per layer.

    ``deal_values`` has deal_id, value (e.g. ``revenue.deal_values``); without it the value
    columns are null. Columns: layer, deals, deal_share, value, value_share.
    """
    per_deal = _per_deal(attribution)
    if deal_values is not None:
        values = _conform(deal_values, {"deal_id": pl.Utf8(), "value": pl.Float64()})
        per_deal = per_deal.join(
            values.group_by("deal_id").agg(pl.col("value").sum()), on="deal_id", how="left"
        ).with_columns(pl.col("value").fill_null(0.0))
    else:
        per_deal = per_deal.with_columns(value=pl.lit(None, dtype=pl.Float64))
    layers = pl.DataFrame({"layer": [0, 1, 2, 3]}, schema={"layer": pl.Int8})
    counted = per_deal.group_by("layer").agg(
        deals=pl.len().cast(pl.Int64),
        value=pl.col("value").sum() if deal_values is not None else pl.lit(None, pl.Float64),
    )
    out = layers.join(counted, on="layer", how="left").with_columns(
        pl.col("deals").fill_null(0),
        pl.col("value").fill_null(0.0) if deal_values is not None else pl.col("value"),
    )
    total_deals, total_value = out["deals"].sum(), out["value"].sum()
    no_share = pl.lit(None, dtype=pl.Float64)
    return out.select(
        "layer",
        "deals",
        deal_share=pl.col("deals") / total_deals if total_deals else no_share,
        value="value",
        value_share=pl.col("value") / total_value
        if deal_values is not None and total_value
        else no_share,
    )


def score_against_truth(
    attribution: pl.DataFrame,
    truth_deals: pl.DataFrame,
    deal_values: pl.DataFrame | None = None,
) -> dict[str, float | int | None]:
    """Compare an attribution with the sandbox truth (truth columns: deal_id, true_ad_id, ...).

    Deal value comes from ``deal_values`` (deal_id, value), else truth's ``value_if_won``, else
    1 per deal. Deals of the truth missing from ``attribution`` count as unattributed. Keys:
    ``recovery`` (share of deal value credited to the true ad), ``recovery_deals`` (same, each
    deal weighing 1), ``precision_l12`` (share of layer-1/2 credit on the true ad), ``deals``,
    ``value``, per layer n in 0..3: ``layer{n}_deals``, ``layer{n}_deal_share``,
    ``layer{n}_value_share``, ``layer{n}_recovery`` (value-weighted credit on the true ad),
    ``layer{n}_precision`` (mean credit on the true ad); ``organic_deals`` (truth without an
    ad) and ``organic_credited_share`` (of those, share given to some ad). Deals with a true ad
    are the denominators; a metric with an empty denominator is None.
    """
    truth = _conform(
        truth_deals, {"deal_id": pl.Utf8(), "true_ad_id": pl.Utf8(), "value_if_won": pl.Float64()}
    ).unique(subset="deal_id", keep="first")
    if deal_values is not None:
        values = _conform(deal_values, {"deal_id": pl.Utf8(), "value": pl.Float64()})
        truth = truth.join(
            values.group_by("deal_id").agg(pl.col("value").sum()), on="deal_id", how="left"
        ).with_columns(pl.col("value").fill_null(0.0))
    elif "value_if_won" in truth_deals.columns:
        truth = truth.with_columns(value=pl.col("value_if_won").fill_null(0.0))
    else:
        truth = truth.with_columns(value=pl.lit(1.0))
    att = _conform(
        attribution,
        {"deal_id": pl.Utf8(), "ad_id": pl.Utf8(), "credit": pl.Float64(), "layer": pl.Int8()},
    )
    per_deal = (
        truth.join(att, on="deal_id", how="left")
        .group_by("deal_id")
        .agg(
            pl.col("true_ad_id").first(),
            pl.col("value").first(),
            pl.col("layer").fill_null(0).first(),
            credit_true=pl.col("credit")
            .filter(pl.col("ad_id") == pl.col("true_ad_id"))
            .sum()
            .fill_null(0.0),
        )
    )
    paid = per_deal.filter(pl.col("true_ad_id").is_not_null())
    organic = per_deal.filter(pl.col("true_ad_id").is_null())

    def ratio(num: float, den: float) -> float | None:
        return float(num) / float(den) if den else None

    def recovered(df: pl.DataFrame) -> float:
        return float((df["value"] * df["credit_true"]).sum())

    total_value = float(paid["value"].sum())
    out: dict[str, float | int | None] = {
        "deals": paid.height,
        "value": total_value,
        "recovery": ratio(recovered(paid), total_value),
        "recovery_deals": ratio(float(paid["credit_true"].sum()), paid.height),
    }
    l12 = paid.filter(pl.col("layer").is_in([1, 2]))
    out["precision_l12"] = ratio(float(l12["credit_true"].sum()), l12.height)
    for n in range(4):
        layer = paid.filter(pl.col("layer") == n)
        value = float(layer["value"].sum())
        out[f"layer{n}_deals"] = layer.height
        out[f"layer{n}_deal_share"] = ratio(layer.height, paid.height)
        out[f"layer{n}_value_share"] = ratio(value, total_value)
        out[f"layer{n}_recovery"] = ratio(recovered(layer), value)
        out[f"layer{n}_precision"] = ratio(float(layer["credit_true"].sum()), layer.height)
    out["organic_deals"] = organic.height
    out["organic_credited_share"] = ratio(
        organic.filter(pl.col("layer") > 0).height, organic.height
    )
    return out
