"""Revenue + attribution on warehouse-shaped frames built from the default sandbox World vs truth.

Goal of the issue on the default sandbox: recovery >= 95% of value, layer 1-2 precision >= 98%.
Only precision is asserted against its goal; recovery is asserted against what the information
allows (layers 1-2 cover ~73% of value; layer 3 spreads the rest over 12-24 candidate ads of
which only daily counts are known), layer 3 must beat equal shares over the same candidates and
the landing-lead model must beat click weighting. The numbers are printed (-s) for reports.
"""

from __future__ import annotations

import polars as pl
import pytest

from optimizer_assets.domain.attribution import attribute, layer_summary, score_against_truth
from optimizer_assets.domain.capi import fbc_expr, hash_identity_columns
from optimizer_assets.domain.crm import parse_first_url
from optimizer_assets.domain.revenue import deal_values, map_pipeline_stages, synthetic_revenue
from optimizer_assets.sandbox.world import World, WorldConfig

DAYS = 21


def warehouse(world: World) -> dict[str, pl.DataFrame]:
    """The warehouse tables of INTERFACES.md, built directly from the world (hashed PII only)."""
    accounts = world.accounts()
    pipeline_account = dict(
        zip(accounts["hubspot_pipeline_id"].cast(pl.Utf8), accounts["account_id"], strict=True)
    )
    contacts = (
        hash_identity_columns(world.contacts(), {"email": "em", "phone": "ph"})
        .with_columns(parse_first_url(pl.col("hs_analytics_first_url")))
        .select(
            "contact_id",
            pl.col("createdate").alias("created_at"),
            "email_sha256",
            "phone_sha256",
            pl.col("hs_analytics_source").alias("source"),
            pl.col("hs_analytics_source_data_1").alias("source_data_1"),
            pl.col("hs_analytics_source_data_2").alias("source_data_2"),
            pl.coalesce("hs_facebook_click_id", "fbclid").alias("fbclid"),
            "utm_source",
            "utm_campaign",
            "utm_content",
            lead_id=pl.when(pl.col("hs_analytics_source_data_1") == "Facebook Lead Ads").then(
                "hs_analytics_source_data_2"
            ),
        )
        .with_columns(fbc=fbc_expr("fbclid", "created_at"))
    )
    leads = hash_identity_columns(world.leads(), {"email": "em", "phone": "ph"}).rename(
        {"created_time": "created_at"}
    )
    deals = world.deals().select(
        "deal_id",
        "pipeline",
        "dealstage",
        "amount",
        pl.col("createdate").alias("created_at"),
        pl.col("hs_lastmodifieddate").alias("updated_at"),
        account_id=pl.col("pipeline").replace_strict(
            pipeline_account, default=None, return_dtype=pl.Utf8
        ),
    )
    start, end = world.config.start.date(), world.now.date()
    insights = pl.concat([world.insights(a, start, end) for a in accounts["account_id"]]).rename(
        {"date_start": "date"}
    )
    events = (
        world.deal_stage_history()
        .join(deals.select("deal_id", "pipeline", "account_id", "amount"), on="deal_id")
        .sort("deal_id", "occurred_at")
        .select(
            pl.format("{}:{}", "deal_id", pl.int_range(pl.len()).over("deal_id")).alias(
                "event_key"
            ),
            "deal_id",
            "account_id",
            "pipeline",
            pl.col("dealstage").shift(1).over("deal_id").alias("from_stage"),
            pl.col("dealstage").alias("to_stage"),
            "occurred_at",
            "amount",
        )
    )
    return {
        "contacts": contacts,
        "leads": leads,
        "deals": deals,
        "deal_contacts": world.deal_contacts(),
        "ads": world.ads().rename({"created_time": "created_at"}),
        "campaigns": world.campaigns(),
        "insights": insights,
        "events": events,
    }


@pytest.fixture(scope="module")
def measured() -> dict:
    world = World(WorldConfig())
    world.advance(24 * DAYS)
    f = warehouse(world)
    revenue, unknown = synthetic_revenue(
        f["events"], map_pipeline_stages(world.pipelines()), f["deals"], currency="USD"
    )
    values = deal_values(revenue)
    inputs = [f[k] for k in ("deals", "deal_contacts", "contacts", "leads", "insights", "ads")]
    diagnostics: dict = {}
    result = attribute(*inputs, campaigns=f["campaigns"], diagnostics=diagnostics)
    by_clicks = attribute(*inputs, campaigns=f["campaigns"], weights="clicks")
    truth = world.truth_deals()
    return {
        "truth_contacts": world.truth_contacts().select(
            "contact_id", "true_ad_id", "path", "kept_click_id"
        ),
        "diagnostics": diagnostics,
        "clicks_score": score_against_truth(by_clicks, truth, values),
        "f": f,
        "revenue": revenue,
        "unknown": unknown,
        "values": values,
        "result": result,
        "truth": truth,
        "score": score_against_truth(result, truth, values),
    }


