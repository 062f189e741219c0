"""Instant learner: contract, cursor (nothing learned twice), persistence, drift detection."""

from __future__ import annotations

import pickle
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from optimizer_assets.domain.instant_learner import (
    DRIFT_SCHEMA,
    InstantLearner,
    LearnerConfig,
    decay_counts,
    detect_drifts,
    events_from_insights,
    evidence_decay,
)
from optimizer_assets.sandbox.world import World, WorldConfig

START = datetime(2026, 11, 1, tzinfo=UTC)
VOCAB = {
    "hook_type": ["question", "stat", "story", "offer", "testimonial"],
    "format": ["image", "video", "carousel"],
    "cta": ["learn_more", "book_now", "get_quote", "sign_up"],
    "emotion": ["trust", "urgency", "curiosity", "joy"],
}


def _world(
    seed: int,
    *,
    accounts: int = 3,
    ads: int = 24,
    days: int = 40,
    shift_day: int | None = None,
    strength: float = 0.5,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ads with trait-driven true rates and one daily insight row per ad (occurred at day end).

    With ``shift_day``, account "a0" loses ``strength`` of its CTR and half that of its
    click-to-lead rate from that day on.
    """
    rng = np.random.default_rng(seed)
    n = accounts * ads
    traits = {k: rng.choice(v, n) for k, v in VOCAB.items()}
    effect = {k: dict(zip(v, rng.normal(0, 0.3, len(v)), strict=True)) for k, v in VOCAB.items()}
    lift = sum(np.array([effect[k][x] for x in traits[k]]) for k in VOCAB)
    ad_frame = pl.DataFrame(
        {
            "ad_id": [f"{i:05d}" for i in range(n)],
            "account_id": [f"a{i // ads}" for i in range(n)],
            **traits,
            "true_ctr": 0.02 * np.exp(lift + rng.normal(0, 0.15, n)),
            "true_c2l": 0.08 * np.exp(0.5 * lift + rng.normal(0, 0.15, n)),
        }
    )
    day = np.repeat(np.arange(days), n)
    ctr = np.tile(ad_frame["true_ctr"].to_numpy(), days)
    c2l = np.tile(ad_frame["true_c2l"].to_numpy(), days)
    if shift_day is not None:
        hit = (day >= shift_day) & (np.tile(ad_frame["account_id"].to_numpy(), days) == "a0")
        ctr = np.where(hit, ctr * (1 - strength), ctr)
        c2l = np.where(hit, c2l * (1 - strength / 2), c2l)
    impressions = rng.poisson(2000, len(day))
    clicks = rng.binomial(impressions, np.minimum(ctr, 1.0))
    leads = rng.binomial(clicks, np.minimum(c2l, 1.0))
    events = (
        pl.DataFrame(
            {
                "day": day,
                "ad_id": np.tile(ad_frame["ad_id"].to_numpy(), days),
                "impressions": impressions,
                "clicks": clicks,
                "leads": leads,
            }
        )
        .join(ad_frame.select("ad_id", "account_id", *VOCAB), on="ad_id", how="left")
        .with_columns(
            (pl.lit(START) + pl.duration(days=pl.col("day") + 1))
            .dt.cast_time_unit("us")
            .alias("occurred_at"),
            (pl.col("ad_id") + ":" + pl.col("day").cast(pl.Utf8)).alias("event_key"),
        )
        .sort("occurred_at", "event_key")
    )
    return ad_frame, events


def _weights(learner: InstantLearner) -> list[dict]:
    return [dict(r.weights) for r in learner.regressors.values()]


def test_predictions_follow_true_rates_and_have_the_documented_columns():
    ads, events = _world(1)
    learner = InstantLearner()
    learner.learn_many(events)
    out = learner.predict_many(ads, now=START + timedelta(days=41))
    new_cols = ["pred_ctr", "pred_click_to_lead", "pred_lead_value", "pred_value_per_click"]
    assert out.columns == ads.columns + new_cols
    assert out.height == ads.height
    assert out["pred_ctr"].is_not_null().all() and (out["pred_ctr"] > 0).all()
    assert out["pred_lead_value"].is_null().all()  # no value observed yet -> no guess
    ranks = out.select(
        pl.corr("true_ctr", "pred_ctr", method="spearman").alias("ctr"),
        pl.corr("true_c2l", "pred_click_to_lead", method="spearman").alias("c2l"),
    ).row(0, named=True)
    assert ranks["ctr"] > 0.7
    assert ranks["c2l"] > 0.3
    level = out["pred_ctr"].mean() / out["true_ctr"].mean()
    assert 0.8 < level < 1.25


def test_lead_value_is_learned_from_matured_cohorts():
    rng = np.random.default_rng(3)
    n = 2000  # about a month of matured ad-day cohorts on the default sandbox
    fmt = rng.choice(["video", "image"], n)
    value_per_lead = np.where(fmt == "video", 900.0, 300.0)
    leads = rng.integers(1, 4, n)
    cohorts = pl.DataFrame(
        {
            "event_key": [f"v{i}" for i in range(n)],
            "occurred_at": [START + timedelta(hours=i) for i in range(n)],
            "account_id": "a0",
            "ad_id": [f"ad{i % 40}" for i in range(n)],
            "format": fmt,
            "clicks": 0,
            "leads": 0,
            "pipeline_value": leads * value_per_lead * rng.uniform(0.5, 1.5, n),
            "value_leads": leads,
        }
    )
    learner = InstantLearner()
    learner.learn_many(cohorts)
    ads = pl.DataFrame({"ad_id": ["x", "y"], "account_id": "a0", "format": ["video", "image"]})
    out = learner.predict_many(ads, now=START)
    video, image = out["pred_lead_value"].to_list()
    assert video > 1.8 * image
    assert 500 < video < 1300 and 150 < image < 500
    assert out["pred_ctr"].is_null().all()


def test_rerun_learns_nothing_twice_and_overlapping_windows_learn_each_event_once():
    _, events = _world(2, days=20)
    learner = InstantLearner()
    learner.learn_many(events)
    weights = _weights(learner)
    learned = learner.events_learned
    assert learned == events.height
    again = learner.learn_many(events)
    assert again.height == 0
    assert learner.events_learned == learned
    assert _weights(learner) == weights

    # two overlapping daily pulls (days 0-11 then 8-19) learn exactly the union
    split = InstantLearner()
    first = events.filter(pl.col("day") < 12)
    second = events.filter(pl.col("day") >= 8)
    split.learn_many(first)
    split.learn_many(second)
    assert split.events_learned == events.height


def test_late_events_inside_the_overlap_are_learned_and_older_ones_skipped():
    _, events = _world(2, days=10)
    late = (pl.col("ad_id") == "00000") & pl.col("day").is_in([2, 9])
    learner = InstantLearner(LearnerConfig(overlap_hours=24))
    learner.learn_many(events.filter(~late))
    learner.learn_many(events.filter(late))  # day 9 is inside the 24 h overlap, day 2 is not
    assert learner.last_skipped_late == 1
    assert learner.events_learned == events.height - 1


def test_bytes_round_trip_keeps_predictions_cursor_and_future_learning():
    ads, events = _world(4, days=30)
    learner = InstantLearner()
    learner.learn_many(events.filter(pl.col("day") < 20))
    restored = InstantLearner.from_bytes(learner.to_bytes())
    now = START + timedelta(days=21)
    assert restored.predict_many(ads, now=now).equals(learner.predict_many(ads, now=now))
    assert restored.cursor == learner.cursor
    rest = events.filter(pl.col("day") >= 18)
    learner.learn_many(rest)
    restored.learn_many(rest)
    assert restored.events_learned == learner.events_learned == events.height
    assert restored.predict_many(ads, now=now).equals(learner.predict_many(ads, now=now))


def test_from_bytes_rejects_foreign_state():
    with pytest.raises(ValueError):
        InstantLearner.from_bytes(pickle.dumps({"version": 999, "learner": None}))


def test_predict_one_matches_predict_many():
    ads, events = _world(5, days=15)
    learner = InstantLearner()
    learner.learn_many(events)
    now = datetime(2026, 11, 20, tzinfo=UTC)  # a Friday
    row = ads.row(0, named=True)
    one = learner.predict_one({**row, "dow": now.weekday()})
    many = learner.predict_many(ads.head(1), now=now).row(0, named=True)
    assert one["ctr"] == pytest.approx(many["pred_ctr"])
    assert one["lead_value"] is None


def test_adwin_flags_a_shift_in_the_right_account_soon_after_it_happens():
    shift_day = 20
    _, events = _world(6, days=40, shift_day=shift_day)
    learner = InstantLearner()
    drifts = learner.learn_many(events)
    assert drifts.schema == pl.Schema(DRIFT_SCHEMA)
    shift_at = START + timedelta(days=shift_day)
    a0 = drifts.filter(pl.col("account_id") == "a0")
    assert a0.height >= 1
    first = a0.row(0, named=True)
    assert shift_at < first["detected_at"] <= shift_at + timedelta(days=5)
    assert abs(first["changed_at"] - shift_at) <= timedelta(days=2)
    assert first["shift"] < -0.15  # rates fell
    assert first["events_seen"] > shift_day * 24
    assert drifts.filter(pl.col("account_id") != "a0").height == 0
    assert learner.drifts.equals(drifts)


def test_adwin_stays_quiet_on_stationary_streams():
    alarms = 0
    for seed in (7, 8, 9):
        _, events = _world(seed, days=50)
        alarms += InstantLearner().learn_many(events).height
    # 15 account-months of stationary data: at most one false alarm
    assert alarms <= 1


def test_on_a_busy_stream_one_accounts_drift_raises_no_alarm_elsewhere():
    # 150 ads per account: ADWIN also sees the tiny wobble the drift causes in the shared trait
    # effects; only changes of at least min_shift count as drifts
    _, events = _world(11, ads=120, days=36, shift_day=20)
    drifts = InstantLearner().learn_many(events)
    assert drifts.height >= 1 and set(drifts["account_id"]) == {"a0"}


def test_a_detected_drift_speeds_up_adaptation():
    # the account's predicted CTR level should reach the new world sooner with the boost
    def bias(boost: float, seed: int) -> float:
        ads, events = _world(seed, days=21, shift_day=15, strength=0.6)
        truth = ads.filter(pl.col("account_id") == "a0").with_columns(pl.col("true_ctr") * 0.4)
        errors = []
        for day in (16, 17, 18, 19, 20):
            now = START + timedelta(days=day)
            learner = InstantLearner(LearnerConfig(drift_lr_boost=boost))
            learner.learn_many(events.filter(pl.col("occurred_at") <= now))
            pred = learner.predict_many(truth, now=now)
            errors.append(abs(float((pred["pred_ctr"] / pred["true_ctr"]).log().mean())))
        return float(np.mean(errors))

    boosted = [bias(3.0, seed) for seed in (10, 11)]
    plain = [bias(1.0, seed) for seed in (10, 11)]
    assert sum(boosted) < 0.8 * sum(plain)


def test_evidence_decay_uses_latest_drift_and_halves_over_time():
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    drifts = pl.DataFrame(
        {
            "account_id": ["a", "a", "b", "c"],
            "target": "ctr",
            "detected_at": [t0 - timedelta(days=20), t0, t0, t0 + timedelta(days=1)],
            "changed_at": [t0 - timedelta(days=21), t0 - timedelta(days=1), t0, t0],
            "events_seen": 100,
            "shift": -0.5,
        },
        schema=DRIFT_SCHEMA,
    )
    now = t0 + timedelta(hours=48)
    out = evidence_decay(drifts, now, initial=0.5, floor=0.1, half_life_hours=48)
    assert out["account_id"].to_list() == ["a", "b", "c"]
    a = out.row(0, named=True)
    assert a["changed_at"] == t0 - timedelta(days=1)
    assert a["factor"] == pytest.approx(0.25)
    assert evidence_decay(drifts, t0, initial=0.5)["factor"][0] == pytest.approx(0.5)
    late = evidence_decay(drifts, t0 + timedelta(days=30), floor=0.1)
    assert late["factor"].to_list() == pytest.approx([0.1, 0.1, 0.1])
    assert evidence_decay(drifts, t0 - timedelta(days=30)).height == 0


def test_decay_counts_discounts_only_pre_change_evidence():
    ads = pl.DataFrame(
        {
            "ad_id": ["x", "y", "z"],
            "account_id": ["a", "a", "b"],
            "impressions": [3000, 1000, 500],
            "clicks": [60, 20, 10],
            "spend": [300.0, 100.0, 50.0],
            "pipeline_value": [900.0, 0.0, 100.0],
            "matured_spend": [250.0, 50.0, 40.0],
            "conversions": [3, 0, 1],
        }
    )
    factors = pl.DataFrame(
        {
            "account_id": ["a"],
            "changed_at": [datetime(2026, 11, 3, tzinfo=UTC)],
            "detected_at": [datetime(2026, 11, 4, tzinfo=UTC)],
            "factor": [0.2],
        }
    )
    daily = pl.DataFrame(
        {
            "ad_id": ["x", "x", "x", "y"],
            "date": [date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3), date(2026, 11, 3)],
            "impressions": [1000, 1000, 1000, 1000],
            "clicks": [20, 20, 20, 20],
            "spend": [100.0, 100.0, 100.0, 100.0],
            "pipeline_value": [300.0, 300.0, 300.0, 0.0],
        }
    )
    out = decay_counts(ads, factors, daily=daily)
    x, y, z = out.rows(named=True)
    assert x["impressions"] == pytest.approx(1000 + 2000 * 0.2)
    assert x["pipeline_value"] == pytest.approx(300 + 600 * 0.2)
    assert x["matured_spend"] == pytest.approx(250 - 0.8 * 200)  # old spend has matured
    assert x["conversions"] == pytest.approx(3 - 0.8 * 3 * 600 / 900)  # follows value's share
    assert y["clicks"] == pytest.approx(20)  # all of y's evidence is after the change
    assert z["impressions"] == pytest.approx(500) and z["evidence_factor"] == 1.0
    assert out.schema["clicks"] == pl.Float64
    whole = decay_counts(ads, factors)
    assert whole["spend"].to_list() == pytest.approx([60.0, 20.0, 50.0])
    assert whole["conversions"].to_list() == pytest.approx([0.6, 0.0, 1.0])
    assert whole.columns == [*ads.columns, "evidence_factor"]


def _sandbox_insights(drift_at_hours: float | None) -> tuple[World, pl.DataFrame]:
    """Daily insights of a small seeded sandbox world (2 accounts x 16 ads, 20 days)."""
    days = 20
    cfg = WorldConfig(
        seed=6,
        accounts=2,
        ads_per_account=16,
        drift_strength=0.8,
        drift_at_hours=drift_at_hours,
    )
    world = World(cfg)
    world.advance(days * 24)
    start = cfg.start.date()
    insights = pl.concat(
        world.insights(a, start, start + timedelta(days=days))
        for a in world.accounts()["account_id"]
    )
    return world, insights


def test_detects_the_sandbox_hook_type_ctr_shift_and_stays_quiet_without_it():
    # the sandbox drift moves CTR by hook type in both directions (no account-level change):
    # the surprise streams (counts vs each ad's own baseline) must see it in every account
    world, insights = _sandbox_insights(240.0)
    truth = {d["account_id"]: datetime.fromisoformat(d["at"]) for d in world.truth_drifts()}
    assert len(truth) == 2
    learner = InstantLearner()
    drifts = detect_drifts(insights, world.ads(), learner=learner)
    assert drifts.equals(learner.drifts)
    for account, at in truth.items():
        mine = drifts.filter(pl.col("account_id") == account)
        assert mine.height >= 1, account
        assert mine["detected_at"].min() >= at  # nothing before the drift
        # rows of a day arrive at its end: the first post-drift rows come 24 h after it
        assert mine["detected_at"].min() <= at + timedelta(hours=72)
    assert set(learner.drift_details["signal"]) <= {"ad_surprise", "trait_surprise"}
    # the same world without the drift raises no alarm
    world, insights = _sandbox_insights(None)
    assert world.truth_drifts() == []
    assert detect_drifts(insights, world.ads()).height == 0


def test_events_from_insights_takes_graph_rows_and_ends_each_day():
    insights = pl.DataFrame(
        {
            "date_start": [date(2026, 11, 1), date(2026, 11, 2)],
            "ad_id": ["x", "x"],
            "account_id": ["a", "a"],
            "impressions": [100, 100],
            "clicks": [3, 4],
            "leads": [0, 1],
        }
    )
    ads = pl.DataFrame({"ad_id": ["x"], "hook_type": ["offer"], "format": ["video"]})
    events = events_from_insights(insights, ads, now=datetime(2026, 11, 2, 12, tzinfo=UTC))
    assert events["event_key"].to_list() == ["x:2026-11-01"]
    assert events["occurred_at"].to_list() == [datetime(2026, 11, 2, tzinfo=UTC)]
    assert events["hook_type"].to_list() == ["offer"]
