"""Benchmark: the budget allocator's regret against standard bandits, and its speed.

(a) Regret. Sandbox-style worlds are simulated here with a seeded ``numpy.random.Generator``:
one account, ``n_ads`` ads, a daily budget, ``days`` days. Each ad has hidden rates: CPM,
CTR and value per click (value per click is only weakly tied to CTR: cheap clicks often
bring poor leads). Spend buys Poisson impressions, Binomial clicks and Poisson "value events"
(appointments / sales) of lognormal size, whose value reaches the CRM after a lag drawn from
the world's lag distribution. Worlds:

- ``stationary``: values arrive the same or the next day; rates never change.
- ``delayed``: 20% of the value arrives after 1-2 days, 80% after 5-7 days (a service pipeline).
- ``drift``: ``delayed`` plus a platform shift on day 14 that re-draws most of every ad's rates.
- ``fatigue``: ``delayed`` plus creative fatigue: an ad's CTR decays with its lifetime frequency
  (impressions per person reached in a finite audience). In the other worlds audiences are
  large enough that frequency stays near 1 (no fatigue signal to react to).

Every policy gets the same budget, runs its own copy of the world (common random numbers)
and sees the same kind of delayed data: daily spend, impressions, reach and clicks up to
yesterday and the value that has *arrived* by today. Policies: this allocator with lag
correction (its lag CDF estimated by ``lag.estimate_lag_cdf`` from the account's earlier
deal history plus what arrives during the run), the same allocator without lag correction,
MABWiser 2.7.4 Thompson Sampling / UCB1 / epsilon-greedy, plain Beta-Bernoulli Thompson on
clicks, and uniform budgets. The MABWiser policies split the day into ``SLOTS`` equal budget
slots, predict one arm per slot and learn from per-arm slot records refitted each day
(TS: an arm's successes are its arrived value events, capped at its slots; UCB1 /
epsilon-greedy: each slot's reward is the arm's arrived value per dollar; day 0 is uniform
because they cannot predict before a fit). The oracle puts each day's whole budget on
the ad with the highest true value per dollar (greedy on its own trajectory; in the fatigue
world greedy on current marginal value is optimal up to the daily granularity). Regret =
(oracle value - policy value) / oracle value, in %, with the *expected* value of the spend
(noise-free), reported as median and IQR over seeds. Every policy's own randomness also
comes from the same seeded stream, so differences between policies are paired. The
allocator's knobs were chosen on world seeds 0-15 (the temperature and the forgetting on
0-47); the report uses seeds from 1000 on.
``quick=True`` runs one seed per world and a 20k-ad speed run (a smoke test). After the
medians, the report gives the paired per-seed differences of the allocator against each
baseline (median, IQR, seeds won, sign-test and Wilcoxon p). Other seed sets and a
regret-only run: ``python -m optimizer_assets.bench.sampler --seeds 1000-1049 --regret-only``
(``--policy NAME`` limits the baselines; the default stays seeds 1000-1019 plus speed).

(b) Speed. ``allocate`` on 100 accounts x 1,000 ads (100k ads) including P(best), end to
end and without the reason text, next to the floor (numpy drawing one Beta and one Gamma per
ad) and MABWiser predicting over the same arms (one account's 1,000 arms per call,
extrapolated to 100 accounts, labelled as such). Wall and CPU medians are both reported with
the machine's load average, because other processes may share the CPUs.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from optimizer_assets.domain import lag
from optimizer_assets.domain.sampler import SamplerConfig, allocate, evidence_weights

START = datetime(2026, 11, 1, tzinfo=UTC)
SLOTS = 20  # budget slots per day for the slot-based baselines
HISTORY_DAYS = 56  # earlier deal history available for the lag estimate
MIN_FATIGUE_CLICKS = 100  # clicks per 3-day window before a CTR change means anything
HALF_LIFE_DAYS: float | None = None  # optional exponential half-life of the allocator's inputs
FORGET = True  # weigh evidence by ``sampler.evidence_weights`` (forget before a CTR change)
# The allocator's knobs (posterior_temperature, roas_prior_events, exploration_floor,
# max_share) were chosen on world seeds 0-15, the temperature and ``evidence_weights`` on
# 0-47; the report uses seeds from here on.
HELD_OUT_SEED = 1000
EVENT_SCHEMA = {
    "cohort_at": pl.Datetime("us", "UTC"),
    "occurred_at": pl.Datetime("us", "UTC"),
    "value": pl.Float64,
}


@dataclass(frozen=True)
class WorldSpec:
    """One simulated world; amounts in USD."""

    name: str
    n_ads: int = 20
    days: int = 28
    daily_budget: float = 2000.0
    lags: tuple[int, ...] = (0, 1)
    lag_probs: tuple[float, ...] = (0.6, 0.4)
    drift_day: int | None = None
    drift_keep: float = 0.3  # correlation of log-rates before/after the drift
    fatigue: float = 0.0  # CTR multiplier exp(-fatigue * max(0, frequency - 1.5))
    event_value: float = 300.0  # mean value of one value event
    roas_median: float = 1.5
    ctr_vpc_corr: float = -0.3  # correlation of log CTR and log value-per-click


DELAYED = {"lags": (1, 2, 5, 6, 7), "lag_probs": (0.1, 0.1, 0.27, 0.27, 0.26)}
WORLDS = (
    WorldSpec("stationary"),
    WorldSpec("delayed", **DELAYED),
    WorldSpec("drift", drift_day=14, **DELAYED),
    WorldSpec("fatigue", fatigue=0.35, **DELAYED),
)


@dataclass
class Truth:
    ips: np.ndarray  # impressions per dollar
    ctr: np.ndarray  # (2, K): before / after drift
    vpc: np.ndarray  # (2, K): value per click
    audience: np.ndarray


def make_truth(spec: WorldSpec, rng: np.random.Generator) -> Truth:
    """Hidden per-ad rates; log CTR and log value-per-click are correlated ``ctr_vpc_corr``."""
    k = spec.n_ads
    ips = 1000.0 / rng.uniform(8.0, 16.0, k)

    def draw_logs() -> tuple[np.ndarray, np.ndarray]:
        z1, z2 = rng.standard_normal((2, k))
        r = spec.ctr_vpc_corr
        return 0.35 * z1, 0.6 * (r * z1 + np.sqrt(1 - r * r) * z2)

    lc0, lv0 = draw_logs()
    lc1, lv1 = draw_logs()
    q = spec.drift_keep
    lc1 = q * lc0 + np.sqrt(1 - q * q) * lc1
    lv1 = q * lv0 + np.sqrt(1 - q * q) * lv1
    ctr = 0.012 * np.exp(np.stack([lc0, lc1]))
    base_vpc = spec.roas_median / (float(np.mean(ips)) * 0.012)
    vpc = base_vpc * np.exp(np.stack([lv0, lv1]))
    audience = rng.uniform(150_000, 500_000, k)
    if spec.fatigue == 0:
        audience = audience * 1000.0  # no fatigue: the audience never saturates either
    return Truth(ips=ips, ctr=np.minimum(ctr, 0.2), vpc=vpc, audience=audience)


@dataclass
class Sim:
    """One policy's copy of the world and everything it has observed."""

    spec: WorldSpec
    truth: Truth
    rng: np.random.Generator
    spend: np.ndarray = field(init=False)  # (days, K)
    imps: np.ndarray = field(init=False)
    clicks: np.ndarray = field(init=False)
    reach: np.ndarray = field(init=False)  # lifetime reach after each day
    ev_cohort: list[np.ndarray] = field(default_factory=list)
    ev_arrive: list[np.ndarray] = field(default_factory=list)
    ev_ad: list[np.ndarray] = field(default_factory=list)
    ev_value: list[np.ndarray] = field(default_factory=list)
    value: float = 0.0

    def __post_init__(self) -> None:
        shape = (self.spec.days, self.spec.n_ads)
        self.spend, self.imps, self.clicks, self.reach = (np.zeros(shape) for _ in range(4))

    def rates(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        """True CTR and value per click now (drift phase, fatigue from lifetime frequency)."""
        phase = int(self.spec.drift_day is not None and day >= self.spec.drift_day)
        ctr = self.truth.ctr[phase].copy()
        if self.spec.fatigue > 0 and day > 0:
            life = self.imps[:day].sum(axis=0)
            reach = self.reach[day - 1]
            freq = np.where(reach > 0, life / np.maximum(reach, 1.0), 1.0)
            ctr *= np.exp(-self.spec.fatigue * np.maximum(freq - 1.5, 0.0))
        return ctr, self.truth.vpc[phase]

    def true_roas(self, day: int) -> np.ndarray:
        ctr, vpc = self.rates(day)
        return self.truth.ips * ctr * vpc

    def step(self, day: int, budgets: np.ndarray) -> None:
        """Spend ``budgets`` on ``day``: impressions, clicks, value events with their lags."""
        spec, rng = self.spec, self.rng
        ctr, vpc = self.rates(day)
        self.value += float(budgets @ (self.truth.ips * ctr * vpc))
        imps = rng.poisson(budgets * self.truth.ips)
        clicks = rng.binomial(imps, ctr)
        n_ev = rng.poisson(clicks * vpc / spec.event_value)
        ad = np.repeat(np.arange(spec.n_ads), n_ev)
        sigma = 0.6
        vals = spec.event_value * rng.lognormal(-sigma * sigma / 2, sigma, ad.size)
        lags = rng.choice(np.array(spec.lags), size=ad.size, p=np.array(spec.lag_probs))
        self.spend[day], self.imps[day], self.clicks[day] = budgets, imps, clicks
        life = self.imps[: day + 1].sum(axis=0)
        a = self.truth.audience
        self.reach[day] = a * (1.0 - np.exp(-life / a))
        self.ev_cohort.append(np.full(ad.size, day))
        self.ev_arrive.append(day + lags)
        self.ev_ad.append(ad)
        self.ev_value.append(vals)

    def arrived(self, day: int) -> tuple[np.ndarray, ...]:
        """Events whose value is in the CRM at the start of ``day`` (cohort, arrive, ad, value)."""
        if not self.ev_ad:
            e = np.zeros(0)
            return e, e, e.astype(np.int64), e
        c, a, ad, v = (
            np.concatenate(x) for x in (self.ev_cohort, self.ev_arrive, self.ev_ad, self.ev_value)
        )
        keep = a < day
        return c[keep], a[keep], ad[keep], v[keep]


@dataclass
class Obs:
    """What a policy may look at on the morning of ``day``."""

    day: int
    sim: Sim
    history: pl.DataFrame  # earlier deal history (cohort_at, occurred_at, value)
    prev_budget: np.ndarray


Policy = Callable[[Obs, np.random.Generator], np.ndarray]


def _even(k: int, budget: float) -> np.ndarray:
    return np.full(k, budget / k)


def _sampler_policy(
    lag_correction: bool,
    config: SamplerConfig | None = None,
    forget: bool = FORGET,
    half_life_days: float | None = HALF_LIFE_DAYS,
) -> Policy:
    """This allocator on the observed data, as the ``ad_performance`` asset would build it.

    With ``forget``, each day's evidence (spend, impressions, clicks, value by its click day)
    is weighted by ``sampler.evidence_weights`` (days before a detected CTR change of the ad or
    of the whole account count 0.1); ``half_life_days`` adds an exponential
    discount (off by default: it cost more on the stable worlds than it gained on drift). With
    ``lag_correction`` the matured spend comes from the lag CDF that ``lag.estimate_lag_cdf``
    finds in the account's deal history plus what has arrived so far.
    """

    def policy(obs: Obs, rng: np.random.Generator) -> np.ndarray:
        sim, t = obs.sim, obs.day
        spec = sim.spec
        k = spec.n_ads
        now = START + timedelta(days=t)
        c, a, ad, v = sim.arrived(t)
        w = np.ones((t, k))
        if forget:
            w = evidence_weights(sim.imps[:t], sim.clicks[:t])
        if half_life_days:
            w = w * (0.5 ** ((t - np.arange(t)) / half_life_days))[:, None]
        ev_w = w[c.astype(np.int64), ad] if t else np.zeros(0)
        value = np.bincount(ad, weights=v * ev_w, minlength=k)
        conv = np.bincount(ad, weights=ev_w, minlength=k)
        spend = (w * sim.spend[:t]).sum(axis=0)
        imps = (w * sim.imps[:t]).sum(axis=0)
        clicks = (w * sim.clicks[:t]).sum(axis=0)
        frame = {
            "ad_id": [f"ad{i}" for i in range(k)],
            "created_at": [START] * k,
            "impressions": imps,
            "clicks": clicks,
            "spend": spend,
            "pipeline_value": value,
            "conversions": conv,
            "current_budget": obs.prev_budget,
        }
        if t >= 6:
            i1, c1 = sim.imps[t - 3 : t].sum(0), sim.clicks[t - 3 : t].sum(0)
            i0, c0 = sim.imps[t - 6 : t - 3].sum(0), sim.clicks[t - 6 : t - 3].sum(0)
            ok = (c1 >= MIN_FATIGUE_CLICKS) & (c0 >= MIN_FATIGUE_CLICKS)
            with np.errstate(divide="ignore", invalid="ignore"):
                change = (c1 / i1) / (c0 / i0) - 1.0
            frame["ctr_3d_change"] = np.where(ok, change, np.nan)
        if t >= 1:
            reach = sim.reach[t - 1]
            life = sim.imps[:t].sum(axis=0)
            frame["frequency"] = np.where(reach > 0, life / np.maximum(reach, 1.0), np.nan)
        if lag_correction and t >= 1:
            run = pl.DataFrame(
                {
                    "cohort_at": [START + timedelta(days=int(x)) for x in c],
                    "occurred_at": [START + timedelta(days=int(x)) for x in a],
                    "value": v,
                },
                schema=EVENT_SCHEMA,
            )
            events = pl.concat([obs.history, run])
            cdf = lag.estimate_lag_cdf(events, now=now, max_lag_days=14)["cdf"].to_numpy()
            ages = lag.spend_age_days(lag._day_number(START) + np.arange(t), now)
            frame["matured_spend"] = (w * lag.cdf_at(ages, cdf)[:, None] * sim.spend[:t]).sum(0)
        out = allocate(pl.DataFrame(frame), spec.daily_budget, now=now, rng=rng, config=config)
        return out["budget"].to_numpy()

    return policy


def _click_thompson(obs: Obs, rng: np.random.Generator) -> np.ndarray:
    """Plain Beta-Bernoulli Thompson on clicks: budget slots follow P(best CTR)."""
    sim, t = obs.sim, obs.day
    imps = sim.imps[:t].sum(axis=0)
    clicks = sim.clicks[:t].sum(axis=0)
    draws = rng.beta(clicks + 1.0, imps - clicks + 1.0, size=(SLOTS, imps.size))
    counts = np.bincount(draws.argmax(axis=1), minlength=imps.size)
    return counts / SLOTS * sim.spec.daily_budget


def _uniform(obs: Obs, rng: np.random.Generator) -> np.ndarray:
    return _even(obs.sim.spec.n_ads, obs.sim.spec.daily_budget)


def _mabwiser(kind: str) -> Policy:
    """MABWiser ``kind`` (ts / ucb1 / egreedy) refitted each day on per-slot records."""
    from mabwiser.mab import MAB, LearningPolicy

    def policy(obs: Obs, rng: np.random.Generator) -> np.ndarray:
        sim, t = obs.sim, obs.day
        k, budget = sim.spec.n_ads, sim.spec.daily_budget
        if t == 0:
            return _even(k, budget)  # nothing to fit yet
        slot = budget / SLOTS
        _, _, ad, v = sim.arrived(t)
        spend = sim.spend[:t].sum(axis=0)
        trials = np.maximum(np.round(spend / slot).astype(np.int64), 0)
        arms = list(range(k))
        decisions = np.repeat(np.arange(k), trials)
        if kind == "ts":
            events = np.bincount(ad, minlength=k)
            succ = np.minimum(events, trials)
            # first ``succ`` slots of each arm succeed, the rest fail
            start = np.repeat(np.cumsum(trials) - trials, trials)
            rewards = ((np.arange(decisions.size) - start) < np.repeat(succ, trials)).astype(int)
            lp = LearningPolicy.ThompsonSampling()
        else:
            value = np.bincount(ad, weights=v, minlength=k)
            per_dollar = np.where(spend > 0, value / np.maximum(spend, 1e-9), 0.0)
            rewards = np.repeat(per_dollar, trials)
            lp = (
                LearningPolicy.UCB1(alpha=1.0)
                if kind == "ucb1"
                else LearningPolicy.EpsilonGreedy(epsilon=0.1)
            )
        mab = MAB(arms, lp, seed=int(rng.integers(2**31)))
        mab.fit(decisions, rewards)
        picks = mab.predict(np.zeros((SLOTS, 1)))
        counts = np.bincount(np.asarray(picks, dtype=np.int64), minlength=k)
        return counts / SLOTS * budget

    return policy


POLICIES: dict[str, Policy] = {
    "allocator (lag-corrected)": _sampler_policy(True),
    "allocator without lag correction": _sampler_policy(False),
    "allocator without forgetting": _sampler_policy(True, forget=False),
    "MABWiser Thompson Sampling": _mabwiser("ts"),
    "MABWiser UCB1": _mabwiser("ucb1"),
    "MABWiser epsilon-greedy (0.1)": _mabwiser("egreedy"),
    "plain Beta-Bernoulli Thompson on clicks": _click_thompson,
    "uniform budgets": _uniform,
}


def _history(spec: WorldSpec, rng: np.random.Generator) -> pl.DataFrame:
    """The account's earlier deal history: value events of past ads with the world's lags."""
    n = 40 * HISTORY_DAYS
    cohort = rng.integers(-HISTORY_DAYS, 0, n)
    lags = rng.choice(np.array(spec.lags), size=n, p=np.array(spec.lag_probs))
    arrive = cohort + lags
    keep = arrive < 0  # only what had arrived before the run starts
    to_dt = [START + timedelta(days=int(x)) for x in range(-HISTORY_DAYS, 8)]
    return pl.DataFrame(
        {
            "cohort_at": [to_dt[x + HISTORY_DAYS] for x in cohort[keep]],
            "occurred_at": [to_dt[x + HISTORY_DAYS] for x in arrive[keep]],
            "value": spec.event_value * rng.lognormal(-0.18, 0.6, int(keep.sum())),
        },
        schema={
            "cohort_at": pl.Datetime("us", "UTC"),
            "occurred_at": pl.Datetime("us", "UTC"),
            "value": pl.Float64,
        },
    )


def run_world(spec: WorldSpec, seed: int, policies: dict[str, Policy]) -> dict[str, float]:
    """Regret (% of the oracle's value) of each policy on one seeded world."""
    truth = make_truth(spec, np.random.default_rng([seed, 1]))
    history = _history(spec, np.random.default_rng([seed, 2]))
    oracle = Sim(spec, truth, np.random.default_rng([seed, 3]))
    for t in range(spec.days):
        b = np.zeros(spec.n_ads)
        b[int(np.argmax(oracle.true_roas(t)))] = spec.daily_budget
        oracle.step(t, b)
    out = {}
    for name, policy in policies.items():
        sim = Sim(spec, truth, np.random.default_rng([seed, 3]))  # common random numbers
        prng = np.random.default_rng([seed, 100])  # same decision stream for every policy
        prev = _even(spec.n_ads, spec.daily_budget)
        for t in range(spec.days):
            obs = Obs(day=t, sim=sim, history=history, prev_budget=prev)
            b = np.asarray(policy(obs, prng), dtype=np.float64)
            # A policy may leave the day's budget unspent (the allocator does when it has killed
            # every ad); the value it forgoes counts as regret. It may never overspend.
            if b.sum() > spec.daily_budget + 0.011 or (b < -1e-9).any():
                raise AssertionError(f"{name} broke the budget on day {t}: {b.sum()}")
            sim.step(t, b)
            prev = b
        out[name] = 100.0 * (oracle.value - sim.value) / oracle.value
    return out


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(xs), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def parse_seeds(text: str) -> list[int]:
    """World seeds from ``"1000-1049"``, ``"1000,1003"`` or a mix (``"1000-1019,1030"``)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"empty seed range {part!r}")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated seeds in {text!r}")
    return seeds


def _seed_label(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ", ".join(map(str, seeds))


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | p = 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_report(results: dict[str, dict[str, list[float]]], ours: str, others: list[str]) -> str:
    """Per-seed differences ``ours - other`` (negative: ours lost less): median (IQR), seeds
    where ours is better, the sign test's two-sided p and the Wilcoxon signed-rank test's
    (which also weighs how large the differences are)."""
    from scipy.stats import wilcoxon

    worlds = list(results)
    lines = [
        "| ours minus | " + " | ".join(worlds) + " |",
        "|---" * (len(worlds) + 1) + "|",
    ]
    for other in others:
        cells = []
        for w in worlds:
            d = np.asarray(results[w][ours]) - np.asarray(results[w][other])
            lo, med, hi = _quartiles(list(d))
            better, worse = int((d < 0).sum()), int((d > 0).sum())
            p = sign_test_p(better, worse)
            pw = float(wilcoxon(d).pvalue) if np.any(d != 0) and d.size > 1 else 1.0
            cells.append(
                f"{med:+.1f} ({lo:+.1f} to {hi:+.1f}); better on {better}/{d.size}, "
                f"sign p={p:.2g}, Wilcoxon p={pw:.2g}"
            )
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regret_report(
    seeds: int | list[int],
    worlds: tuple[WorldSpec, ...] = WORLDS,
    policies: dict[str, Policy] | None = None,
) -> tuple[str, dict]:
    """Markdown table of median regret (IQR) per world and policy, the paired differences of
    the first policy (the allocator) against each baseline, and the raw results.

    ``seeds`` is a count of held-out seeds from ``HELD_OUT_SEED`` or an explicit list.
    ``policies`` defaults to ``POLICIES``; its first entry is "ours" in the comparisons.
    """
    seed_list = (
        list(range(HELD_OUT_SEED, HELD_OUT_SEED + seeds)) if isinstance(seeds, int) else list(seeds)
    )
    policies = POLICIES if policies is None else policies
    results: dict[str, dict[str, list[float]]] = {}
    for spec in worlds:
        per: dict[str, list[float]] = {name: [] for name in policies}
        for seed in seed_list:
            for name, r in run_world(spec, seed, policies).items():
                per[name].append(r)
        results[spec.name] = per
    names = list(policies)
    header = "| policy | " + " | ".join(s.name for s in worlds) + " |"
    lines = [header, "|---" * (len(worlds) + 1) + "|"]
    for name in names:
        cells = []
        for spec in worlds:
            lo, med, hi = _quartiles(results[spec.name][name])
            cells.append(f"{med:.1f} ({lo:.1f}-{hi:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ours = names[0]
    baselines = [n for n in names if not n.startswith("allocator")]
    click_ts = "plain Beta-Bernoulli Thompson on clicks"
    verdict = []
    for spec in worlds:
        med = {n: float(np.median(results[spec.name][n])) for n in names}
        beaten = [n for n in baselines if med[ours] >= med[n]]
        ratio = f"{med[ours] / med[click_ts]:.2f}" if click_ts in med else "n/a"
        verdict.append(
            f"| {spec.name} | {'yes' if not beaten else 'no: ' + ', '.join(beaten)} | {ratio} |"
        )
    table = "\n".join(lines)
    goals = "\n".join(
        [
            "| world | lower median regret than every baseline | ours / plain click-Thompson |",
            "|---|---|---|",
            *verdict,
        ]
    )
    paired = paired_report(results, ours, baselines)
    return table + "\n\n" + goals + "\n\n" + paired, results


# ---------------------------------------------------------------------------------------- speed


def speed_frame(accounts: int, ads: int, rng: np.random.Generator) -> pl.DataFrame:
    """A realistic allocator input: ``accounts`` x ``ads`` ads of mixed age and evidence."""
    n = accounts * ads
    age_h = rng.uniform(0, 24 * 30, n)
    imps = rng.integers(0, 200_000, n)
    clicks = rng.binomial(imps, rng.beta(2, 150, n))
    spend = imps / 1000 * rng.uniform(5, 20, n)
    conv = rng.poisson(spend * rng.lognormal(0, 0.7, n) / 100)
    return pl.DataFrame(
        {
            "ad_id": pl.Series(np.arange(n)).cast(pl.Utf8),
            "account_id": pl.Series(np.repeat(np.arange(accounts), ads)).cast(pl.Utf8),
            "created_at": pl.Series(
                (START.timestamp() * 1e6 - age_h * 3.6e9).astype(np.int64)
            ).cast(pl.Datetime("us", "UTC")),
            "impressions": imps,
            "clicks": clicks,
            "spend": spend,
            "pipeline_value": conv * 100.0,
            "conversions": conv,
            "matured_spend": spend * rng.uniform(0.3, 1.0, n),
            "current_budget": rng.uniform(5, 50, n),
            "ctr_3d_change": rng.normal(0, 0.15, n),
            "frequency": rng.uniform(1, 4, n),
        }
    )


def _kernel_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _median_time(fn: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """(median wall seconds, median CPU seconds of this process, median kernel CPU seconds
    of those) over ``runs`` calls. The kernel part is mostly page faults: glibc hands freed
    arrays of 100k floats back to the system between calls and the next call faults them in
    again."""
    walls, cpus, kernel = [], [], []
    for _ in range(runs):
        t0, c0, s0 = time.perf_counter(), time.process_time(), _kernel_seconds()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        kernel.append(_kernel_seconds() - s0)
    return statistics.median(walls), statistics.median(cpus), statistics.median(kernel)


def speed_report(accounts: int, ads: int, runs: int) -> tuple[str, dict]:
    """Median wall (and CPU) time of ``allocate`` on accounts x ads, next to the floor."""
    from optimizer_assets.domain.sampler import _allocate_numbers

    rng = np.random.default_rng(7)
    frame = speed_frame(accounts, ads, rng)
    n = frame.height
    budgets = {str(a): 10_000.0 for a in range(accounts)}
    cfg = SamplerConfig()
    load_before = os.getloadavg()[0]
    t_alloc = _median_time(
        lambda: allocate(frame, budgets, now=START, rng=np.random.default_rng(1)), runs
    )
    t_core = _median_time(
        lambda: _allocate_numbers(frame, budgets, START, np.random.default_rng(1), None), runs
    )
    clicks = frame["clicks"].to_numpy().astype(float)
    imps = frame["impressions"].to_numpy().astype(float)
    conv = frame["conversions"].to_numpy().astype(float)
    spend = frame["spend"].to_numpy()
    draw_rng = np.random.default_rng(2)

    def floor() -> None:
        draw_rng.beta(clicks + 1, imps - clicks + 1)
        draw_rng.gamma(conv + 1, 1.0 / (spend + 1))

    t_floor = _median_time(floor, runs)

    from mabwiser.mab import MAB, LearningPolicy

    arms = list(range(ads))  # one account's arms; extrapolated x accounts
    mab = MAB(arms, LearningPolicy.ThompsonSampling(), seed=3)
    sub_clicks = clicks[:ads].astype(np.int64)
    dec = np.repeat(np.arange(ads), np.minimum(sub_clicks, 50) + 1)
    mab.fit(dec, (np.arange(dec.size) % 2).astype(int))
    t_mab_one = _median_time(lambda: mab.predict_expectations(), runs)
    t_mab = (t_mab_one[0] * accounts, t_mab_one[1] * accounts, t_mab_one[2] * accounts)
    load_after = os.getloadavg()[0]
    rows = [
        ("`allocate` end to end (posteriors, P(best), rules, budgets, reason text)", t_alloc),
        ("`allocate` without the reason text (`_allocate_numbers`)", t_core),
        ("floor: numpy, one Beta + one Gamma draw per ad", t_floor),
        (
            f"MABWiser TS `predict_expectations`, one draw per arm (no P(best)); {ads} arms "
            f"measured, x{accounts} **extrapolated**",
            t_mab,
        ),
    ]
    lines = [
        f"{accounts} accounts x {ads} ads = {n:,} ads; median of {runs} runs; P(best) on the "
        f"top {cfg.p_best_top_k} ads per account x {cfg.n_draws} draws. {os.cpu_count()} CPUs, "
        f"1-min load average {load_before:.1f} -> {load_after:.1f} during the runs (other "
        "processes share the machine, so wall times are upper bounds).",
        "",
        "| what | wall s | CPU s | of which kernel s | ads / s (wall) | ads / s (CPU) "
        "| wall vs floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (wall, cpu, kernel) in rows:
        lines.append(
            f"| {label} | {wall:.4f} | {cpu:.4f} | {kernel:.3f} | {n / wall:,.0f} "
            f"| {n / max(cpu, 1e-9):,.0f} | {wall / t_floor[0]:.1f}x |"
        )
    return "\n".join(lines), {
        "allocate_s": t_alloc[0],
        "core_s": t_core[0],
        "floor_s": t_floor[0],
        "mabwiser_s": t_mab[0],
    }


def main(
    quick: bool = False,
    seeds: list[int] | None = None,
    regret_only: bool = False,
    policy_names: list[str] | None = None,
) -> str:
    """Markdown report: regret per world and policy, then speed (unless ``regret_only``).

    ``seeds`` overrides the held-out world seeds (default: 20 from ``HELD_OUT_SEED``, one when
    ``quick``); ``policy_names`` runs only those policies (the allocator always runs first, as
    the comparisons' "ours")."""
    # quick (a smoke run for tests): one seed per world and a 20k-ad speed run
    if seeds is None:
        seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + (1 if quick else 20)))
    ours = next(iter(POLICIES))
    chosen = list(POLICIES) if policy_names is None else [ours, *policy_names]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {list(POLICIES)}")
    policies = {n: POLICIES[n] for n in dict.fromkeys(chosen)}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    regret_md, _ = regret_report(seeds, policies=policies)
    regret_s = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    spec = WORLDS[0]
    tuning = [s for s in seeds if s < HELD_OUT_SEED]
    out = [
        f"### Regret (% of the oracle's value; median (IQR) over {len(seeds)} seeds)",
        "",
        f"One account, {spec.n_ads} ads, ${spec.daily_budget:,.0f}/day for {spec.days} "
        "days; value events of ~$300, true ROAS lognormal around 1.5, log CTR and log "
        f"value per click correlated {spec.ctr_vpc_corr}. World seeds {_seed_label(seeds)} "
        + (
            f"(**{len(tuning)} of them are tuning seeds below {HELD_OUT_SEED}**; "
            if tuning
            else "(held out; "
        )
        + "the allocator's knobs were chosen on seeds 0-47). The allocator runs with "
        "`SamplerConfig()` defaults. Every policy spends the same budget in its own copy of "
        "the world with the same random numbers; budget-slot baselines use "
        f"{SLOTS} slots/day. Regret took {regret_s:.0f} s wall, 1-min load average "
        f"{load_before:.1f} -> {load_after:.1f}.",
        "",
        "Last table: per-seed difference allocator minus each baseline, in points of regret "
        "(negative = the allocator lost less on that seed): median (IQR), the seeds where the "
        "allocator is better, and the two-sided p of the sign test (ties dropped) and of the "
        "Wilcoxon signed-rank test.",
        "",
        regret_md,
    ]
    if not regret_only:
        speed_md, _ = speed_report(20 if quick else 100, 1000, 2 if quick else 7)
        out += ["", "### Speed", "", speed_md]
    return "\n".join(out)


def _cli(argv: list[str] | None = None) -> str:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m optimizer_assets.bench.sampler", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="one seed per world, small speed run")
    ap.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help=f"world seeds, e.g. 1000-1049 (default {HELD_OUT_SEED}-{HELD_OUT_SEED + 19})",
    )
    ap.add_argument("--regret-only", action="store_true", help="skip the speed part")
    ap.add_argument(
        "--policy",
        action="append",
        dest="policies",
        help="run only this baseline (repeatable; the allocator always runs)",
    )
    a = ap.parse_args(argv)
    return main(quick=a.quick, seeds=a.seeds, regret_only=a.regret_only, policy_names=a.policies)


if __name__ == "__main__":
    print(_cli())