def test_sandbox_revenue_is_fully_mapped_and_matches_stages(measured: dict) -> None:
    assert measured["unknown"].height == 0
    values = measured["values"]
    assert values.height == measured["f"]["deals"].height
    won = values.filter(pl.col("stage") == "closed_won").join(
        measured["f"]["deals"].select("deal_id", "amount"), on="deal_id"
    )
    assert won.height > 0
    assert won["value"].to_list() == pytest.approx(won["amount"].fill_null(15_000.0).to_list())


def test_sandbox_attribution_against_truth(measured: dict) -> None:
    score, result = measured["score"], measured["result"]
    print("\nsandbox attribution score:", {k: v for k, v in score.items() if v is not None})
    print(layer_summary(result, measured["values"]))
    assert score["deals"] == measured["truth"].height
    assert score["precision_l12"] >= 0.98  # the goal for layers 1-2
    l12_value = score["layer1_value_share"] + score["layer2_value_share"]
    assert score["recovery"] >= l12_value * score["precision_l12"]
    # layer 3: the true ad must be a candidate, and weighting must beat equal shares
    layer3 = (
        result.filter(pl.col("layer") == 3)
        .join(measured["truth"].select("deal_id", "true_ad_id"), on="deal_id")
        .group_by("deal_id")
        .agg(
            hit=pl.col("credit").filter(pl.col("ad_id") == pl.col("true_ad_id")).sum(),
            uniform=1.0 / pl.len(),
            present=(pl.col("ad_id") == pl.col("true_ad_id")).any(),
        )
    )
    assert layer3.height > 0
    assert layer3["present"].mean() >= 0.95
    assert layer3["hit"].mean() > layer3["uniform"].mean()


def test_landing_lead_model_beats_clicks_and_knows_its_precision(measured: dict) -> None:
    score, clicks, diag = measured["score"], measured["clicks_score"], measured["diagnostics"]
    print("\nlayer-3 model:", diag)
    print(f"recovery {score['recovery']:.4f} (click weighting {clicks['recovery']:.4f})")
    assert score["layer3_recovery"] > clicks["layer3_recovery"]
    assert score["recovery"] > clicks["recovery"]
    # the calibration set (layer-1 landing contacts scored as if only their campaign were
    # known) predicts the layer-3 precision the truth measures
    assert diag["calibration_contacts"] > 100
    assert abs(diag["calibration_mean_p"] - score["layer3_precision"]) < 0.1


def test_recovery_stays_below_the_daily_information_bound(measured: dict) -> None:
    """An oracle that knows, per ad and day, how many click-less landing contacts with a deal
    it produced (the most any daily-count method could know) bounds layer 3 from above."""
    world_truth = measured["truth_contacts"]
    f, result, score = measured["f"], measured["result"], measured["score"]
    day = pl.col("created_at").dt.date()
    lost = (
        f["contacts"]
        .join(world_truth, on="contact_id")
        .join(f["deal_contacts"], on="contact_id", how="semi")
        .filter((pl.col("path") == "landing") & ~pl.col("kept_click_id"))
        .group_by(pl.col("true_ad_id").alias("ad_id"), day=day)
        .agg(n=pl.len())
    )
    ads = f["ads"].select("ad_id", "campaign_id", "account_id")
    layer3 = (
        result.filter(pl.col("layer") == 3)
        .group_by("deal_id")
        .agg(pl.col("contact_id", "method", "account_id").first())
        .join(f["contacts"].select("contact_id", day=day), on="contact_id")
        .join(measured["truth"].select("deal_id", "true_ad_id"), on="deal_id")
        .join(ads.rename({"ad_id": "true_ad_id", "account_id": "_acc"}), on="true_ad_id")
        .join(measured["values"].select("deal_id", "value"), on="deal_id")
    )
    by_campaign = pl.col("method") != "account_activity"
    candidates = pl.concat(
        [
            layer3.filter(by_campaign).join(ads.drop("account_id"), on="campaign_id"),
            layer3.filter(~by_campaign).join(ads.drop("campaign_id"), on="account_id"),
        ],
        how="diagonal_relaxed",
    ).join(lost, on=["ad_id", "day"], how="left")
    oracle = candidates.group_by("deal_id").agg(
        pl.col("value").first(),
        p=pl.col("n").filter(pl.col("ad_id") == pl.col("true_ad_id")).sum() / pl.col("n").sum(),
    )
    oracle_l3 = float((oracle["value"] * oracle["p"].fill_nan(0.0)).sum() / oracle["value"].sum())
    l12 = score["layer1_value_share"] + score["layer2_value_share"]
    bound = l12 * score["precision_l12"] + score["layer3_value_share"] * oracle_l3
    print(f"\nlayer-3 recovery {score['layer3_recovery']:.4f}, daily oracle {oracle_l3:.4f}; "
          f"recovery {score['recovery']:.4f}, bound {bound:.4f}")  # fmt: skip
    assert score["layer3_recovery"] < oracle_l3
    assert score["recovery"] < bound
