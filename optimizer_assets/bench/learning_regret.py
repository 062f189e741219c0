"""Benchmark: does each learner lower the allocator's regret on the sandbox truth? (issue 7)

Drives seeded sandbox ``World``s in this process (no HTTP, no Dagster: the domain functions
the assets call) one simulated day at a time, once per arm with the same world seed (common
random numbers: the world's hourly randomness comes from ``(seed, hour)``):

- every morning (00:00 UTC, from day 1 on) the harness builds the allocator's input like the
  ``ad_performance`` asset: the catalog (ad and ad-set status, ad-set budgets), the closed
  days' insights, and pipeline value per ad as stage-value deltas (service-business preset:
  appointment $2,250, show-up $9,000, won = the deal amount, lost 0) of the deal-stage history
  visible so far. Which ad a deal came from is taken from the world's truth (``truth_deals``),
  not from the attribution layer: this isolates the policy from attribution error. The lag
  curve comes from ``lag.estimate_lag_cdf`` on that history (``performance.performance_frame``).
- the arm's learners add their inputs (``performance.apply_learning``, the same function the
  ``ad_scores`` asset calls), ``performance.allocate_accounts`` runs ``sampler.allocate`` per
  account, ``performance.budget_recommendations`` sums the ads per ad set, and the budgets go
  to the world with ``update_adset`` (killed ads are paused with ``update_ad``); then the
  world advances 24 h.

Arms: ``base`` (no learner), ``boost`` (cross-account patterns recomputed each morning from the
data seen so far with ``cross_account.patterns``, passed as ``boost``/``boost_reason`` to ads
younger than 7 days), ``priors`` (winners selected each morning with ``select_winners``,
indexed with FAISS, ``priors_from_winners`` for ads younger than 7 days), ``drift`` (an
``InstantLearner`` fed each closed day's insights rows; its ADWIN drift records discount the
pre-drift evidence with ``evidence_decay``/``decay_counts``), ``all`` (the three together),
``forget`` (``performance.forget_changes``: ``sampler.evidence_weights`` on each ad's daily
impressions / clicks, value weighted by its click day = deal creation) and ``forget_drift``
(forgetting first, then the drift discount for the ads it did not cut); ``forget_ad_only``
(not a setting: the same without the account-wide change test, ``account_z=None``).

New ads: the world cannot create ads, so the harness holds back one ad per ad set (the last
one, 25% of the ads) paused from the start and launches them (``update_ad`` ACTIVE) on
``launch_day``; their ``created_at`` is the launch time in the allocator's input, so they are
new ads for boosts and priors. The pre-existing ads keep the world's creation times (weeks
old). The world's platform drift (hook-type CTR multipliers) happens at hour 360 (day 15).

Value of an allocation, on the truth: an ad's true value per dollar on a day is its
``truth_ads_daily.true_value_per_impression`` x impressions per dollar at its account's base CPM
and format (``1000 / (account CPM x format factor)``; the world's private CPM arrays, bench
only). Policy value = sum over ads of spend x that value per dollar. The oracle is the best the
allocator could do with the same spend under the same constraints: it sets ad-set budgets only
(Meta splits an ad set's spend over its live ads by CTR squared, as the world does), every
ad set with a live ad keeps Meta's minimum ($5), and the rest of the account's daily budget goes
to the ad set with the highest true value per dollar of its delivered mix; its value per dollar
times the account's actual spend that day is the oracle value. Regret = 1 - policy / oracle, in
% of the oracle's value, summed over a window of days: ``all`` (days 1-28), ``launch`` (the 7
days from the launch) and ``drift`` (the 14 days from the drift). Pipeline value = expected won
revenue of the impressions each arm actually bought (impressions x true value per impression;
budget edits beyond +-30% put ad sets into learning at +15% CPM, which this includes).
Differences are arm minus ``base`` on the same seed (paired), reported as median and IQR.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from optimizer_assets.domain import cross_account, lag, performance
from optimizer_assets.domain import winner_index as winners_mod
from optimizer_assets.domain.instant_learner import TRAITS, InstantLearner
from optimizer_assets.domain.revenue import PRESETS
from optimizer_assets.domain.sampler import SamplerConfig
from optimizer_assets.sandbox import world as world_mod
from optimizer_assets.sandbox.world import World, WorldConfig, WorldError

ARMS: dict[str, frozenset[str]] = {
    "base": frozenset(),
    # not a learner: the world's own budgets, never changed (how much the allocator moves)
    "static": frozenset({"static"}),
    "boost": frozenset({"cross_account_boost"}),
    "priors": frozenset({"winner_priors"}),
    "drift": frozenset({"drift_discount"}),
    # not a setting: the same discounting, told the world's true drift time (24 h late), to
    # separate what discounting is worth from how well the instant learner detects the drift
    "drift_true_time": frozenset({"drift_discount", "true_drift_time"}),
    "all": frozenset({"cross_account_boost", "winner_priors", "drift_discount"}),
    # sampler.evidence_weights on each ad's daily CTR (performance.forget_changes)
    "forget": frozenset({"forget_changes"}),
    "forget_drift": frozenset({"forget_changes", "drift_discount"}),
    # not a setting: forgetting on each ad's own change only (evidence_weights account_z=None)
    "forget_ad_only": frozenset({"forget_changes", "ad_only"}),
}
_UTC = pl.Datetime("us", "UTC")
_SERVICE = PRESETS["service_business"]
STAGE_VALUE = {
    "Lead": _SERVICE["lead"].value,
    "Appointment scheduled": _SERVICE["appointment_scheduled"].value,
    "Show up": _SERVICE["show_up"].value,
    "Closed lost": _SERVICE["closed_lost"].value,
}  # "Closed won": the deal amount (value_if_won)


@dataclass(frozen=True)
class Spec:
    """One benchmark world and run length."""

    accounts: int = 6
    ads_per_account: int = 24
    days: int = 29  # days 0..28: day 0 on the world's budgets, 28 allocator mornings
    launch_day: int = 8
    drift_hours: float = 360.0
    hold_back: bool = True  # the last ad of every ad set waits for launch_day

    @property
    def drift_day(self) -> int:
        return int(self.drift_hours // 24)

    def windows(self) -> dict[str, tuple[int, int]]:
        """Inclusive day ranges the regret is summed over."""
        return {
            "all": (1, self.days - 1),
            "launch": (self.launch_day, self.launch_day + 6),
            "drift": (self.drift_day, min(self.drift_day + 13, self.days - 1)),
        }


# ------------------------------------------------------------------------ world -> frames


def catalog(world: World, created: dict[str, datetime]) -> pl.DataFrame:
    """``meta_ads``-shaped rows: ad + ad-set status, ad-set budget, traits, copy; held-back
    ads carry their launch time as ``created_at``."""
    ads = world.ads()
    sets = world.adsets().select(
        "adset_id",
        pl.col("status").alias("adset_status"),
        pl.col("daily_budget").cast(pl.Int64),
    )
    launch = pl.DataFrame(
        {"ad_id": list(created), "_launch": list(created.values())},
        schema={"ad_id": pl.Utf8, "_launch": _UTC},
    )
    return (
        ads.join(sets, on="adset_id", how="left")
        .join(launch, on="ad_id", how="left")
        .select(
            "ad_id", "adset_id", "campaign_id", "account_id",
            pl.col("status").alias("ad_status"), "adset_status", "daily_budget",
            pl.coalesce("_launch", pl.col("created_time").cast(_UTC)).alias("created_at"),
            *TRAITS, "title", "body",
        )
    )  # fmt: skip


def closed_insights(world: World) -> pl.DataFrame:
    """Insights of every closed day, all accounts (``meta_ad_insights`` columns)."""
    start = world.config.start.date()
    last = (world.now - timedelta(days=1)).date()
    frames = [world.insights(a, start, last) for a in world.accounts()["account_id"]]
    return pl.concat(frames).rename({"date_start": "date"})


def value_history(world: World) -> pl.DataFrame:
    """Stage-value deltas of the visible deal history with the deal's true ad:
    ad_id, deal_id, cohort_at (deal creation), occurred_at, value."""
    hist = world.deal_stage_history()
    truth = world.truth_deals().select(
        "deal_id", pl.col("true_ad_id").alias("ad_id"), "value_if_won"
    )
    stage_value = (
        pl.when(pl.col("stage_label") == "Closed won")
        .then(pl.col("value_if_won"))
        .otherwise(pl.col("stage_label").replace_strict(STAGE_VALUE, default=0.0))
    )
    return (
        hist.join(truth, on="deal_id", how="inner")
        .sort("deal_id", "occurred_at")
        .with_columns(stage_value.cast(pl.Float64).alias("_v"))
        .with_columns(
            (pl.col("_v") - pl.col("_v").shift(1).over("deal_id").fill_null(0.0)).alias("value"),
            pl.col("occurred_at").min().over("deal_id").alias("cohort_at"),
        )
        .select("ad_id", "deal_id", "cohort_at", "occurred_at", "value")
    )


def learner_events(insights: pl.DataFrame, ads: pl.DataFrame, day: datetime) -> pl.DataFrame:
    """The instant learner's events for one closed day (as the ``online_learner`` asset)."""
    rows = insights.filter(pl.col("date") == day.date())
    end = (pl.col("date").cast(pl.Datetime("us")) + pl.duration(days=1)).dt.replace_time_zone("UTC")
    return rows.join(ads.select("ad_id", *TRAITS), on="ad_id", how="left").select(
        pl.concat_str([pl.col("ad_id"), pl.col("date").cast(pl.Utf8)], separator=":").alias(
            "event_key"
        ),
        end.alias("occurred_at"),
        "date", "account_id", "ad_id", *TRAITS, "impressions", "clicks", "leads",
    )  # fmt: skip


