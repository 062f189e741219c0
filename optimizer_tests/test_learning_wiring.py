"""The learners wired into the allocator (issue 7): per-account ``learning:`` flags, and what
``ad_scores`` hands ``sampler.allocate`` when a flag is on (boost, winner priors, decayed
counts) or when the learners' tables are absent (nothing)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from optimizer_assets.defs import allocation
from optimizer_assets.domain import cross_account, performance, sampler
from optimizer_assets.domain import lag as lag_mod
from optimizer_assets.domain import winner_index as winners_mod
from optimizer_assets.settings import SettingsError, load_settings
from optimizer_assets.warehouse import Warehouse

NOW = datetime(2026, 11, 20, tzinfo=UTC)
A, B = "111", "222"  # two accounts


def write(tmp_path, text):
    path = tmp_path / "accounts.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ settings


def test_learning_flags_parse_with_defaults_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "defaults:\n  learning:\n    winner_priors: true\n"
        f"accounts:\n  - account_id: '{A}'\n    learning:\n      cross_account_boost: true\n"
        "      winner_priors: false\n",
    )
    settings = load_settings(path)
    a, other = settings.for_account(A).learning, settings.for_account("999").learning
    # drift_discount is not in the file: the built-in default (on) applies
    assert (a.cross_account_boost, a.winner_priors, a.drift_discount) == (True, False, True)
    assert (other.cross_account_boost, other.winner_priors) == (False, True)
    on = allocation.learning_accounts(settings, [A, "999"])
    assert on == {
        "cross_account_boost": {A},
        "winner_priors": {"999"},
        "drift_discount": {A, "999"},
        "forget_changes": {A, "999"},
    }
    off = load_settings(write(tmp_path, "defaults:\n  learning:\n    drift_discount: false\n"))
    assert allocation.learning_accounts(off, [A])["drift_discount"] == set()


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("defaults:\n  learning:\n    drift_discount: 'sometimes'\n", 3, "boolean"),
        ("defaults:\n  learning:\n    drift_discount: 1\n", 3, "boolean"),
        (f"accounts:\n  - account_id: '{A}'\n    learning:\n      boosts: true\n", 4, "boosts"),
        ("defaults:\n  learning:\n    forget_changes: 'yes'\n", 3, "boolean"),
        ("defaults:\n  learning:\n    forget_changes: 0\n", 3, "boolean"),
    ],
)
def test_bad_learning_flags_name_line_and_reason(tmp_path, text, line, reason):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert f"{path}:{line}:" in str(info.value)
    assert reason in str(info.value)


def test_checked_in_file_documents_every_flag():
    settings = load_settings()
    assert set(settings.defaults["learning"]) == set(allocation.LEARNING_FLAGS)
    # on by default only what the learning_regret benchmark showed lowers regret (README)
    assert settings.defaults["learning"] == {
        "cross_account_boost": False,
        "winner_priors": False,
        "drift_discount": True,
        "forget_changes": True,
    }


def test_forget_changes_flag_parses_per_account(tmp_path):
    path = write(
        tmp_path,
        f"defaults:\n  learning:\n    forget_changes: true\naccounts:\n  - account_id: '{A}'\n"
        "    learning:\n      forget_changes: false\n",
    )
    settings = load_settings(path)
    assert settings.for_account(A).learning.forget_changes is False
    assert settings.for_account("999").learning.forget_changes is True
    assert allocation.learning_accounts(settings, [A, "999"])["forget_changes"] == {"999"}
    # not in the file: the built-in default (on)
    assert load_settings(write(tmp_path, "defaults: {}\n")).for_account(A).learning.forget_changes


# ---------------------------------------------------------------------------- frames


def perf_frame() -> pl.DataFrame:
    """Per account: an old ad with evidence and two new twins (same traits, no evidence)."""
    rows = []
    for acc in (A, B):
        for i, (age_h, imps, clicks, spend, value) in enumerate(
            [(24 * 30, 40_000, 600, 600.0, 60_000.0), (20, 0, 0, 0.0, 0.0), (20, 0, 0, 0.0, 0.0)]
        ):
            rows.append(
                {
                    "ad_id": f"{acc}-{i}",
                    "adset_id": f"{acc}-s{i}",
                    "campaign_id": f"{acc}-c",
                    "account_id": acc,
                    "currency": "USD",
                    "created_at": NOW - timedelta(hours=age_h),
                    "age_hours": float(age_h),
                    "spend": spend,
                    "impressions": imps,
                    "clicks": clicks,
                    "pipeline_value": value,
                    "conversions": value / 3000.0,
                    "matured_spend": spend,
                    "lag_corrected_value": value,
                    "frequency": None,
                    "ctr_3d_change": None,
                    "current_budget": 30.0,
                    "min_budget": 5.0,
                    "adset_budget_minor": 3000,
                    "adset_min_budget_minor": 500,
                    "currency_offset": 100,
                    "hook_type": "question" if i == 1 else "story",
                    "format": "video",
                    "cta": "book_now",
                    "emotion": "hope",
                    "title": "Book a free consultation" if i == 1 else "Our story",
                    "body": "Smile again this week" if i == 1 else "Twenty years in town",
                }
            )
    return pl.DataFrame(rows).with_columns(pl.col("created_at").cast(pl.Datetime("us", "UTC")))


def patterns_frame() -> pl.DataFrame:
    row = {
        "pattern": "hook_type=question",
        "dims": "hook_type",
        "accounts_present": 4,
        "accounts_won": 3,
        "consistency": 0.75,
        "spend_won": 3000.0,
        "pipeline_value_won": 9000.0,
        "roas_won": 3.0,
        "median_account_roas": 2.5,
        "confidence": 0.5,
        "boost": 1.15,
        "reason": "hook_type=question wins in 3/4 accounts (pipeline ROAS 3.0, $3000 spend): +15%",
    }
    return pl.DataFrame([row]).cast(cross_account.PATTERN_SCHEMA)


def winners_frame() -> pl.DataFrame:
    """Winners of a third account, one a close copy of the new ad ``<acc>-1``."""
    return pl.DataFrame(
        {
            "ad_id": ["w1", "w2"],
            "account_id": ["333", "333"],
            "hook_type": ["question", "offer"],
            "format": ["video", "image"],
            "cta": ["book_now", "call_now"],
            "emotion": ["hope", "fear"],
            "title": ["Book a free consultation", "Half price today"],
            "body": ["Smile again this week", "Call before Friday"],
            "spend": [500.0, 400.0],
            "pipeline_value": [150_000.0, 20_000.0],
            "clicks": [300, 200],
            "impressions": [10_000, 8_000],
        }
    )


def allocate(perf: pl.DataFrame) -> pl.DataFrame:
    return performance.allocate_accounts(perf, {"*": sampler.SamplerConfig()}, now=NOW)


# ------------------------------------------------------------------------ apply_learning


def test_no_flag_or_no_table_changes_nothing():
    perf = perf_frame()
    assert performance.apply_learning(perf, now=NOW).equals(perf)
    # flags on, but every learner table absent / empty (first run)
    out = performance.apply_learning(
        perf,
        now=NOW,
        boost_accounts={A, B},
        prior_accounts={A, B},
        decay_accounts={A, B},
        patterns=pl.DataFrame(schema=cross_account.PATTERN_SCHEMA),
        index=None,
        drifts=pl.DataFrame(),
    )
    assert out.equals(perf)
    # tables present, no flag on
    out = performance.apply_learning(
        perf, now=NOW, patterns=patterns_frame(), index=winners_mod.build(winners_frame())
    )
    assert out.equals(perf)
    assert allocate(out).equals(allocate(perf))


def test_boost_reaches_allocate_and_names_the_pattern():
    perf = perf_frame()
    out = performance.apply_learning(perf, now=NOW, boost_accounts={A}, patterns=patterns_frame())
    boost = dict(zip(out["ad_id"], out["boost"], strict=True))
    assert boost[f"{A}-1"] == pytest.approx(1.15)  # new ad matching the pattern
    assert boost[f"{A}-2"] == 1.0  # new ad, no matching pattern
    assert boost[f"{A}-0"] == 1.0  # old ad: it has its own evidence
    assert boost[f"{B}-1"] == 1.0  # account B did not turn the flag on
    scores = allocate(out).join(allocate(perf).select("ad_id", "score"), on="ad_id", suffix="_0")
    row = scores.filter(pl.col("ad_id") == f"{A}-1").row(0, named=True)
    assert row["score"] == pytest.approx(1.15 * row["score_0"], rel=1e-6)
    assert "hook_type=question" in row["reason"]
    untouched = scores.filter(pl.col("account_id") == B)
    assert np.allclose(untouched["score"], untouched["score_0"])


def test_winner_priors_reach_allocate_for_new_ads_only():
    perf = perf_frame()
    index = winners_mod.build(winners_frame())
    out = performance.apply_learning(perf, now=NOW, prior_accounts={A}, index=index)
    got = {r["ad_id"]: r for r in out.iter_rows(named=True)}
    close = got[f"{A}-1"]
    assert close["prior_alpha"] > 1 and close["prior_beta"] > 1
    # shrunk between the winner's ROAS (300) and the account's pooled ROAS (100)
    assert 100.0 < close["prior_roas"] < 300.0
    assert "w1" in close["prior_reason"]
    assert got[f"{A}-0"]["prior_alpha"] is None  # old ad
    assert got[f"{B}-1"]["prior_alpha"] is None  # flag off in B
    scores = allocate(out).join(allocate(perf).select("ad_id", "score"), on="ad_id", suffix="_0")
    row = scores.filter(pl.col("ad_id") == f"{A}-1").row(0, named=True)
    assert row["score"] > row["score_0"]  # a strong winner's prior lifts the new ad
    assert "Cold-start prior" in row["reason"]


def test_drift_discount_decays_only_pre_drift_evidence():
    perf = perf_frame()
    changed = NOW - timedelta(days=5)
    drifts = pl.DataFrame(
        {
            "account_id": [A],
            "target": ["ctr"],
            "detected_at": [NOW - timedelta(days=3)],
            "changed_at": [changed],
        }
    ).with_columns(pl.col("detected_at", "changed_at").cast(pl.Datetime("us", "UTC")))
    # ad A-0: 30 days of even evidence, 5 of them after the change
    days = [date(2026, 10, 21) + timedelta(days=d) for d in range(30)]
    daily = pl.DataFrame(
        {
            "ad_id": [f"{A}-0"] * 30,
            "date": days,
            "impressions": [40_000 / 30] * 30,
            "clicks": [20.0] * 30,
            "spend": [20.0] * 30,
            "pipeline_value": [2000.0] * 30,
        }
    )
    out = performance.apply_learning(perf, now=NOW, decay_accounts={A}, drifts=drifts, daily=daily)
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    factor = row["evidence_factor"]
    assert 0.0 < factor < 1.0
    pre = sum(d < changed.date() for d in days)
    assert row["clicks"] == pytest.approx(600 - (1 - factor) * 20.0 * pre)
    assert row["spend"] == pytest.approx(600 - (1 - factor) * 20.0 * pre)
    assert out.filter(pl.col("account_id") == B)["evidence_factor"].to_list() == [1.0] * 3
    reason = allocate(out).filter(pl.col("ad_id") == f"{A}-0")["reason"][0]
    assert "before the detected drift" in reason


# ----------------------------------------------------------- ad_scores' table reading


def test_learning_inputs_read_tables_only_when_present(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    perf = perf_frame().drop("hook_type", "format", "cta", "emotion", "title", "body")
    creatives = perf_frame().select(
        "ad_id", "hook_type", "format", "cta", "emotion", "title", "body"
    )
    path = write(
        tmp_path,
        "defaults:\n  learning:\n    cross_account_boost: true\n    winner_priors: true\n"
        "    drift_discount: true\n",
    )
    settings = load_settings(path)
    # first run: none of the learners' tables exist
    out, meta = allocation.learning_inputs(wh, settings, perf, NOW)
    assert out.equals(perf)
    assert meta["learning_cross_account_boost_accounts"] == 2
    assert meta["winner_index_size"] == 0 and meta["drifts_available"] == 0
    # patterns and the catalog now exist: new ads matching a pattern get the boost
    wh.replace("cross_account_patterns", patterns_frame())
    wh.replace("meta_ads", creatives)
    out, meta = allocation.learning_inputs(wh, settings, perf, NOW)
    assert meta["ads_boosted"] == 2  # <acc>-1 in both accounts
    assert out.filter(pl.col("ad_id") == f"{A}-1")["boost_reason"][0].startswith(
        "hook_type=question"
    )


def test_winner_priors_when_the_first_new_ad_has_no_close_winner():
    """A first new ad without a close winner must not break the others' priors."""
    perf = perf_frame()
    index = winners_mod.build(winners_frame())
    lonely = perf.filter(pl.col("ad_id") == f"{A}-2").with_columns(
        pl.lit(f"{A}-9").alias("ad_id"),
        pl.lit("testimonial").alias("hook_type"),
        pl.lit("carousel").alias("format"),
        pl.lit("learn_more").alias("cta"),
        pl.lit("curiosity").alias("emotion"),
        pl.lit("Quarterly newsletter").alias("title"),
        pl.lit("Read the archive").alias("body"),
    )
    out = performance.apply_learning(
        pl.concat([lonely, perf]), now=NOW, prior_accounts={A}, index=index
    )
    got = dict(zip(out["ad_id"], out["prior_reason"], strict=True))
    assert got[f"{A}-9"] is None  # no winner close enough: allocator defaults
    assert "w1" in got[f"{A}-1"]


