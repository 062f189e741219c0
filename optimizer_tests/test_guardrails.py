"""Guardrails: unit cases a media buyer would recognize, and property tests over simulated time."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer_assets.domain.ad_changes import send_phases
from optimizer_assets.domain.guardrails import (
    PLAN_SCHEMA,
    RULE_BUDGET_EDITS,
    RULE_CAMPAIGN_ACTIONS,
    RULE_DAILY_CAP,
    RULE_MAX_PER_RUN,
    RULE_MIN_BUDGET,
    RULE_MIN_CHANGE,
    RULE_STALE,
    RULE_VELOCITY,
    RULES,
    GuardrailConfig,
    check_plan,
    empty_history,
    min_budget_from_rows,
    plan_changes,
)

NOW = datetime(2026, 11, 1, 10, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)
PROPERTY = settings(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def recs(rows: list[tuple[str, str, int, int]], account: str = "a") -> pl.DataFrame:
    """(adset_id, campaign_id, current, recommended) -> recommendations frame."""
    return pl.DataFrame(
        {
            "adset_id": [r[0] for r in rows],
            "account_id": [account] * len(rows),
            "campaign_id": [r[1] for r in rows],
            "current_budget": [r[2] for r in rows],
            "recommended_budget": [r[3] for r in rows],
        },
        schema_overrides={"current_budget": pl.Int64, "recommended_budget": pl.Int64},
    )


def current_of(recommendations: pl.DataFrame) -> pl.DataFrame:
    return recommendations.select(
        "adset_id", "account_id", "campaign_id", daily_budget="current_budget"
    )


def history(rows: list[tuple[str, str, str, str, datetime, str]]) -> pl.DataFrame:
    """(object_id, field, old, new, applied_at, status) -> ledger-like history frame."""
    if not rows:
        return empty_history()
    return pl.DataFrame(
        {
            "object_id": [r[0] for r in rows],
            "field": [r[1] for r in rows],
            "old_value": [r[2] for r in rows],
            "new_value": [r[3] for r in rows],
            "applied_at": [r[4] for r in rows],
            "status": [r[5] for r in rows],
        },
        schema_overrides={"applied_at": pl.Datetime("us", "UTC")},
    )


def plan_one(r, h=None, config=None, now=NOW, **kw) -> pl.DataFrame:
    return plan_changes(
        r,
        current_of(r),
        empty_history() if h is None else h,
        now=now,
        config=config or GuardrailConfig(),
        **kw,
    )


def row(plan: pl.DataFrame, object_id: str) -> dict:
    rows = plan.filter(pl.col("object_id") == object_id).to_dicts()
    assert len(rows) == 1, rows
    return rows[0]


# ----------------------------------------------------------------------------- unit cases


def test_velocity_trims_a_big_jump_and_names_the_rule():
    plan = plan_one(recs([("1", "c", 1000, 5000), ("2", "c", 1000, 100)]))
    up, down = row(plan, "1"), row(plan, "2")
    assert (up["new_value"], up["status"], up["rule"]) == ("1200", "planned", RULE_VELOCITY)
    assert up["requested_value"] == "5000" and up["old_value"] == "1000"
    assert (down["new_value"], down["status"]) == ("800", "planned")
    assert plan.schema == pl.Schema(PLAN_SCHEMA)


def test_velocity_remembers_the_budget_six_hours_ago():
    # +20% two hours ago: no more room up until the old value leaves the 6 h window
    h = history([("1", "daily_budget", "1000", "1200", NOW - 2 * HOUR, "applied")])
    r = recs([("1", "c", 1200, 2000)])
    blocked = row(plan_one(r, h), "1")
    assert blocked["status"] == "skipped" and blocked["new_value"] == "1200"
    assert blocked["rule"] == RULE_VELOCITY
    later = row(plan_one(r, h, now=NOW + 5 * HOUR), "1")
    assert (later["new_value"], later["status"]) == ("1440", "planned")


def test_velocity_band_holds_against_every_value_in_the_window():
    # 1000 -> 800 (3 h ago): going back up is bounded by 800 * 1.2, not by 1000 * 1.2
    h = history([("1", "daily_budget", "1000", "800", NOW - 3 * HOUR, "applied")])
    got = row(plan_one(recs([("1", "c", 800, 2000)]), h), "1")
    assert got["new_value"] == "960"


def test_four_budget_edits_an_hour_then_skipped():
    h = history(
        [
            ("1", "daily_budget", "1000", "1010", NOW - timedelta(minutes=50 - i), "applied")
            for i in range(4)
        ]
    )
    got = row(plan_one(recs([("1", "c", 1010, 1100)]), h), "1")
    assert got["status"] == "skipped" and got["rule"] == RULE_BUDGET_EDITS
    # failed rows never reached Meta and do not count
    h_failed = h.with_columns(status=pl.lit("failed"))
    assert row(plan_one(recs([("1", "c", 1010, 1150)]), h_failed), "1")["status"] == "planned"


def test_campaign_limit_keeps_kills_first_then_largest_moves():
    r = recs([(str(i), "c", 1000, 1100 + 5 * i) for i in range(18)])
    kills = pl.DataFrame(
        {"ad_id": ["a1", "a2"], "account_id": "a", "campaign_id": "c", "action": "kill"}
    )
    plan = plan_one(r, ad_actions=kills)
    planned = plan.filter(pl.col("status") == "planned")
    assert planned.height == 15
    assert set(planned.filter(pl.col("field") == "status")["object_id"]) == {"a1", "a2"}
    skipped = plan.filter(pl.col("status") == "skipped")
    assert skipped.height == 5 and set(skipped["rule"]) == {RULE_CAMPAIGN_ACTIONS}
    # the five smallest moves wait
    assert set(skipped["object_id"]) == {"0", "1", "2", "3", "4"}


def test_kill_pauses_the_ad_and_already_paused_ads_are_left_alone():
    kills = pl.DataFrame(
        {
            "ad_id": ["a1", "a2", "a3"],
            "account_id": "a",
            "campaign_id": "c",
            "action": ["kill", "kill", "hold"],
            "current_status": ["ACTIVE", "PAUSED", "ACTIVE"],
        }
    )
    plan = plan_one(recs([]), ad_actions=kills)
    assert plan.select("object_id", "object_type", "field", "old_value", "new_value").rows() == [
        ("a1", "ad", "status", "ACTIVE", "PAUSED")
    ]


def test_floor_at_the_minimum_budget():
    config = GuardrailConfig(min_budget=900, velocity_pct=0.5)
    got = row(plan_one(recs([("1", "c", 1000, 300)]), config=config), "1")
    assert got["new_value"] == "900" and got["status"] == "planned"
    assert got["rule"] == RULE_MIN_BUDGET


def test_daily_cap_trims_increases_after_counting_decreases():
    r = recs([("1", "c", 1000, 1200), ("2", "c", 1000, 1200), ("3", "c", 1000, 800)])
    plan = plan_one(r, config=GuardrailConfig(daily_cap=3150))
    # total 3000 - 200 freed = 2800; headroom 350: the first increase gets 200, the next 150
    new = dict(plan.select("object_id", "new_value").rows())
    assert sum(int(v) for v in new.values()) == 3150
    assert set(plan.filter(pl.col("rule") == RULE_DAILY_CAP)["object_id"]) == {"2"}
    assert new["2"] == "1150"


def test_daily_cap_skips_increases_when_already_above_cap():
    r = recs([("1", "c", 1000, 1200), ("2", "c", 1000, 1000)])
    got = row(plan_one(r, config=GuardrailConfig(daily_cap=1500)), "1")
    assert got["status"] == "skipped" and RULE_DAILY_CAP in got["rule"].split(",")


def test_no_churn_small_changes_are_skipped():
    config = GuardrailConfig(min_change_pct=0.05, min_change_abs=100)
    plan = plan_one(recs([("1", "c", 10_000, 10_300), ("2", "c", 1000, 1090)]), config=config)
    assert row(plan, "1")["rule"] == RULE_MIN_CHANGE  # 3% < 5%
    assert row(plan, "2")["rule"] == RULE_MIN_CHANGE  # 90 < 100 minor units
    assert (plan["status"] == "skipped").all()
    assert (plan["new_value"] == plan["old_value"]).all()


def test_max_changes_per_run_per_account():
    r = recs([(str(i), f"c{i}", 1000, 1150) for i in range(7)])
    plan = plan_one(r, config=GuardrailConfig(max_changes_per_run=3))
    assert (plan["status"] == "planned").sum() == 3
    assert set(plan.filter(pl.col("status") == "skipped")["rule"]) == {RULE_MAX_PER_RUN}


def test_unchanged_recommendations_make_no_rows():
    assert plan_one(recs([("1", "c", 1000, 1000)])).height == 0


def test_change_id_is_deterministic_within_the_planning_window():
    r = recs([("1", "c", 1000, 1100), ("2", "c", 1000, 900)])
    a = plan_one(r)
    assert a.equals(plan_one(r))
    same_window = plan_one(r, now=NOW + timedelta(minutes=30))
    assert same_window["change_id"].to_list() == a["change_id"].to_list()
    next_window = plan_one(r, now=NOW + HOUR)
    assert set(next_window["change_id"]).isdisjoint(a["change_id"])
    other_value = plan_one(recs([("1", "c", 1000, 1150), ("2", "c", 1000, 900)]))
    assert row(other_value, "1")["change_id"] != row(a, "1")["change_id"]
    assert row(other_value, "2")["change_id"] == row(a, "2")["change_id"]
    assert a["change_id"].str.contains("^[0-9a-f]{32}$").all()


def test_per_account_configs_and_missing_account_is_an_error():
    r = pl.concat([recs([("1", "c", 1000, 2000)], "a"), recs([("2", "d", 1000, 2000)], "b")])
    plan = plan_one(r, config={"a": GuardrailConfig(), "b": GuardrailConfig(velocity_pct=0.5)})
    assert row(plan, "1")["new_value"] == "1200" and row(plan, "2")["new_value"] == "1500"
    with pytest.raises(ValueError, match="account b"):
        plan_one(r, config={"a": GuardrailConfig()})


def test_check_plan_catches_tampering_and_moved_state():
    r = recs([("1", "c", 1000, 1200), ("2", "c", 1000, 900)])
    cur = current_of(r)
    plan = plan_one(r)
    assert check_plan(plan, empty_history(), NOW, GuardrailConfig(), current=cur) == []
    tampered = plan.with_columns(
        new_value=pl.when(pl.col("object_id") == "1").then(pl.lit("5000")).otherwise("new_value")
    )
    rules = {v.rule for v in check_plan(tampered, empty_history(), NOW, GuardrailConfig())}
    assert RULE_VELOCITY in rules
    # somebody changed ad set 2 in Ads Manager after planning
    moved = cur.with_columns(
        daily_budget=pl.when(pl.col("adset_id") == "2").then(700).otherwise("daily_budget")
    )
    rules = {v.rule for v in check_plan(plan, empty_history(), NOW, GuardrailConfig(), moved)}
    assert RULE_STALE in rules
    # four edits landed meanwhile: the re-check before sending stops it
    h = history(
        [
            ("1", "daily_budget", "1000", "1000", NOW - timedelta(minutes=i), "applied")
            for i in range(4)
        ]
    )
    violations = check_plan(plan, h, NOW, GuardrailConfig(), cur)
    assert any(v.rule == RULE_BUDGET_EDITS and v.object_id == "1" for v in violations)
    with pytest.raises(ValueError, match="daily_cap"):
        check_plan(plan, empty_history(), NOW, GuardrailConfig(daily_cap=10_000))


def test_check_plan_ignores_the_plans_own_sending_rows():
    r = recs([("1", "c", 1000, 1200)])
    plan = plan_one(r)
    own = plan.select(
        "change_id",
        "object_id",
        "field",
        "old_value",
        "new_value",
        applied_at=pl.lit(None, dtype=pl.Datetime("us", "UTC")),
        status=pl.lit("sending"),
    )
    assert check_plan(plan, own, NOW, GuardrailConfig(max_budget_edits_per_hour=1)) == []


def test_config_from_dict_and_minimum_budgets():
    c = GuardrailConfig.from_dict(
        {"velocity_pct": 0.1, "velocity_window_hours": 12, "daily_cap": 9}
    )
    assert c.velocity_window == timedelta(hours=12) and c.daily_cap == 9
    with pytest.raises(ValueError, match="unknown"):
        GuardrailConfig.from_dict({"velocity": 0.1})
    with pytest.raises(ValueError):
        GuardrailConfig(velocity_pct=1.5)
    rows = [
        {"currency": "USD", "min_daily_budget_imp": 100, "min_daily_budget_high_freq": "500"},
        {"currency": "EUR", "min_daily_budget_imp": 90},
    ]
    assert min_budget_from_rows(rows, "usd") == 500
    assert GuardrailConfig().with_minimum_budgets(rows, "EUR").min_budget == 90
    with pytest.raises(ValueError):
        min_budget_from_rows(rows, "JPY")


# ----------------------------------------------------------------------------- simulation


@dataclass
class Sim:
    """A tiny ad world: ad set budgets, ad statuses, and the log of applied changes."""

    configs: dict[str, GuardrailConfig]
    adsets: pl.DataFrame
    ads: pl.DataFrame
    now: datetime = datetime(2026, 11, 1, tzinfo=UTC)
    history_rows: list[dict] = field(default_factory=list)
    budget_events: dict[str, list[tuple[datetime, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    campaign_events: dict[str, list[datetime]] = field(default_factory=lambda: defaultdict(list))

    def history(self) -> pl.DataFrame:
        if not self.history_rows:
            return empty_history()
        return pl.DataFrame(self.history_rows, schema=dict(empty_history().schema))


def _random_config(rng: np.random.Generator) -> GuardrailConfig:
    return GuardrailConfig(
        velocity_pct=float(rng.choice([0.1, 0.2, 0.35])),
        velocity_window=timedelta(hours=int(rng.choice([2, 6]))),
        max_budget_edits_per_hour=int(rng.integers(1, 5)),
        max_campaign_actions_per_hour=int(rng.integers(1, 16)),
        min_budget=int(rng.choice([100, 500, 1000])),
        min_change_pct=float(rng.choice([0.0, 0.02, 0.05])),
        min_change_abs=int(rng.choice([0, 1, 100, 300])),
        max_changes_per_run=int(rng.integers(1, 13)),
    )


def _make_sim(rng: np.random.Generator, n_accounts: int) -> Sim:
    """Each account is an independent stream with its own guardrails; one plan call serves all."""
    configs, rows, ads = {}, [], []
    for a in range(n_accounts):
        acc = f"act{a}"
        configs[acc] = _random_config(rng)
        for c in range(int(rng.integers(1, 4))):
            camp = f"{acc}c{c}"
            for s in range(int(rng.integers(1, 5))):
                sid = f"{camp}s{s}"
                # some budgets sit near the floor so the floor binds, others far above it
                near = rng.choice([1.0, 1.05, 1.2, 2.0, 10.0, 30.0])
                budget = int(configs[acc].min_budget * near + rng.integers(0, 300))
                rows.append((sid, acc, camp, budget))
                ads += [(f"{sid}a{k}", acc, camp, "ACTIVE") for k in range(2)]
    adsets = pl.DataFrame(
        rows, schema=["adset_id", "account_id", "campaign_id", "daily_budget"], orient="row"
    )
    totals = dict(adsets.group_by("account_id").agg(pl.col("daily_budget").sum()).rows())
    for acc, c in configs.items():
        cap_ratio = rng.choice([0.0, 0.9, 1.0, 1.1, 1.5])  # 0: no cap
        if cap_ratio:
            configs[acc] = replace(c, daily_cap=int(totals[acc] * cap_ratio))
    ad_frame = pl.DataFrame(
        ads, schema=["ad_id", "account_id", "campaign_id", "status"], orient="row"
    )
    return Sim(configs=configs, adsets=adsets, ads=ad_frame)


def _recommend(sim: Sim, rng: np.random.Generator) -> tuple[pl.DataFrame, pl.DataFrame]:
    n = sim.adsets.height
    current = sim.adsets["daily_budget"].to_numpy()
    factor = np.exp(rng.normal(0.0, 0.5, n))
    rec = np.round(current * factor).astype(np.int64)
    wild = rng.random(n)
    rec = np.where(wild < 0.05, 0, rec)  # below any floor
    rec = np.where((wild >= 0.05) & (wild < 0.1), current * 10, rec)  # far above velocity
    rec = np.where((wild >= 0.1) & (wild < 0.15), current + rng.integers(-50, 50, n), rec)  # churn
    rec = np.where((wild >= 0.15) & (wild < 0.2), current, rec)  # no change asked
    keep = rng.random(n) < 0.8
    recommendations = sim.adsets.with_columns(
        current_budget=pl.col("daily_budget"), recommended_budget=pl.Series(rec)
    ).filter(pl.Series(keep))
    kill = rng.random(sim.ads.height) < 0.05
    ad_actions = sim.ads.filter(pl.Series(kill)).select(
        "ad_id",
        "account_id",
        "campaign_id",
        action=pl.lit("kill"),
        current_status="status",
    )
    return recommendations.drop("daily_budget"), ad_actions


def _check_plan_shape(plan: pl.DataFrame, recommendations, ad_actions, sim: Sim) -> None:
    # every requested change has exactly one row (trimmed or skipped, never dropped)
    asked = set(
        recommendations.filter(pl.col("recommended_budget") != pl.col("current_budget"))["adset_id"]
    ) | set(ad_actions.filter(pl.col("current_status") != "PAUSED")["ad_id"])
    assert plan["object_id"].is_unique().all()
    assert set(plan["object_id"]) == asked
    assert plan["change_id"].is_unique().all()
    # a row that is skipped or differs from the request names the rule(s) from RULES
    differs = (plan["status"] == "skipped") | (plan["new_value"] != plan["requested_value"])
    assert plan.filter(differs)["rule"].is_not_null().all()
    assert plan.filter(~differs)["rule"].is_null().all()
    for rule in plan["rule"].drop_nulls():
        assert set(rule.split(",")) <= set(RULES)
    assert (
        plan.filter(pl.col("status") == "skipped")["new_value"]
        == plan.filter(pl.col("status") == "skipped")["old_value"]
    ).all()
    b = plan.filter((pl.col("field") == "daily_budget") & (pl.col("status") == "planned"))
    old, new, req = (
        b[c].cast(pl.Int64).to_numpy() for c in ("old_value", "new_value", "requested_value")
    )
    # trims move toward the old value: never past the request, never the other way
    assert np.all(np.minimum(old, req) <= new) and np.all(new <= np.maximum(old, req))
    assert np.all(new != old)
    for acc, n in plan.filter(pl.col("status") == "planned").group_by("account_id").len().rows():
        assert n <= sim.configs[acc].max_changes_per_run


def _apply(sim: Sim, plan: pl.DataFrame, rng: np.random.Generator) -> set[str]:
    """Send the plan as the sender does: decreases and kills, re-check, then increases.

    Some changes fail at Meta (and do not count); the re-check before the second phase skips
    increases that a failed decrease would push over the daily cap. Returns the accounts where
    an increase was applied.
    """
    first, second = send_phases(plan.filter(pl.col("status") == "planned"))
    _apply_rows(sim, first, rng)
    flagged = {
        v.change_id for v in check_plan(second, sim.history(), sim.now, sim.configs, sim.adsets)
    }
    return _apply_rows(sim, second.filter(~pl.col("change_id").is_in(list(flagged))), rng)


def _apply_rows(sim: Sim, planned: pl.DataFrame, rng: np.random.Generator) -> set[str]:
    ok = rng.random(planned.height) >= 0.1
    increased = set()
    budgets = dict(sim.adsets.select("adset_id", "daily_budget").rows())
    statuses = dict(sim.ads.select("ad_id", "status").rows())
    for r, applied in zip(planned.iter_rows(named=True), ok, strict=True):
        sim.history_rows.append(
            {
                "object_id": r["object_id"],
                "campaign_id": r["campaign_id"],
                "field": r["field"],
                "old_value": r["old_value"],
                "new_value": r["new_value"],
                "applied_at": sim.now if applied else None,
                "status": "applied" if applied else "failed",
            }
        )
        if not applied:
            continue
        sim.campaign_events[r["campaign_id"]].append(sim.now)
        if r["field"] == "daily_budget":
            budgets[r["object_id"]] = int(r["new_value"])
            if int(r["new_value"]) > int(r["old_value"]):
                increased.add(r["account_id"])
            sim.budget_events[r["object_id"]].append(
                (sim.now, int(r["old_value"]), int(r["new_value"]))
            )
        else:
            statuses[r["object_id"]] = r["new_value"]
    sim.adsets = sim.adsets.with_columns(
        daily_budget=pl.col("adset_id").replace_strict(budgets, return_dtype=pl.Int64)
    )
    sim.ads = sim.ads.with_columns(status=pl.col("ad_id").replace_strict(statuses))
    return increased


def _assert_timeline_within_guardrails(sim: Sim, initial: dict[str, int]) -> None:
    """Independent re-check of the whole applied history against every rate and band."""
    account_of = dict(sim.adsets.select("adset_id", "account_id").rows())
    account_of_campaign = dict(sim.adsets.select("campaign_id", "account_id").rows())
    for adset, events in sim.budget_events.items():
        c = sim.configs[account_of[adset]]
        bps = round(c.velocity_pct * 10_000)
        times = [t for t, _, _ in events]
        values = [initial[adset]] + [new for _, _, new in events]
        # value i is held until times[i]; value j starts at times[j - 1]
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                if i < len(times) and times[j - 1] - times[i] <= c.velocity_window:
                    vi, vj = values[i], values[j]
                    assert vj * 10_000 <= vi * (10_000 + bps), (adset, vi, vj)
                    assert vj * 10_000 >= vi * (10_000 - bps), (adset, vi, vj)
        e = c.max_budget_edits_per_hour
        assert all(times[k + e] - times[k] > HOUR for k in range(len(times) - e)), adset
        for _, old, new in events:
            assert new >= c.min_budget
            assert abs(new - old) >= c.min_change_abs
            assert abs(new - old) * 10_000 >= old * round(c.min_change_pct * 10_000)
    for campaign, times in sim.campaign_events.items():
        n = sim.configs[account_of_campaign[campaign]].max_campaign_actions_per_hour
        times = sorted(times)
        assert all(times[k + n] - times[k] > HOUR for k in range(len(times) - n)), campaign


@st.composite
def streams(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # one example = 50-150 independent account streams planned together (vectorized), so the
    # 12 examples below cover over a thousand streams
    return _make_sim(rng, draw(st.integers(50, 150))), rng, draw(st.integers(2, 10))


@settings(PROPERTY, max_examples=12)
@given(streams())
def test_no_guardrail_is_ever_exceeded_over_simulated_time(stream):
    sim, rng, steps = stream
    initial = dict(sim.adsets.select("adset_id", "daily_budget").rows())
    for step in range(steps):
        recommendations, ad_actions = _recommend(sim, rng)
        hist = sim.history()
        plan = plan_changes(
            recommendations,
            sim.adsets,
            hist,
            now=sim.now,
            config=sim.configs,
            ad_actions=ad_actions,
        )
        if step == 0:
            again = plan_changes(
                recommendations,
                sim.adsets,
                hist,
                now=sim.now,
                config=sim.configs,
                ad_actions=ad_actions,
            )
            assert plan.equals(again)
        _check_plan_shape(plan, recommendations, ad_actions, sim)
        assert check_plan(plan, hist, sim.now, sim.configs, current=sim.adsets) == []
        before = dict(sim.adsets.group_by("account_id").agg(pl.col("daily_budget").sum()).rows())
        increased = _apply(sim, plan, rng)
        after = dict(sim.adsets.group_by("account_id").agg(pl.col("daily_budget").sum()).rows())
        for acc, cfg in sim.configs.items():
            if cfg.daily_cap is not None:
                assert after[acc] <= max(cfg.daily_cap, before[acc])
                if acc in increased:
                    assert after[acc] <= cfg.daily_cap
        minutes = int(rng.choice([0, 1, 5, 15, 20, 30, 45, 60, 90, 180, 400]))
        sim.now += timedelta(minutes=minutes)
    _assert_timeline_within_guardrails(sim, initial)


@st.composite
def one_shot(draw):
    """A random plan request against a random (messy) history: sending/failed rows, no campaign."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sim = _make_sim(rng, draw(st.integers(1, 120)))
    ids = sim.adsets["adset_id"].to_list()
    rows = []
    for _ in range(draw(st.integers(0, 200))):
        sid = ids[int(rng.integers(len(ids)))]
        old = int(rng.integers(100, 30_000))
        rows.append(
            {
                "object_id": sid,
                "campaign_id": None,
                "field": "daily_budget",
                "old_value": str(old),
                "new_value": str(int(old * rng.uniform(0.5, 1.5))),
                "applied_at": None
                if rng.random() < 0.1
                else sim.now - timedelta(minutes=int(rng.integers(0, 600))),
                "status": str(rng.choice(["applied", "applied", "sending", "failed"])),
            }
        )
    if rows:
        sim.history_rows = rows
    return sim, rng


@settings(PROPERTY, max_examples=40)
@given(one_shot())
def test_plans_pass_their_own_check_against_messy_history(case):
    sim, rng = case
    recommendations, ad_actions = _recommend(sim, rng)
    hist = sim.history()
    plan = plan_changes(
        recommendations, sim.adsets, hist, now=sim.now, config=sim.configs, ad_actions=ad_actions
    )
    _check_plan_shape(plan, recommendations, ad_actions, sim)
    assert check_plan(plan, hist, sim.now, sim.configs, current=sim.adsets) == []