# ------------------------------------------------------------------------------- one arm


@dataclass
class ArmRun:
    """Per-day records of one arm on one world seed."""

    live: list[pl.DataFrame]  # ad_ids live on each day (index = day)
    world: World
    budgets: np.ndarray  # ad-set daily budgets at the start (cents; totals are conserved)
    boosts: int = 0  # ad-days that got a boost != 1
    priors: int = 0  # ad-days that got a winner prior
    decayed: int = 0  # ad-days whose evidence was discounted
    drifts: int = 0  # drift records of the instant learner
    early: int = 0  # of which detected before the world's drift (false alarms)
    first_detection_hours: float | None = None
    seconds: float = 0.0


def run_arm(seed: int, arm: str, spec: Spec) -> ArmRun:
    """Simulate ``spec.days`` days of ``arm`` on world ``seed``; returns its records."""
    started = time.process_time()
    flags = ARMS[arm]
    world = World(
        WorldConfig(
            seed=seed,
            accounts=spec.accounts,
            ads_per_account=spec.ads_per_account,
            drift_at_hours=spec.drift_hours,
        )
    )
    start = world.config.start
    ads0 = world.ads()
    held: list[str] = []
    if spec.hold_back:
        held = (
            ads0.with_row_index("_i")
            .filter(
                (pl.col("status") == "ACTIVE")
                & (pl.col("_i") == pl.col("_i").max().over("adset_id"))
            )["ad_id"]
            .to_list()
        )
        for ad_id in held:
            world.update_ad(ad_id, status="PAUSED")
    launch_at = start + timedelta(days=spec.launch_day)
    created = dict.fromkeys(held, launch_at)
    accounts = world.accounts()["account_id"].to_list()
    currencies = dict.fromkeys(accounts, "USD")
    minimums = dict.fromkeys(accounts, world.config.min_daily_budget)
    configs = {"*": SamplerConfig()}
    learner = InstantLearner() if "drift_discount" in flags else None
    on = set(accounts)
    run = ArmRun(live=[], world=world, budgets=world.adsets()["daily_budget"].to_numpy())
    for day in range(spec.days):
        now = world.now
        if held and day == spec.launch_day:
            for ad_id in held:
                world.update_ad(ad_id, status="ACTIVE")
        ads = catalog(world, created)
        if day > 0 and "static" not in flags:
            insights = closed_insights(world)
            if learner is not None:
                learner.learn_many(learner_events(insights, ads, now - timedelta(days=1)))
            hist = value_history(world)
            events = hist.select("ad_id", "occurred_at", "value", pl.lit(1.0).alias("credit"))
            lag_cdf = lag.estimate_lag_cdf(
                hist.select("cohort_at", "occurred_at", "value"), now=now, max_lag_days=28
            )
            perf = performance.performance_frame(
                ads,
                insights,
                events,
                now=now,
                lag_cdf=lag_cdf,
                currencies=currencies,
                min_adset_budgets=minimums,
            )
            kwargs: dict = {}
            creative_perf = perf.join(
                ads.select("ad_id", *TRAITS, "title", "body"), on="ad_id", how="left"
            )
            if "cross_account_boost" in flags:
                kwargs["boost_accounts"] = on
                kwargs["patterns"] = cross_account.patterns(creative_perf)
            if "winner_priors" in flags:
                young = perf.filter(pl.col("age_hours") < performance.NEW_AD_HOURS)
                winners = winners_mod.select_winners(creative_perf, now=now)
                if young.height and winners.height:
                    kwargs["prior_accounts"] = on
                    kwargs["index"] = winners_mod.build(winners)
            if learner is not None:
                kwargs["decay_accounts"] = on
                kwargs["drifts"] = (
                    true_drifts(world, delay_hours=24.0)
                    if "true_drift_time" in flags
                    else learner.drifts
                )
                kwargs["daily"] = performance.daily_evidence(insights, hist, hist)
            if "forget_changes" in flags:
                kwargs["forget_accounts"] = on
                kwargs["daily"] = performance.daily_evidence(insights, hist, hist)
                kwargs["lag_cdf"] = lag_cdf
                if "ad_only" in flags:
                    kwargs["forget_options"] = {"account_z": None}
            perf = performance.apply_learning(perf, now=now, creatives=ads, **kwargs)
            if "boost" in perf.columns:
                run.boosts += int((perf["boost"] != 1.0).sum())
            if "prior_alpha" in perf.columns:
                run.priors += int(perf["prior_alpha"].is_not_null().sum())
            if "evidence_factor" in perf.columns:
                run.decayed += int((perf["evidence_factor"] < 1.0).sum())
            if "forget_cut" in perf.columns:
                run.decayed += int(perf["forget_cut"].is_not_null().sum())
            scores = performance.allocate_accounts(perf, configs, now=now)
            recs = performance.budget_recommendations(scores, perf, change_band=0.1, now=now)
            apply(world, scores, recs)
            ads = catalog(world, created)
        run.live.append(
            ads.filter((pl.col("ad_status") == "ACTIVE") & (pl.col("adset_status") == "ACTIVE"))
            .select("ad_id", "adset_id", "account_id")
            .with_columns(pl.lit(day).alias("day"))
        )
        world.advance(24)
    if learner is not None:
        d = learner.drifts
        run.drifts = d.height
        after = d.filter(pl.col("detected_at") >= start + timedelta(hours=spec.drift_hours))
        run.early = d.height - after.height
        if after.height:
            first = after["detected_at"].min()
            run.first_detection_hours = (first - start).total_seconds() / 3600 - spec.drift_hours
    run.seconds = time.process_time() - started
    return run