def test_learning_inputs_decay_from_stored_drifts_and_insights(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    perf = perf_frame()
    settings = load_settings(write(tmp_path, "defaults: {}\n"))  # drift_discount on by default
    assert allocation.learning_inputs(wh, settings, perf, NOW)[0].equals(perf)
    days = [date(2026, 10, 21) + timedelta(days=d) for d in range(30)]
    wh.replace(
        "meta_ad_insights",
        pl.DataFrame(
            {
                "date": days,
                "ad_id": [f"{A}-0"] * 30,
                "impressions": [1000] * 30,
                "clicks": [20] * 30,
                "spend": [20.0] * 30,
            }
        ),
    )
    drifts = pl.DataFrame(
        {
            "account_id": [A],
            "target": ["ctr"],
            "detected_at": [NOW - timedelta(days=1)],
            "changed_at": [NOW - timedelta(days=2)],
        }
    ).with_columns(pl.col("detected_at", "changed_at").cast(pl.Datetime("us", "UTC")))
    wh.replace(allocation.DRIFTS_TABLE, drifts)
    out, meta = allocation.learning_inputs(wh, settings, perf, NOW)
    assert meta["drifts_available"] == 1 and meta["ads_with_decayed_evidence"] == 1
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    assert row["spend"] < 600.0 and row["evidence_factor"] < 1.0
    assert out.filter(pl.col("account_id") == B)["spend"].to_list() == [600.0, 0.0, 0.0]


# --------------------------------------------------------------------- forget_changes


def ctr_change_daily(ad_id: str = f"{A}-0", drop_day: int = 20) -> pl.DataFrame:
    """30 days of 1,000 impressions and $20 a day: CTR 3% until ``drop_day``, then 1%; the
    value by click day follows the clicks ($100 per click)."""
    days = [date(2026, 10, 21) + timedelta(days=d) for d in range(30)]
    clicks = [30.0 if d < drop_day else 10.0 for d in range(30)]
    return pl.DataFrame(
        {
            "ad_id": [ad_id] * 30,
            "date": days,
            "impressions": [1000.0] * 30,
            "clicks": clicks,
            "spend": [20.0] * 30,
            "pipeline_value": [0.0] * 30,
            "click_value": [100.0 * c for c in clicks],
        }
    )


def forget_perf() -> pl.DataFrame:
    """perf_frame with A-0's totals matching ``ctr_change_daily`` (700 clicks, $600)."""
    daily = ctr_change_daily()
    return perf_frame().with_columns(
        pl.when(pl.col("ad_id") == f"{A}-0")
        .then(pl.lit(float(daily["clicks"].sum())))
        .otherwise(pl.col("clicks").cast(pl.Float64))
        .alias("clicks"),
        pl.when(pl.col("ad_id") == f"{A}-0")
        .then(pl.lit(30_000.0))
        .otherwise(pl.col("impressions").cast(pl.Float64))
        .alias("impressions"),
        pl.when(pl.col("ad_id") == f"{A}-0")
        .then(pl.lit(float(daily["click_value"].sum())))
        .otherwise(pl.col("pipeline_value"))
        .alias("pipeline_value"),
    )


def test_forget_changes_down_weights_evidence_before_a_ctr_change():
    perf, daily = forget_perf(), ctr_change_daily()
    out = performance.apply_learning(perf, now=NOW, forget_accounts={A}, daily=daily)
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    assert row["forget_cut"] == date(2026, 10, 21) + timedelta(days=20)
    w = row["forget_weight"]
    assert 0.0 < w < 1.0
    # each pre-change day counts w, the 10 days after it count fully
    assert row["impressions"] == pytest.approx(1000.0 * (20 * w + 10))
    assert row["clicks"] == pytest.approx(30.0 * 20 * w + 10.0 * 10)
    assert row["spend"] == pytest.approx(20.0 * (20 * w + 10))
    assert row["matured_spend"] == pytest.approx(600.0 - (1 - w) * 20.0 * 20)
    value_ratio = (3000.0 * 20 * w + 1000.0 * 10) / 70_000.0
    assert row["pipeline_value"] == pytest.approx(70_000.0 * value_ratio)
    assert row["lag_corrected_value"] == pytest.approx(60_000.0 * value_ratio)
    assert row["conversions"] == pytest.approx(20.0 * value_ratio)
    # the allocator now sees a CTR near the new 1%, not the lifetime 2.3%
    assert row["clicks"] / row["impressions"] < 0.014 < 700 / 30_000
    # other ads and the account with the flag off are untouched
    for ad in (f"{A}-1", f"{B}-0"):
        got, was = out.filter(pl.col("ad_id") == ad), perf.filter(pl.col("ad_id") == ad)
        assert got["clicks"].to_list() == was["clicks"].to_list()
        assert got["forget_cut"].to_list() == [None]
    scores = allocate(out).join(allocate(perf).select("ad_id", "score"), on="ad_id", suffix="_0")
    hit = scores.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    assert "CTR changed on 2026-11-10: evidence before it weighted x0.1" in hit["reason"]
    assert hit["score"] != pytest.approx(hit["score_0"])
    assert "CTR changed" not in scores.filter(pl.col("ad_id") == f"{B}-0")["reason"][0]


def test_forget_changes_without_click_days_scales_value_by_matured_spend():
    perf, daily = forget_perf(), ctr_change_daily().drop("click_value")
    out = performance.apply_learning(perf, now=NOW, forget_accounts={A}, daily=daily)
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    w = row["forget_weight"]
    assert row["pipeline_value"] == pytest.approx(70_000.0 * row["matured_spend"] / 600.0)
    assert row["matured_spend"] == pytest.approx(600.0 - (1 - w) * 20.0 * 20)


def test_forget_changes_matured_spend_follows_the_lag_curve():
    perf, daily = forget_perf(), ctr_change_daily()
    # half the value arrives on the click day, all of it 2 days later
    cdf = pl.DataFrame(
        {"lag_days": [0, 1, 2, 3], "cdf": [0.5, 0.75, 1.0, 1.0]},
        schema={"lag_days": pl.Int32, "cdf": pl.Float64},
    )
    out = performance.apply_learning(perf, now=NOW, forget_accounts={A}, daily=daily, lag_cdf=cdf)
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    w = row["forget_weight"]
    # matured spend of the post-change days shrinks with the curve, pre-change ones are old
    matured = lag_mod.matured_spend(daily.select("ad_id", "date", "spend"), cdf, NOW)
    full = float(matured["matured_spend"][0])
    assert full < 600.0
    young = full - 20.0 * 20  # the 10 post-change days' matured spend
    assert row["matured_spend"] == pytest.approx(600.0 * (20.0 * 20 * w + young) / full)


def test_forget_changes_off_or_without_history_changes_nothing():
    perf, daily = forget_perf(), ctr_change_daily()
    # flag off: the history is there but nobody asked
    assert performance.apply_learning(perf, now=NOW, daily=daily).equals(perf)
    assert performance.apply_learning(perf, now=NOW, forget_accounts={B}, daily=daily).equals(perf)
    # flag on, no history (first run) / empty / no change in it
    for hist in (None, pl.DataFrame(), ctr_change_daily(drop_day=40)):
        out = performance.apply_learning(perf, now=NOW, forget_accounts={A, B}, daily=hist)
        assert out.equals(perf)
    assert allocate(performance.apply_learning(perf, now=NOW, forget_accounts={A})).equals(
        allocate(perf)
    )


def test_forget_changes_and_drift_discount_do_not_discount_twice():
    perf, daily = forget_perf(), ctr_change_daily()
    steady = ctr_change_daily(f"{B}-0", drop_day=40)  # no change of its own
    both_daily = pl.concat([daily, steady])
    drifts = pl.DataFrame(
        {
            "account_id": [A, B],
            "target": ["ctr", "ctr"],
            "detected_at": [NOW - timedelta(days=3)] * 2,
            "changed_at": [NOW - timedelta(days=5)] * 2,
        }
    ).with_columns(pl.col("detected_at", "changed_at").cast(pl.Datetime("us", "UTC")))
    forgot = performance.apply_learning(perf, now=NOW, forget_accounts={A}, daily=both_daily)
    out = performance.apply_learning(
        perf,
        now=NOW,
        forget_accounts={A},
        decay_accounts={A, B},
        drifts=drifts,
        daily=both_daily,
    )
    assert out["ad_id"].to_list() == perf["ad_id"].to_list()
    a0 = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    assert a0["evidence_factor"] == 1.0  # cut by its own change: no drift discount on top
    assert a0["clicks"] == pytest.approx(forgot.filter(pl.col("ad_id") == f"{A}-0")["clicks"][0])
    b0 = out.filter(pl.col("ad_id") == f"{B}-0").row(0, named=True)
    assert b0["forget_cut"] is None and b0["evidence_factor"] < 1.0
    assert b0["clicks"] < 600.0


def test_learning_inputs_forget_from_stored_insights(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    perf = forget_perf()
    path = write(tmp_path, "defaults:\n  learning:\n    drift_discount: false\n"
                 "    forget_changes: true\n")  # fmt: skip
    settings = load_settings(path)
    out, meta = allocation.learning_inputs(wh, settings, perf, NOW)  # no insights yet
    assert out.equals(perf) and meta["ads_with_forgotten_evidence"] == 0
    daily = ctr_change_daily()
    wh.replace("meta_ad_insights", daily.select("date", "ad_id", "impressions", "clicks", "spend"))
    out, meta = allocation.learning_inputs(wh, settings, perf, NOW)
    assert meta["learning_forget_changes_accounts"] == 2
    assert meta["ads_with_forgotten_evidence"] == 1
    row = out.filter(pl.col("ad_id") == f"{A}-0").row(0, named=True)
    assert row["forget_cut"] == date(2026, 11, 10)
    assert row["clicks"] < 700.0 and row["spend"] < 600.0
