"""Graph API catalog frames -> the ``meta_ads`` warehouse rows; insights -> ``meta_ad_insights``."""

from __future__ import annotations

import polars as pl

from optimizer_assets.domain.capi import hash_identity_columns

UTC_US = pl.Datetime("us", "UTC")

META_ADS_SCHEMA = {
    "ad_id": pl.Utf8,
    "adset_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "account_id": pl.Utf8,
    "ad_name": pl.Utf8,
    "ad_status": pl.Utf8,
    "adset_status": pl.Utf8,
    "campaign_name": pl.Utf8,
    "created_at": UTC_US,
    "daily_budget": pl.Int64,
    "hook_type": pl.Utf8,
    "format": pl.Utf8,
    "cta": pl.Utf8,
    "emotion": pl.Utf8,
    "title": pl.Utf8,
    "body": pl.Utf8,
    "form_id": pl.Utf8,
}

INSIGHTS_SCHEMA = {
    "date": pl.Date,
    "account_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "adset_id": pl.Utf8,
    "ad_id": pl.Utf8,
    "spend": pl.Float64,
    "impressions": pl.Int64,
    "reach": pl.Int64,
    "clicks": pl.Int64,
    "inline_link_clicks": pl.Int64,
    "leads": pl.Int64,
}


def _col(frame: pl.DataFrame, name: str, dtype: pl.DataType) -> pl.Expr:
    return (pl.col(name) if name in frame.columns else pl.lit(None)).cast(dtype)


def catalog_frame(campaigns: pl.DataFrame, adsets: pl.DataFrame, ads: pl.DataFrame) -> pl.DataFrame:
    """One row per ad with its ad set's budget and status and its creative traits and copy."""
    if ads.is_empty():
        return pl.DataFrame(schema=META_ADS_SCHEMA)
    ad_rows = ads.select(
        "ad_id",
        "adset_id",
        "campaign_id",
        "account_id",
        _col(ads, "name", pl.Utf8).alias("ad_name"),
        _col(ads, "status", pl.Utf8).alias("ad_status"),
        _col(ads, "created_time", UTC_US).alias("created_at"),
        _col(ads, "creative_hook_type", pl.Utf8).alias("hook_type"),
        _col(ads, "creative_format", pl.Utf8).alias("format"),
        _col(ads, "creative_call_to_action_type", pl.Utf8).alias("cta"),
        _col(ads, "creative_emotion", pl.Utf8).alias("emotion"),
        _col(ads, "creative_title", pl.Utf8).alias("title"),
        _col(ads, "creative_body", pl.Utf8).alias("body"),
        _col(ads, "creative_lead_gen_form_id", pl.Utf8).alias("form_id"),
    )
    adset_rows = adsets.select(
        "adset_id",
        _col(adsets, "status", pl.Utf8).alias("adset_status"),
        _col(adsets, "daily_budget", pl.Int64).alias("daily_budget"),
    )
    campaign_rows = campaigns.select(
        "campaign_id", _col(campaigns, "name", pl.Utf8).alias("campaign_name")
    )
    return (
        ad_rows.join(adset_rows, on="adset_id", how="left")
        .join(campaign_rows, on="campaign_id", how="left")
        .select([pl.col(c).cast(t) for c, t in META_ADS_SCHEMA.items()])
        .sort("account_id", "ad_id")
    )


def insights_rows(insights: pl.DataFrame, account_id: str) -> pl.DataFrame:
    """Typed daily insights (``GraphClient.insights``) -> ``meta_ad_insights`` rows."""
    if insights.is_empty():
        return pl.DataFrame(schema=INSIGHTS_SCHEMA)
    return insights.select(
        pl.col("date_start").cast(pl.Date).alias("date"),
        pl.lit(account_id, pl.Utf8).alias("account_id"),
        *[
            _col(insights, c, t).fill_null(0) if t != pl.Utf8 else _col(insights, c, t)
            for c, t in list(INSIGHTS_SCHEMA.items())[2:]
        ],
    )


LEADS_SCHEMA = {
    "lead_id": pl.Utf8,
    "created_at": UTC_US,
    "account_id": pl.Utf8,
    "campaign_id": pl.Utf8,
    "adset_id": pl.Utf8,
    "ad_id": pl.Utf8,
    "form_id": pl.Utf8,
    "email_sha256": pl.Utf8,
    "phone_sha256": pl.Utf8,
    "fn_sha256": pl.Utf8,
    "ln_sha256": pl.Utf8,
}


def leads_frame(leads: list[dict], account_id: str, default_country: str = "us") -> pl.DataFrame:
    """Lead-form leads (``GraphClient.leads``) -> ``meta_leads`` rows, identities hashed here."""
    if not leads:
        return pl.DataFrame(schema=LEADS_SCHEMA)
    raw = pl.DataFrame(
        [
            {
                "lead_id": str(lead["lead_id"]),
                "created_at": lead.get("created_time"),
                "campaign_id": lead.get("campaign_id"),
                "adset_id": lead.get("adset_id"),
                "ad_id": lead.get("ad_id"),
                "form_id": lead.get("form_id"),
                "email": (lead.get("fields") or {}).get("email"),
                "phone": (lead.get("fields") or {}).get("phone_number"),
                "full_name": (lead.get("fields") or {}).get("full_name"),
            }
            for lead in leads
        ],
        schema={
            "lead_id": pl.Utf8,
            "created_at": UTC_US,
            **dict.fromkeys(("campaign_id", "adset_id", "ad_id", "form_id"), pl.Utf8),
            **dict.fromkeys(("email", "phone", "full_name"), pl.Utf8),
        },
    )
    hashed = hash_identity_columns(
        raw,
        {"email": "em", "phone": "ph", "full_name": "full_name"},
        default_country=default_country,
    )
    return hashed.with_columns(account_id=pl.lit(account_id, pl.Utf8)).select(
        [pl.col(c).cast(t) for c, t in LEADS_SCHEMA.items()]
    )