def true_drifts(world: World, delay_hours: float) -> pl.DataFrame:
    """The world's drifts as if detected ``delay_hours`` after they happened (bench only)."""
    rows = []
    for d in world.truth_drifts():
        at = datetime.fromisoformat(d["at"].replace("Z", "+00:00"))
        if at + timedelta(hours=delay_hours) <= world.now:
            rows.append(
                {
                    "account_id": d["account_id"],
                    "detected_at": at + timedelta(hours=delay_hours),
                    "changed_at": at,
                }
            )
    schema = {"account_id": pl.Utf8, "detected_at": _UTC, "changed_at": _UTC}
    return pl.DataFrame(rows, schema=schema)


def apply(world: World, scores: pl.DataFrame, recs: pl.DataFrame) -> None:
    """Send the recommended ad-set budgets to the world and pause killed ads."""
    for ad_id in scores.filter(pl.col("action") == "kill")["ad_id"].to_list():
        world.update_ad(ad_id, status="PAUSED")
    changed = recs.filter(pl.col("recommended_budget") != pl.col("current_budget"))
    for adset_id, budget in changed.select("adset_id", "recommended_budget").iter_rows():
        try:
            if budget <= 0:
                world.update_adset(adset_id, status="PAUSED")
            else:
                world.update_adset(adset_id, daily_budget=int(budget))
        except WorldError:  # below the minimum or rate-limited: keep the current budget
            pass


