"""Cross-account patterns: per-account sums only, >= 3 winning accounts, 5-20% boost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer_assets.domain.cross_account import (
    PATTERN_SCHEMA,
    CrossAccountConfig,
    account_aggregates,
    boosts_for,
    patterns,
    patterns_from_aggregates,
)

HOOK = "hook_type=question"


def _perf(winning_accounts: int, *, accounts: int = 5, roas: float = 3.0) -> pl.DataFrame:
    """Per-ad rows: in the first ``winning_accounts`` accounts, question hooks return ``roas``;
    everything else returns 1.0 on $200 spend per ad."""
    rows = []
    for a in range(accounts):
        for j in range(12):
            hook = ["question", "stat", "story"][j % 3]
            ad_roas = roas if hook == "question" and a < winning_accounts else 1.0
            rows.append(
                {
                    "ad_id": f"{a}-{j}",
                    "account_id": f"acct{a}",
                    "hook_type": hook,
                    "format": ["video", "image"][j % 2],
                    "cta": ["book_now", "learn_more", "get_quote", "sign_up"][j % 4],
                    "emotion": None if j == 0 else "trust",
                    "spend": 200.0,
                    "pipeline_value": 200.0 * ad_roas,
                    "clicks": 40,
                    "impressions": 2000,
                }
            )
    return pl.DataFrame(rows)


def test_a_pattern_winning_in_two_accounts_does_not_count_in_three_it_does():
    assert HOOK not in patterns(_perf(2))["pattern"].to_list()
    found = patterns(_perf(3)).filter(pl.col("pattern") == HOOK)
    assert found.height == 1
    row = found.row(0, named=True)
    assert row["accounts_won"] == 3 and row["accounts_present"] == 5
    assert row["consistency"] == pytest.approx(0.6)
    assert row["roas_won"] == pytest.approx(3.0)


def test_roas_below_two_never_counts_even_in_every_account():
    assert HOOK not in patterns(_perf(5, roas=1.9))["pattern"].to_list()


def test_a_pattern_that_only_rides_a_good_account_does_not_win_there():
    perf = _perf(3).with_columns(
        # acct0 is great everywhere: question hooks (3.0) are below its 4.0 average otherwise
        pl.when((pl.col("account_id") == "acct0") & (pl.col("hook_type") != "question"))
        .then(pl.col("spend") * 4.5)
        .otherwise(pl.col("pipeline_value"))
        .alias("pipeline_value")
    )
    agg = account_aggregates(perf).filter(pl.col("pattern") == HOOK)
    assert agg.filter(pl.col("account_id") == "acct0")["wins"].to_list() == [False]
    assert HOOK not in patterns(perf)["pattern"].to_list()


def test_accounts_with_too_little_spend_are_not_judged():
    perf = _perf(3).with_columns(
        pl.when(pl.col("account_id") == "acct2")
        .then(pl.col("spend") / 20)
        .otherwise(pl.col("spend"))
        .alias("spend"),
    )
    assert HOOK not in patterns(perf)["pattern"].to_list()


def test_only_per_account_sums_cross_the_account_boundary():
    perf = _perf(4)
    agg = account_aggregates(perf)
    assert "ad_id" not in agg.columns
    assert patterns(perf).equals(patterns_from_aggregates(agg))
    # splitting every ad into two half-ads (same sums per account) changes nothing
    halves = pl.concat(
        [
            perf.with_columns(
                (pl.col("ad_id") + suffix).alias("ad_id"),
                pl.col("spend") / 2,
                pl.col("pipeline_value") / 2,
                pl.col("clicks") // 2,
                pl.col("impressions") // 2,
            )
            for suffix in ("a", "b")
        ]
    )
    assert patterns(halves).drop("reason").equals(patterns(perf).drop("reason"))
    out = patterns(perf)
    assert out.schema == pl.Schema(PATTERN_SCHEMA)
    assert not any("acct" in r for r in out["reason"].to_list())  # no account named


def test_boost_is_5_to_20_percent_and_grows_with_accounts_and_spend():
    three = patterns(_perf(3)).filter(pl.col("pattern") == HOOK)["boost"].item()
    five = patterns(_perf(5, accounts=5)).filter(pl.col("pattern") == HOOK)["boost"].item()
    big = _perf(5).with_columns(pl.col("spend") * 10, pl.col("pipeline_value") * 10)
    richer = patterns(big).filter(pl.col("pattern") == HOOK)["boost"].item()
    assert 1.05 <= three < five < richer <= 1.20


def test_boosts_for_names_the_strongest_pattern_and_leaves_others_alone():
    pats = patterns(_perf(4))
    ads = pl.DataFrame(
        {
            "ad_id": ["new1", "new2", "new3"],
            "account_id": ["acct9", "acct9", "acct9"],
            "hook_type": ["question", "stat", None],
            "format": ["video", "video", "video"],
            "cta": ["book_now", "book_now", "book_now"],
            "emotion": ["trust", "trust", "trust"],
        }
    )
    out = boosts_for(ads, pats)
    assert out.columns == [*ads.columns, "boost", "boost_reason"]
    first = out.row(0, named=True)
    best = pats.filter(pl.col("pattern").str.contains(HOOK))["boost"].max()
    assert first["boost"] == pytest.approx(best)
    assert HOOK in first["boost_reason"] and "accounts" in first["boost_reason"]
    assert out["boost"].to_list()[1:] == [1.0, 1.0]
    assert out["boost_reason"].to_list()[1:] == [None, None]


def test_boosts_only_young_ads_when_now_is_given():
    now = datetime(2026, 12, 1, tzinfo=UTC)
    ads = pl.DataFrame(
        {
            "ad_id": ["young", "old"],
            "account_id": ["x", "x"],
            "hook_type": ["question", "question"],
            "created_at": [now - timedelta(days=2), now - timedelta(days=30)],
        }
    )
    out = boosts_for(ads, patterns(_perf(4)), now=now, max_age_hours=168)
    assert out["boost"][0] > 1.0 and out["boost"][1] == 1.0
    assert out.columns == [*ads.columns, "boost", "boost_reason"]  # no helper columns leak


def test_no_patterns_means_no_boost():
    out = boosts_for(_perf(0).head(3), patterns(_perf(0)))
    assert out["boost"].to_list() == [1.0, 1.0, 1.0]
    assert patterns(_perf(0).head(0)).height == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # account
            st.sampled_from(["question", "stat"]),
            st.sampled_from(["video", "image"]),
            st.floats(0, 2000),  # spend
            st.floats(0, 10),  # roas
        ),
        min_size=1,
        max_size=60,
    )
)
def test_every_counted_pattern_wins_in_three_accounts_with_bounded_boost(rows):
    perf = pl.DataFrame(
        {
            "ad_id": [str(i) for i in range(len(rows))],
            "account_id": [str(r[0]) for r in rows],
            "hook_type": [r[1] for r in rows],
            "format": [r[2] for r in rows],
            "spend": [r[3] for r in rows],
            "pipeline_value": [r[3] * r[4] for r in rows],
            "clicks": 1,
            "impressions": 10,
        }
    )
    cfg = CrossAccountConfig()
    out = patterns(perf, cfg)
    assert (out["accounts_won"] >= cfg.min_accounts).all()
    assert (out["roas_won"] >= cfg.min_roas).all()
    assert out["boost"].is_between(1 + cfg.min_boost, 1 + cfg.max_boost).all()