# ------------------------------------------------------------------------------ scoring


def day_values(run: ArmRun, spec: Spec) -> pl.DataFrame:
    """Per (account, day): policy value, oracle value (both at base CPM), pipeline value."""
    w = run.world
    n = w.n_ads
    ad_ids = pl.Series(w._ad_ids.astype(str))
    imps_per_dollar = 1000.0 / (w._acc_cpm[w._ad_account] * world_mod.FORMAT_CPM[w._ad_format])
    start = w.config.start.date()
    truth = w.truth_ads_daily().select(
        ((pl.col("date") - pl.lit(start)).dt.total_days()).cast(pl.Int64).alias("day"),
        "ad_id", "account_id", "true_ctr", "true_value_per_impression",
    ).join(
        pl.DataFrame({"ad_id": ad_ids, "_ipd": imps_per_dollar[:n]}), on="ad_id"
    ).with_columns(
        (pl.col("true_value_per_impression") * pl.col("_ipd")).alias("vpd")
    )  # fmt: skip
    ins = closed_insights(w).select(
        ((pl.col("date") - pl.lit(start)).dt.total_days()).cast(pl.Int64).alias("day"),
        "ad_id", "spend", "impressions",
    )  # fmt: skip
    acts = ins.join(truth, on=["day", "ad_id"], how="left")
    policy = acts.group_by("account_id", "day").agg(
        pl.col("spend").sum().alias("spend"),
        (pl.col("spend") * pl.col("vpd")).sum().alias("policy"),
        (pl.col("impressions") * pl.col("true_value_per_impression")).sum().alias("pipeline"),
    )
    live = pl.concat(run.live).join(truth, on=["day", "ad_id", "account_id"], how="inner")
    sets = (
        live.group_by("account_id", "day", "adset_id")
        .agg(
            (
                (pl.col("true_ctr") ** 2 * pl.col("vpd")).sum() / (pl.col("true_ctr") ** 2).sum()
            ).alias("v")
        )
        .group_by("account_id", "day")
        .agg(
            pl.col("v").sum().alias("v_sum"), pl.col("v").max().alias("v_max"), pl.len().alias("n")
        )
    )
    m = w.config.min_daily_budget / 100.0
    totals = pl.DataFrame(
        {
            "account_id": pl.Series(w._account_ids.astype(str)),
            "budget": np.bincount(w._adset_account, weights=run.budgets.astype(np.float64)) / 100.0,
        }
    )
    rate = (m * pl.col("v_sum") + (pl.col("budget") - pl.col("n") * m) * pl.col("v_max")) / pl.col(
        "budget"
    )
    return (
        policy.join(sets, on=["account_id", "day"], how="left")
        .join(totals, on="account_id", how="left")
        .with_columns((pl.col("spend") * rate).alias("oracle"))
        .select("account_id", "day", "spend", "policy", "oracle", "pipeline")
    )


def summarize(run: ArmRun, spec: Spec) -> dict[str, float]:
    """Regret (% of the oracle's value) and pipeline value per window."""
    days = day_values(run, spec)
    out: dict[str, float] = {}
    for name, (lo, hi) in spec.windows().items():
        sel = days.filter(pl.col("day").is_between(lo, hi))
        oracle = float(sel["oracle"].sum())
        out[f"regret_{name}"] = 100.0 * (1.0 - float(sel["policy"].sum()) / oracle)
        out[f"pipeline_{name}"] = float(sel["pipeline"].sum())
    return out


# ------------------------------------------------------------------------------- report


def _q(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return med, q1, q3


def _fmt(values: list[float], digits: int = 2) -> str:
    med, q1, q3 = _q(values)
    return f"{med:+.{digits}f} ({q1:+.{digits}f} to {q3:+.{digits}f})"


def measure(seeds: list[int], spec: Spec, arms: tuple[str, ...], progress: bool = False) -> dict:
    """Every arm on every seed: metrics per (arm, seed) and learner counters."""
    results: dict[str, dict[int, dict[str, float]]] = {a: {} for a in arms}
    extra: dict[str, dict[int, ArmRun]] = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            run = run_arm(seed, arm, spec)
            results[arm][seed] = summarize(run, spec)
            if progress:
                print(f"seed {seed} {arm}: {results[arm][seed]}", file=sys.stderr, flush=True)
            run.world = None  # type: ignore[assignment]  # free the world
            run.live = []
            extra[arm][seed] = run
    return {"results": results, "runs": extra}


def report(seeds: list[int], spec: Spec, arms: tuple[str, ...], wall: float, data: dict) -> str:
    res, runs = data["results"], data["runs"]
    windows = spec.windows()
    lines = [
        f"World: {spec.accounts} accounts x {spec.ads_per_account} ads, {spec.days} days, "
        f"new ads (1 per ad set, 25%) launched on day {spec.launch_day}, platform drift at hour "
        f"{spec.drift_hours:.0f} (day {spec.drift_day}); seeds {seeds[0]}-{seeds[-1]} "
        f"({len(seeds)}); windows (days): "
        + ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in windows.items())
        + ".",
        "",
        "Regret, % of the oracle's value, median (IQR) over seeds:",
        "",
        "| arm | " + " | ".join(windows) + " |",
        "|---|" + "---|" * len(windows),
    ]
    for arm in arms:
        cells = [_fmt([res[arm][s][f"regret_{w}"] for s in seeds], 1) for w in windows]
        lines.append(f"| {arm} | " + " | ".join(c.replace("+", "") for c in cells) + " |")
    lines += [
        "",
        "Paired difference vs `base` (same seed): regret in percentage points (negative = the "
        "learner lowers regret), then pipeline value in % of base; median (IQR), and seeds "
        "where regret went down:",
        "",
        "| arm | "
        + " | ".join(f"regret {w} (pp)" for w in windows)
        + " | "
        + " | ".join(f"pipeline {w} (%)" for w in windows)
        + " | regret down (all / window) |",
        "|---|" + "---|" * (2 * len(windows) + 1),
    ]
    key_window = {
        "static": "all",
        "boost": "launch",
        "priors": "launch",
        "drift": "drift",
        "drift_true_time": "drift",
        "all": "all",
        "forget": "drift",
        "forget_drift": "drift",
        "forget_ad_only": "drift",
    }
    for arm in arms:
        if arm == "base":
            continue
        d_reg = {
            w: [res[arm][s][f"regret_{w}"] - res["base"][s][f"regret_{w}"] for s in seeds]
            for w in windows
        }
        d_val = {
            w: [
                100.0 * (res[arm][s][f"pipeline_{w}"] / res["base"][s][f"pipeline_{w}"] - 1.0)
                for s in seeds
            ]
            for w in windows
        }
        kw = key_window.get(arm, "all")
        down_all = sum(v < 0 for v in d_reg["all"])
        down_kw = sum(v < 0 for v in d_reg[kw])
        lines.append(
            f"| {arm} | "
            + " | ".join(_fmt(d_reg[w]) for w in windows)
            + " | "
            + " | ".join(_fmt(d_val[w]) for w in windows)
            + f" | {down_all}/{len(seeds)} / {down_kw}/{len(seeds)} ({kw}) |"
        )
    lines += ["", "Learner activity (median per run over seeds; drifts: total over all runs):", ""]
    lines += ["| arm | ad-days boosted | ad-days with winner prior | ad-days decayed | drifts "
              "detected (before the drift) | first detection after the drift (h) | CPU s per run |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm in arms:
        rs = [runs[arm][s] for s in seeds]
        det = [r.first_detection_hours for r in rs if r.first_detection_hours is not None]
        lines.append(
            f"| {arm} | {statistics.median(r.boosts for r in rs):.0f} | "
            f"{statistics.median(r.priors for r in rs):.0f} | "
            f"{statistics.median(r.decayed for r in rs):.0f} | "
            f"{sum(r.drifts for r in rs)} ({sum(r.early for r in rs)}) in {len(rs)} runs | "
            + (f"{statistics.median(det):.0f} ({len(det)}/{len(rs)} runs)" if det else "-")
            + f" | {statistics.median(r.seconds for r in rs):.1f} |"
        )
    lines += [
        "",
        f"Wall {wall:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines)


def main(
    quick: bool = False,
    seeds: list[int] | None = None,
    progress: bool = False,
    arms: tuple[str, ...] | None = None,
) -> str:
    """Markdown report. Full: 24 seeds of 6 accounts x 24 ads; quick: 2 seeds of 4 x 16."""
    if quick:
        spec = Spec(accounts=4, ads_per_account=16, days=22, launch_day=8, drift_hours=360.0)
        seeds = seeds or [101, 102]
    else:
        spec = Spec()
        seeds = seeds or list(range(101, 125))
    arms = ("base", *[a for a in (arms or ARMS) if a != "base"])
    started = time.perf_counter()
    data = measure(seeds, spec, arms, progress)
    return report(seeds, spec, arms, time.perf_counter() - started, data)


if __name__ == "__main__":
    # python -m optimizer_assets.bench.learning_regret [--quick] [--seeds 101-124] [--arms a,b]
    args = sys.argv[1:]
    chosen, arms = None, None
    if "--arms" in args:
        arms = tuple(args[args.index("--arms") + 1].split(","))
    if "--seeds" in args:
        lo, _, hi = args[args.index("--seeds") + 1].partition("-")
        chosen = list(range(int(lo), int(hi or lo) + 1))
    print(main(quick="--quick" in args, seeds=chosen, progress=True, arms=arms))
