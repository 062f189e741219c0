"""The budget allocator: pipeline-aware Thompson sampling with safety rules and reasons.

``allocate`` turns one row per live ad into a budget, an action a media buyer recognizes and
the sentence behind it. It is pure (polars + numpy), vectorized over ads, and deterministic
for a given ``numpy.random.Generator``.

Model (per ad, all conjugate so the posteriors are closed-form):

- CTR ~ Beta(prior_alpha + clicks, prior_beta + impressions - clicks). The prior defaults to
  the account's pooled CTR with ``ctr_prior_impressions`` pseudo-impressions.
- Value = value events x size (compound Poisson). The event rate per unit of *matured* spend
  M is lambda ~ Gamma(a0 + n, a0 / lambda0 + M) (Gamma-Poisson), with n the ``conversions``
  behind the attributed ``pipeline_value`` V; the size of an event is the ad's V / n shrunk
  to the account's mean size with ``size_prior_events`` pseudo-events. ROAS = size x lambda.
  Without ``conversions``, value is read as events of ``value_unit`` each (n = V / unit).
  M is the spend whose value should have arrived by now (``matured_spend`` from
  ``domain/lag.py``; plain spend when absent, i.e. no lag correction), so recent spend is
  neither counted as failure nor extrapolated blindly.
- Prior ROAS: ``prior_roas`` when given (cross-account patterns, similar winners), else the
  account's pooled lag-corrected ROAS moved by the ad's CTR:
  ``account_roas * (1 + beta * (ctr / account_ctr - 1))``. The slope beta starts at
  ``ctr_value_slope`` (1: CTR lift maps one-to-one onto ROAS) and, once the account has
  enough matured value, is re-estimated from its own ads (precision-weighted regression with
  a normal prior; empirical Bayes). ``a0 = roas_prior_events`` is the prior's weight.
- CTR on the value scale is the same mapping, ``account_roas * (1 + beta * (ctr/acc_ctr - 1))``:
  an ad with 1.5x the account's CTR is worth 1.5x the account's ROAS when beta = 1.
- Blended score = boost x (w x ctr_value + (1 - w) x roas), with the CTR weight ``w`` a
  piecewise-linear function of the ad's age (``pipeline_blend`` / ``direct_blend``): CTR only
  under 6 h, 1.0 -> 0.7 over 6-24 h, 0.7 -> 0.3 over 24-72 h, then pipeline ROAS dominates
  (0.1 from a week on). ``direct`` mode (e-commerce) moves to ROAS within a day.

Allocation: budget shares follow each ad's probability of being the best ad of its account
(P(best), Monte Carlo over posterior draws tempered by ``posterior_temperature``), on top of
an exploration floor and the minimum budget, with a per-ad cap (water-filling), then rounded
to minor units so every account's budgets add up exactly. Safety rules (ignorance zone,
kill, scale, fatigue) use the untempered posterior and are described on
:class:`SamplerConfig`.

P(best) at scale: draws are taken only for each account's ``p_best_top_k`` most optimistic ads
(ranked by the ``ucb_z`` upper bound of the score, ties broken at random); the others cannot
realistically be the best and get ``p_best = 0`` (they still keep the exploration floor).
Draws come in chunks of at most ``max_draw_cells`` (draws x ads) so memory stays bounded for
100k ads. Beta and Gamma posteriors with large counts (both Beta parameters or the Gamma shape
>= ``normal_approx_min``) are drawn through their normal / Wilson-Hilferty approximations,
which are indistinguishable at those counts and ~4x cheaper than exact draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
from scipy import special

from optimizer_assets.domain import lag as lag_mod

__all__ = [
    "SamplerConfig",
    "allocate",
    "ad_performance",
    "ACTIONS",
    "OUTPUT_SCHEMA",
    "REQUIRED_COLUMNS",
]

REQUIRED_COLUMNS = ("ad_id", "created_at", "impressions", "clicks", "spend", "pipeline_value")
ACTIONS = ("scale", "hold", "reduce", "kill")
OUTPUT_SCHEMA = {
    "ad_id": pl.Utf8,
    "budget": pl.Float64,
    "score": pl.Float64,
    "p_best": pl.Float64,
    "action": pl.Utf8,
    "reason": pl.Utf8,
    "confidence": pl.Float64,
}

Blend = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SamplerConfig:
    """Every threshold of the allocator, with the seeded defaults (per account, see ``allocate``).

    Money amounts are in the account currency's major unit (dollars for USD).
    """

    mode: str = "pipeline"
    """``pipeline`` (service business: value arrives days later) or ``direct`` (e-commerce)."""
    # --- ignorance zone: no kill while an ad is younger than 2 days OR has spent < $100.
    ignorance_days: float = 2.0
    ignorance_spend: float = 100.0
    # --- kill: posterior P(ROAS < 0.5) >= 0.9, outside the ignorance zone, after $200 spend.
    kill_roas: float = 0.5
    kill_probability: float = 0.9
    kill_min_spend: float = 200.0
    # --- scale: P(ROAS > 3.0) >= 0.7 ("likely"); such an ad gets at least an even share weight.
    scale_roas: float = 3.0
    scale_probability: float = 0.7
    # --- fatigue: CTR down > 20% over 3 days (``ctr_3d_change <= -0.2``) or frequency > 3.5;
    # the ad's Thompson weight is multiplied by 0.5 and its budget never rises above current.
    fatigue_ctr_drop: float = 0.20
    fatigue_frequency: float = 3.5
    fatigue_budget_factor: float = 0.5
    # --- CTR weight of the blended score by ad age in hours, piecewise linear (hours, weight).
    pipeline_blend: Blend = ((0.0, 1.0), (6.0, 1.0), (24.0, 0.7), (72.0, 0.3), (168.0, 0.1))
    direct_blend: Blend = ((0.0, 1.0), (6.0, 1.0), (24.0, 0.3), (72.0, 0.1))
    # --- allocation
    exploration_floor: float = 0.02
    """Share of an even split that every live, non-killed ad keeps (so it keeps learning)."""
    min_budget: float = 1.0
    """The account's minimum budget per ad (Meta's minimum); a ``min_budget`` column wins."""
    max_share: float = 1.0
    """Cap on one ad's share of its account budget (relaxed only when too few ads to fill it).
    Off by default: the guarded change plan limits how fast budgets move."""
    change_band: float = 0.1
    """Budget moves within +-10% of the current budget are labelled ``hold``."""
    # --- priors
    ctr_prior_impressions: float = 1000.0
    default_ctr: float = 0.01
    """Prior CTR for an account without impressions (weight ``ctr_prior_impressions``)."""
    default_roas: float = 1.0
    """Prior ROAS for an account without matured spend (weight ``roas_prior_events``)."""
    roas_prior_events: float = 1.0
    """Weight of the ROAS prior in value events when it cannot be estimated from the account."""
    value_unit: float = 50.0
    """Typical value of one value event when no ``conversions`` column is given."""
    size_prior_events: float = 5.0
    """Weight (in events) of the account's mean value per event in an ad's value per event."""
    ctr_value_slope: float = 1.0
    """Prior slope of relative ROAS on relative CTR: 1 = an ad with +10% CTR is worth +10% ROAS."""
    ctr_value_slope_sd: float = 0.5
    """Prior sd of that slope; the account's own ads move it (empirical Bayes)."""
    empirical_bayes: bool = True
    """Estimate the CTR slope from the account's ads when there is enough matured value."""
    empirical_bayes_strength: bool = False
    """Also estimate the ROAS prior's weight from the spread of the ads' rates. Off by default:
    budgets follow the estimates, and that adaptive sampling shrinks the observed spread (on the
    bench the estimate ran into its cap of 10 pseudo-events where the true spread implies ~3),
    so the fixed ``roas_prior_events`` is safer."""
    eb_min_ads: int = 5
    """Empirical Bayes needs this many ads with matured spend in the account ..."""
    eb_min_events: float = 10.0
    """... and this many value events."""
    eb_max_prior_events: float = 10.0
    # --- P(best) Monte Carlo (global: taken from the default config)
    posterior_temperature: float = 0.6
    """Scale of the posterior spread used for P(best) only (safety rules use the plain
    posterior). Plain Thompson (1.0) over-explores with ~20 ads and a few weeks of noisy,
    delayed value: on the bench's tuning seeds 0.5-0.7 lowered median regret from 17.6% to
    14-16% (stationary) and from 27% to 21-22% (5-7 day delays)."""
    n_draws: int = 256
    """Posterior draws behind P(best)."""
    p_best_top_k: int = 16
    """Ads per account that take part in the P(best) draws (the most optimistic ones)."""
    ucb_z: float = 3.0
    """Optimism (in posterior sds) of the ranking that picks those ads."""
    max_draw_cells: int = 1_000_000
    """Draws x ads per chunk: bounds memory (8 MB per array) whatever the number of ads."""
    normal_approx_min: float = 50.0
    """Beta/Gamma parameters from which draws use the normal / Wilson-Hilferty forms."""
    minor_unit: float = 0.01
    """The currency's minor unit: budgets are rounded to it and sum exactly per account."""

    def __post_init__(self) -> None:
        if self.mode not in ("pipeline", "direct"):
            raise ValueError(f"mode must be 'pipeline' or 'direct', not {self.mode!r}")
        for name in (
            "ignorance_days",
            "ignorance_spend",
            "kill_roas",
            "kill_min_spend",
            "scale_roas",
            "fatigue_ctr_drop",
            "fatigue_frequency",
            "min_budget",
            "change_band",
            "ctr_prior_impressions",
            "value_unit",
            "eb_min_events",
            "eb_max_prior_events",
            "ctr_value_slope_sd",
        ):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {v!r}")
        for name in ("kill_probability", "scale_probability", "fatigue_budget_factor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 0.0 <= self.exploration_floor <= 1.0:
            raise ValueError("exploration_floor must be in [0, 1]")
        if not 0.0 < self.max_share <= 1.0:
            raise ValueError("max_share must be in (0, 1]")
        if not 0.0 < self.default_ctr < 1.0:
            raise ValueError("default_ctr must be in (0, 1)")
        positive = ("default_roas", "roas_prior_events", "value_unit", "size_prior_events")
        if any(not getattr(self, k) > 0 for k in positive):
            raise ValueError(f"{', '.join(positive)} must be > 0")
        if self.n_draws < 1 or self.p_best_top_k < 1 or self.max_draw_cells < 1:
            raise ValueError("n_draws, p_best_top_k and max_draw_cells must be >= 1")
        if not 0.0 < self.posterior_temperature <= 10.0:
            raise ValueError("posterior_temperature must be in (0, 10]")
        if not self.minor_unit > 0:
            raise ValueError("minor_unit must be > 0")
        for name in ("pipeline_blend", "direct_blend"):
            knots = getattr(self, name)
            hours = [h for h, _ in knots]
            if not knots or hours != sorted(hours) or any(not 0 <= w <= 1 for _, w in knots):
                raise ValueError(f"{name} needs (hours, weight) knots, hours ascending, w in [0,1]")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SamplerConfig:
        """Build from a settings-file mapping; unknown keys are an error, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown sampler settings: {sorted(unknown)}")
        clean = {
            k: tuple(tuple(x) for x in v) if k.endswith("_blend") else v for k, v in values.items()
        }
        return cls(**clean)


# Per-account numeric thresholds (broadcast to rows); the rest are global.
_ROW_FIELDS = (
    "ignorance_days",
    "ignorance_spend",
    "kill_roas",
    "kill_probability",
    "kill_min_spend",
    "scale_roas",
    "scale_probability",
    "fatigue_ctr_drop",
    "fatigue_frequency",
    "fatigue_budget_factor",
    "exploration_floor",
    "min_budget",
    "max_share",
    "change_band",
    "ctr_prior_impressions",
    "default_ctr",
    "default_roas",
    "roas_prior_events",
    "value_unit",
    "size_prior_events",
    "ctr_value_slope",
    "ctr_value_slope_sd",
    "empirical_bayes",
    "empirical_bayes_strength",
    "eb_min_ads",
    "eb_min_events",
    "eb_max_prior_events",
)


def _value_prior(
    codes: np.ndarray,
    n_groups: int,
    x: np.ndarray,
    m: np.ndarray,
    rel_ctr: np.ndarray,
    unit: np.ndarray,
    p: Callable[[str], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (prior weight a0 in value events, prior mean lambda0, CTR slope beta, account
    pooled lambda).

    ``x`` are value events (value / unit), ``m`` matured spend, ``rel_ctr`` = ctr / account
    ctr - 1. In lambda units (value events per unit of spend) the account's pooled rate is
    ``lam = (a + sum x) / (a * u / default_roas + sum m)``. The ad's prior mean is
    ``lam * (1 + beta * rel_ctr)`` (floored at 10% of ``lam``): CTR put on the value scale.

    Empirical Bayes (``empirical_bayes``), per account with >= ``eb_min_ads`` ads with matured
    spend and >= ``eb_min_events`` value events: beta is the precision-weighted regression of
    the ads' relative rates on their relative CTRs under a N(``ctr_value_slope``,
    ``ctr_value_slope_sd``) prior, and a0 = lam^2 / tau^2 with tau^2 the between-ad variance of
    the rates left after CTR, by the method of moments for Poisson counts (the
    DerSimonian-Laird / Clayton-Kaldor estimator), capped at ``eb_max_prior_events``. Without
    enough data: ``roas_prior_events`` and ``ctr_value_slope``.
    """
    a_def = p("roas_prior_events")
    beta0 = p("ctr_value_slope")
    sum_x = _group_sum(codes, x, n_groups)
    sum_m = _group_sum(codes, m, n_groups)
    a_def_g = _first(codes, n_groups, a_def)
    lam_def_g = _first(codes, n_groups, p("default_roas") / unit)
    lam_g = (a_def_g + sum_x) / (a_def_g / lam_def_g + sum_m)
    lam = lam_g[codes]
    has = m >= 0.01  # at least a cent of matured spend (denormal spends would overflow x / m)
    n_has = _group_sum(codes, has.astype(float), n_groups)
    eligible_g = (
        (_first(codes, n_groups, p("empirical_bayes")) > 0)
        & (n_has >= _first(codes, n_groups, p("eb_min_ads")))
        & (sum_x >= _first(codes, n_groups, p("eb_min_events")))
    )
    y = np.where(has, x / np.where(has, m, 1.0), 0.0)
    mh = np.where(has, m, 0.0)
    sum_m2 = _group_sum(codes, mh * mh, n_groups)
    denom = np.maximum(sum_m - sum_m2 / np.maximum(sum_m, 1e-300), 1e-300)

    def tau2(center: np.ndarray, dof: np.ndarray) -> np.ndarray:
        q = _group_sum(codes, np.where(has, mh * (y - center) ** 2, 0.0), n_groups)
        return np.maximum(q - dof * lam_g, 0.0) / denom

    t2 = tau2(lam, np.maximum(n_has - 1, 0))
    # CTR slope: precision-weighted regression of relative rates on relative CTR.
    wgt = np.where(has, lam**2 / (lam / np.where(has, m, 1.0) + t2[codes] + 1e-300), 0.0)
    y_rel = np.where(has, y / np.maximum(lam, 1e-300) - 1.0, 0.0)
    prec0 = 1.0 / np.maximum(p("ctr_value_slope_sd"), 1e-9) ** 2
    sxy = _group_sum(codes, wgt * rel_ctr * y_rel, n_groups)
    sxx = _group_sum(codes, wgt * rel_ctr * rel_ctr, n_groups)
    b0g = _first(codes, n_groups, beta0)
    p0g = _first(codes, n_groups, prec0)
    beta_g = np.where(eligible_g, (sxy + b0g * p0g) / (sxx + p0g), b0g)
    beta_g = np.clip(np.where(np.isfinite(beta_g), beta_g, b0g), -1.0, 2.0)
    beta = beta_g[codes]
    lam0 = lam * np.maximum(1.0 + beta * rel_ctr, 0.1)
    t2r = tau2(lam0, np.maximum(n_has - 2, 0))
    a_max = _first(codes, n_groups, p("eb_max_prior_events"))
    a_eb = np.where(t2r > 0, lam_g**2 / np.maximum(t2r, 1e-300), a_max)
    eb_strength = eligible_g & (_first(codes, n_groups, p("empirical_bayes_strength")) > 0)
    a_g = np.where(eb_strength & np.isfinite(a_eb), np.clip(a_eb, 0.5, a_max), a_def_g)
    return a_g[codes], lam0, beta, lam


def _first(codes: np.ndarray, n_groups: int, per_row: np.ndarray) -> np.ndarray:
    """Per-group value of a per-row array that is constant within each group."""
    out = np.zeros(n_groups)
    out[codes] = per_row
    return out


def _empty_output() -> pl.DataFrame:
    return pl.DataFrame(schema=OUTPUT_SCHEMA)


def _num(ads: pl.DataFrame, name: str, default: float = 0.0) -> np.ndarray:
    """A column as finite, non-negative float64 (missing column / null / NaN -> default)."""
    if name not in ads.columns:
        return np.full(ads.height, default)
    a = ads[name].cast(pl.Float64, strict=False).fill_null(default).to_numpy().astype(np.float64)
    a = np.where(np.isfinite(a), a, default)
    return np.maximum(a, 0.0)


def _opt(ads: pl.DataFrame, name: str) -> np.ndarray:
    """An optional float column with NaN where absent/null/non-finite."""
    if name not in ads.columns:
        return np.full(ads.height, np.nan)
    a = ads[name].cast(pl.Float64, strict=False).to_numpy().astype(np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def _age_hours(ads: pl.DataFrame, now: datetime) -> np.ndarray:
    """Hours since ``created_at`` (naive datetimes are UTC; null or future -> 0)."""
    col = ads["created_at"]
    if col.dtype == pl.Date:
        col = col.cast(pl.Datetime("us"))
    if isinstance(col.dtype, pl.Datetime) and col.dtype.time_zone is not None:
        col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    us = col.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64).to_numpy()
    now_utc = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
    now_us = (now_utc - datetime(1970, 1, 1)).total_seconds() * 1e6
    age = (now_us - us) / 3.6e9
    return np.where(np.isfinite(age), np.maximum(age, 0.0), 0.0)


def _group_sum(codes: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(codes, weights=values, minlength=n_groups)


def _segment_rank(codes: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank within group): groups ascending, ``key`` descending inside each group.

    Two plain argsorts instead of a multi-key lexsort (5-10x faster on 100k rows): rank the
    key globally, then sort the unique integer ``code * n + position``.
    """
    n = codes.size
    r = np.empty(n, dtype=np.int64)
    r[np.argsort(-key)] = np.arange(n)  # exact ties are rare (jittered) and harmless
    order = np.argsort(codes * n + r)
    counts = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[codes[order]]
    return order, rank


def _tiebreak(key: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``key`` with exact ties broken at random (a jitter far below any real difference)."""
    scale = np.maximum(np.abs(key), 1e-300)
    return key + scale * 1e-9 * rng.random(key.size)


def _account_budgets(
    ads: pl.DataFrame,
    total_budget: float | Mapping[str, float],
    names: list[str],
    codes: np.ndarray,
    current: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Budget of each account in minor units (int64), see ``allocate`` for the rules."""
    n_groups = len(names)

    def _check(v: float, what: str) -> float:
        v = float(v)
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{what} must be a finite amount >= 0, not {v!r}")
        return v

    if isinstance(total_budget, Mapping):
        missing = [a for a in names if a not in total_budget]
        if missing:
            raise ValueError(f"total_budget has no budget for accounts {missing[:5]}")
        per = np.array([_check(total_budget[a], f"budget of {a}") for a in names])
        return np.round(per * scale).astype(np.int64)
    total = _check(total_budget, "total_budget")
    if "account_budget" in ads.columns:
        ab = _opt(ads, "account_budget")
        if np.isnan(ab).any():
            raise ValueError("account_budget has nulls")
        lo = np.full(n_groups, np.inf)
        hi = np.full(n_groups, -np.inf)
        np.minimum.at(lo, codes, ab)
        np.maximum.at(hi, codes, ab)
        if np.any(hi - lo > 1e-9) or np.any(lo < 0):
            raise ValueError("account_budget must be one amount >= 0 per account")
        per = np.round(lo * scale).astype(np.int64)
        if abs(per.sum() - total * scale) > 1.0 + 1e-6:
            raise ValueError(
                f"total_budget {total} differs from the sum of account_budget {per.sum() / scale}"
            )
        return per
    total_units = int(round(total * scale))
    if n_groups == 1:
        return np.array([total_units], dtype=np.int64)
    cur = _group_sum(codes, np.nan_to_num(current), n_groups)
    weights = cur if cur.sum() > 0 else np.ones(n_groups)
    exact = weights / weights.sum() * total_units
    per = np.floor(exact).astype(np.int64)
    left = total_units - per.sum()
    per[np.argsort(-(exact - per), kind="stable")[:left]] += 1
    return per


def _resolve_configs(
    config: SamplerConfig | Mapping[str, SamplerConfig] | None, names: list[str]
) -> tuple[SamplerConfig, list[SamplerConfig], np.ndarray]:
    """(global config, distinct configs, config index per account)."""
    if config is None or isinstance(config, SamplerConfig):
        base = config or SamplerConfig()
        return base, [base], np.zeros(len(names), dtype=np.int64)
    base = config.get("*", SamplerConfig())
    distinct: list[SamplerConfig] = [base]
    idx = np.zeros(len(names), dtype=np.int64)
    for g, name in enumerate(names):  # loop over accounts (<= hundreds), not ads
        c = config.get(name, base)
        if c not in distinct:
            distinct.append(c)
        idx[g] = distinct.index(c)
    return base, distinct, idx


def _gamma_cdf(shape: np.ndarray, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """P(Gamma(shape, 1) <= x): Wilson-Hilferty everywhere, exact (scipy) near ``thresholds``.

    The approximation is within ~0.01 for shape >= 1, so decisions against a probability
    threshold are made on the exact value whenever the approximation lands within 0.05 of it
    (the exact incomplete gamma costs ~15x more per ad).
    """
    x = np.maximum(x, 0.0)
    c = 1.0 / (9.0 * shape)
    z = (np.cbrt(x / shape) - (1.0 - c)) / np.sqrt(c)
    p = special.ndtr(z)
    near = np.abs(p - thresholds) < 0.05
    if near.any():
        p[near] = special.gammainc(shape[near], x[near])
    return p


def _draw_beta(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, k: int, big: float):
    """(k, n) Beta draws; normal approximation where both parameters are large."""
    n = a.size
    out = np.empty((k, n))
    approx = (a >= big) & (b >= big)
    if approx.any():
        aa, bb = a[approx], b[approx]
        mean = aa / (aa + bb)
        sd = np.sqrt(aa * bb / ((aa + bb) ** 2 * (aa + bb + 1.0)))
        out[:, approx] = np.clip(mean + sd * rng.standard_normal((k, aa.size)), 0.0, 1.0)
    exact = ~approx
    if exact.any():
        # Beta = Ga / (Ga + Gb): each Gamma exact or Wilson-Hilferty by its own shape, so a
        # young ad (few clicks, many impressions) costs one exact Gamma instead of two.
        ga = _draw_gamma(rng, a[exact], k, big)
        gb = _draw_gamma(rng, b[exact], k, big)
        out[:, exact] = ga / np.maximum(ga + gb, 1e-300)
    return out


def _draw_gamma(rng: np.random.Generator, shape: np.ndarray, k: int, big: float):
    """(k, n) unit-rate Gamma draws; Wilson-Hilferty approximation for large shapes."""
    n = shape.size
    out = np.empty((k, n))
    approx = shape >= big
    if approx.any():
        s = shape[approx]
        c = 1.0 / (9.0 * s)
        z = rng.standard_normal((k, s.size))
        out[:, approx] = s * np.maximum(1.0 - c + z * np.sqrt(c), 0.0) ** 3
    if (~approx).any():
        out[:, ~approx] = rng.gamma(shape[~approx], 1.0, size=(k, int((~approx).sum())))
    return out


def _p_best(
    rng: np.random.Generator,
    codes: np.ndarray,
    n_groups: int,
    score_mean: np.ndarray,
    score_sd: np.ndarray,
    draw_args: dict[str, np.ndarray],
    base: SamplerConfig,
) -> np.ndarray:
    """P(ad has the highest blended score of its account), Monte Carlo on top-k candidates."""
    n = codes.size
    ucb = score_mean + base.ucb_z * base.posterior_temperature * score_sd
    order, rank = _segment_rank(codes, _tiebreak(ucb, rng))
    cand_sorted = order[rank[order] < base.p_best_top_k]  # grouped by account, contiguous
    c_codes = codes[cand_sorted]
    counts = np.bincount(c_codes, minlength=n_groups)
    present = counts > 0
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[present]
    seg_counts = counts[present]
    # Tempering: counts / t^2 keep each posterior's mean and scale its sd by t.
    t2 = base.posterior_temperature**2
    a_ctr = draw_args["a_ctr"][cand_sorted] / t2
    b_ctr = draw_args["b_ctr"][cand_sorted] / t2
    a_v = draw_args["a_v"][cand_sorted] / t2
    roas_scale = draw_args["roas_scale"][cand_sorted] * t2
    ctr_scale = draw_args["ctr_scale"][cand_sorted]
    ctr_offset = draw_args["ctr_offset"][cand_sorted]
    ctr_floor = draw_args["ctr_floor"][cand_sorted]
    w = draw_args["w"][cand_sorted]
    boost = draw_args["boost"][cand_sorted]
    m = cand_sorted.size
    wins = np.zeros(m)
    chunk = max(1, min(base.n_draws, base.max_draw_cells // max(m, 1)))
    done = 0
    while done < base.n_draws:  # loop over draw chunks, never over ads
        k = min(chunk, base.n_draws - done)
        ctr = _draw_beta(rng, a_ctr, b_ctr, k, base.normal_approx_min)
        roas = _draw_gamma(rng, a_v, k, base.normal_approx_min)
        ctr_value = np.maximum(ctr_offset + ctr_scale * ctr, ctr_floor)
        score = boost * (w * ctr_value + (1.0 - w) * roas_scale * roas)
        score = np.nan_to_num(score, nan=0.0, posinf=np.finfo(np.float64).max)
        seg_max = np.maximum.reduceat(score, starts, axis=1)
        best = score >= np.repeat(seg_max, seg_counts, axis=1)
        # Ties (identical draws) share the win.
        n_best = np.add.reduceat(best, starts, axis=1)
        wins += (best / np.repeat(np.maximum(n_best, 1), seg_counts, axis=1)).sum(axis=0)
        done += k
    p = np.zeros(n)
    p[cand_sorted] = wins / base.n_draws
    return p


def _water_fill(
    codes: np.ndarray,
    n_groups: int,
    remaining: np.ndarray,
    room: np.ndarray,
    weight: np.ndarray,
    funded: np.ndarray,
) -> np.ndarray:
    """Split each account's ``remaining`` in proportion to ``weight`` with per-ad ``room`` caps."""
    extra = np.zeros(codes.size)
    room = np.where(funded, room, 0.0)
    weight = np.where(funded, weight, 0.0)
    # Too little room in total: widen every funded ad's room evenly (the cap yields, not the sum).
    short = np.maximum(remaining - _group_sum(codes, room, n_groups), 0.0)
    n_funded = _group_sum(codes, funded.astype(float), n_groups)
    room = room + np.where(funded, short[codes] / np.maximum(n_funded[codes], 1.0), 0.0)
    sat = np.zeros(codes.size, dtype=bool)
    for _ in range(64):  # each pass saturates >= 1 ad per account that still overflows
        free = funded & ~sat
        fixed = _group_sum(codes, np.where(sat, room, 0.0), n_groups)
        wsum = _group_sum(codes, np.where(free, weight, 0.0), n_groups)
        lam = np.where(wsum > 0, (remaining - fixed) / np.where(wsum > 0, wsum, 1.0), 0.0)
        x = np.where(free, lam[codes] * weight, 0.0)
        over = free & (x > room)
        if not over.any():
            extra = np.where(sat, room, x)
            break
        sat |= over
    else:
        extra = np.where(sat, room, np.minimum(x, room))
    return extra


def _round_units(
    codes: np.ndarray, n_groups: int, budget: np.ndarray, target: np.ndarray, eligible: np.ndarray
) -> np.ndarray:
    """Round budgets (in minor units) so each account sums to ``target`` exactly.

    Cumulative rounding: within each account, round the running sum and take differences, so
    every ad moves by less than one unit and the account total is exact, without a sort by
    remainder. Ineligible ads stay at 0 (they come first, so no unit lands on them).
    """
    n = codes.size
    order = np.argsort(codes * 2 + eligible, kind="stable")  # radix sort on small ints
    b = np.where(eligible, budget, 0.0)[order]
    cs = np.cumsum(b)
    counts = np.bincount(codes, minlength=n_groups)
    ends = np.cumsum(counts)
    starts = ends - counts
    grp = codes[order]
    base = np.where(counts > 0, cs[np.maximum(starts, 1) - 1] * (starts > 0), 0.0)
    r = np.rint(cs - base[grp])
    has = counts > 0
    last = ends[has] - 1
    r[last] = np.where(eligible[order][last], target[has], r[last])  # exact account totals
    prev = np.concatenate(([0.0], r[:-1]))
    prev[starts[has]] = 0.0
    out = np.empty(n, dtype=np.int64)
    out[order] = (r - prev).astype(np.int64)
    return out


def _fmt_money(expr: pl.Expr) -> pl.Expr:
    """12.5 -> '12.50' (a Decimal cast: cheaper than arithmetic on cents)."""
    return expr.round(2).cast(pl.Decimal(38, 2)).cast(pl.Utf8)


def _fmt_int(expr: pl.Expr) -> pl.Expr:
    return expr.round(0).cast(pl.Int64).cast(pl.Utf8)


def _fmt2(expr: pl.Expr) -> pl.Expr:
    return expr.round(2).cast(pl.Utf8)


def _pct(expr: pl.Expr) -> pl.Expr:
    return (expr * 100).round(0).cast(pl.Int64).cast(pl.Utf8)


def _sentence(*parts: str | pl.Expr) -> pl.Expr:
    """One flat ``pl.format`` from literal text and expressions (no nested formats)."""
    text = "".join(
        x.replace("{", "{{").replace("}", "}}") if isinstance(x, str) else "{}" for x in parts
    )
    return pl.format(text, *[x for x in parts if not isinstance(x, str)])


def _reasons(f: pl.DataFrame) -> pl.Series:
    """One media-buyer sentence per ad, with the numbers behind the action.

    Each row is formatted by its own template only (filtering first is ~8x cheaper than a
    when/then chain, which would format every template for every row).
    """
    c = pl.col
    move = ["budget $", _fmt_money(c("base")), " -> $", _fmt_money(c("budget")), "."]
    roas_txt = ["ROAS ", _fmt2(c("roas")), " on $", _fmt_int(c("spend")), " spend"]
    ctr_txt = ["CTR ", _fmt2(c("ctr") * 100), "% vs account ", _fmt2(c("acc_ctr") * 100), "%"]
    age_txt = [
        pl.when(c("age_h") < 48)
        .then(pl.format("{} h", _fmt_int(c("age_h"))))
        .otherwise(pl.format("{} days", (c("age_h") / 24).round(1).cast(pl.Utf8)))
    ]
    fat_parts = pl.concat_str(
        [
            pl.when(c("fat_ctr")).then(
                pl.format("CTR down {}% over 3 days", _fmt_int(-c("ctr_change") * 100))
            ),
            pl.when(c("fat_freq")).then(
                pl.format("frequency {} above {}", _fmt2(c("freq")), _fmt2(c("freq_max")))
            ),
        ],
        separator=" and ",
        ignore_nulls=True,
    )
    p_best = _pct(c("p_best"))
    templates: dict[int, pl.Expr] = {
        0: _sentence(
            "Kill: ", *roas_txt, " (", _pct(c("maturity")), "% of its value due by now), ",
            _pct(c("p_low")), "% likely below the ", _fmt2(c("kill_roas")), " kill line.",
        ),
        1: _sentence("Reduce: ad fatigue, ", fat_parts, "; ", *move),
        2: _sentence(
            "Reduce: paused for budget, $", _fmt_money(c("acc_budget")),
            " cannot fund every ad at its $", _fmt_money(c("floor_min")),
            " minimum and this one ranks #", (c("rank") + 1).cast(pl.Utf8),
            " (P(best) ", p_best, "%).",
        ),
        3: _sentence(
            "Scale: ", *roas_txt, ", ", _pct(c("p_high")), "% likely above ",
            _fmt2(c("scale_roas")), " (P(best) ", p_best, "%); ", *move,
        ),
        4: _sentence(
            "Scale: ", p_best, "% chance of being the account's best; ", *roas_txt, ", ",
            *ctr_txt, "; ", *move,
        ),
        5: _sentence(
            "Reduce: ", p_best, "% chance of being the account's best; ", *roas_txt, ", ",
            *ctr_txt, "; ", *move,
        ),
        6: _sentence(
            "Hold: still learning (", *age_txt, " old, $", _fmt_int(c("spend")),
            " spent), judged ", _pct(c("w")), "% on ", *ctr_txt, "; ", *move,
        ),
        7: _sentence(
            "Hold: ", *roas_txt, " (P(best) ", p_best, "%), between the ",
            _fmt2(c("kill_roas")), " kill and ", _fmt2(c("scale_roas")), " scale lines; ",
            *move,
        ),
    }  # fmt: skip
    zone = _sentence(
        " ROAS looks low but it is inside the ignorance zone (", *age_txt, " old, $",
        _fmt_int(c("spend")), " spent): no kill before ", _fmt2(c("zone_days")),
        " days and $", _fmt_int(c("zone_spend")), ".",
    )  # fmt: skip
    boost = (
        pl.when(c("boost_reason").is_not_null() & (c("boost_reason") != ""))
        .then(pl.format(" Boost x{} from {}.", _fmt2(c("boost")), c("boost_reason")))
        .otherwise(pl.format(" Boost x{} applied.", _fmt2(c("boost"))))
    )
    # Sort once by template, then format contiguous (zero-copy) slices.
    f = f.with_row_index("_i").sort("template")
    counts = np.bincount(f["template"].to_numpy(), minlength=len(templates))
    offsets = np.concatenate(([0], np.cumsum(counts)))
    parts = []
    for t, expr in templates.items():  # 8 templates, each over its own rows
        sub = f.slice(int(offsets[t]), int(counts[t]))
        if sub.height:
            suffix = [
                pl.when(c("zone_saved")).then(zone) if sub["zone_saved"].any() else None,
                pl.when(c("boost") != 1.0).then(boost) if (sub["boost"] != 1.0).any() else None,
            ]
            cols = [expr, *[x for x in suffix if x is not None]]
            parts.append(sub.select("_i", pl.concat_str(cols, ignore_nulls=True).alias("reason")))
    return pl.concat(parts).sort("_i")["reason"]


def _allocate_numbers(
    ads: pl.DataFrame,
    total_budget: float | Mapping[str, float],
    now: datetime,
    rng: np.random.Generator,
    config: SamplerConfig | Mapping[str, SamplerConfig] | None,
) -> dict[str, Any] | None:
    """Everything ``allocate`` decides, as arrays (None for an empty frame); no text yet."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ads.columns]
    if missing:
        raise ValueError(f"ads lack required columns: {missing}")
    n = ads.height
    if n == 0:
        return None
    if ads["ad_id"].null_count() or ads["ad_id"].n_unique() != n:
        raise ValueError("ad_id must be non-null and unique")

    # --- accounts -> dense codes 0..G-1 (sorted by account id)
    if "account_id" in ads.columns:
        acct = ads["account_id"].cast(pl.Utf8).fill_null("")
        codes = (acct.rank("dense").to_numpy().astype(np.int64)) - 1
        n_groups = int(codes.max()) + 1
        _, first = np.unique(codes, return_index=True)
        names = acct.gather(first).to_list()
    else:
        codes = np.zeros(n, dtype=np.int64)
        n_groups = 1
        names = [""]
    base, configs, cfg_of_acct = _resolve_configs(config, names)
    cfg_row = cfg_of_acct[codes]

    def p(name: str) -> np.ndarray:
        """A threshold per row (a scalar when every account shares one config)."""
        if len(configs) == 1:
            return np.float64(getattr(configs[0], name))  # type: ignore[return-value]
        vals = np.array([getattr(c, name) for c in configs], dtype=np.float64)
        return vals[cfg_row]

    unit_scale = 1.0 / base.minor_unit

    # --- inputs
    imps = _num(ads, "impressions")
    clicks = np.minimum(_num(ads, "clicks"), imps)
    spend = _num(ads, "spend")
    value = _num(ads, "pipeline_value")
    has_matured = "matured_spend" in ads.columns
    matured = np.minimum(_num(ads, "matured_spend"), spend) if has_matured else spend
    age_h = _age_hours(ads, now)
    current = _opt(ads, "current_budget")
    current = np.where(current >= 0, current, np.nan)
    boost = _opt(ads, "boost")
    boost = np.where(boost > 0, boost, 1.0)
    min_budget = _opt(ads, "min_budget")
    min_budget = np.where(min_budget >= 0, min_budget, p("min_budget"))
    ctr_change = _opt(ads, "ctr_3d_change")
    freq = _opt(ads, "frequency")

    budget_units = _account_budgets(ads, total_budget, names, codes, current, unit_scale)
    acc_budget = budget_units / unit_scale

    # --- account-level pooled estimates (the default priors)
    g_imps = _group_sum(codes, imps, n_groups)
    g_clicks = _group_sum(codes, clicks, n_groups)
    g_value = _group_sum(codes, value, n_groups)
    s_ctr = p("ctr_prior_impressions")
    acc_ctr = (g_clicks[codes] + p("default_ctr") * s_ctr) / (g_imps[codes] + s_ctr)
    acc_ctr = np.clip(acc_ctr, 1e-6, 1 - 1e-6)
    # Value = events x size. With ``conversions`` the rate is learned from event counts and the
    # size per event from the ad's value shrunk to the account's mean size (compound Poisson);
    # without it value is read as events of the fixed size ``value_unit``.
    if "conversions" in ads.columns:
        conv = _num(ads, "conversions")
        conv = np.where((conv == 0) & (value > 0), value / p("value_unit"), conv)
        g_conv = _group_sum(codes, conv, n_groups)
        size_g = np.full(n_groups, np.nan)
        ok = (g_conv >= 1.0) & (g_value > 0)  # at least one event's worth before trusting it
        np.divide(g_value, g_conv, out=size_g, where=ok)
        size_g = np.where(np.isfinite(size_g) & (size_g > 0), size_g, np.nan)
        acc_size = np.where(np.isnan(size_g[codes]), p("value_unit"), size_g[codes])
        k_size = p("size_prior_events")
        unit = (value + k_size * acc_size) / (conv + k_size)
        x_events = conv
    else:
        unit = acc_size = p("value_unit")
        x_events = value / unit
    # A value event smaller than the currency's minor unit is noise, not a size.
    unit = np.maximum(np.broadcast_to(unit, (n,)).astype(np.float64), base.minor_unit)
    acc_size = np.maximum(acc_size, base.minor_unit)

    # --- CTR posterior
    pa, pb = _opt(ads, "prior_alpha"), _opt(ads, "prior_beta")
    ok_prior = (pa > 0) & (pb > 0)
    a_ctr = np.where(ok_prior, pa, acc_ctr * s_ctr) + clicks
    b_ctr = np.where(ok_prior, pb, (1 - acc_ctr) * s_ctr) + (imps - clicks)
    a_ctr = np.maximum(a_ctr, 1e-3)
    b_ctr = np.maximum(b_ctr, 1e-3)
    ab = a_ctr + b_ctr
    ctr_mean = a_ctr / ab
    ctr_var = a_ctr * b_ctr / (ab * ab * (ab + 1.0))

    # --- ROAS posterior (Gamma-Poisson on value events of size ``unit``)
    rel_ctr = ctr_mean / acc_ctr - 1.0
    with np.errstate(all="ignore"):  # degenerate accounts fall back to the defaults inside
        a0, lam0, beta, lam_acc = _value_prior(codes, n_groups, x_events, matured, rel_ctr, unit, p)
    acc_roas = acc_size * lam_acc  # the account's pooled (lag-corrected) ROAS
    prior_roas = _opt(ads, "prior_roas")
    r0 = np.where(prior_roas > 0, prior_roas, unit * lam0)
    r0 = np.maximum(r0, 1e-6)
    a_v = a0 + x_events
    b_v = a0 * unit / r0 + matured
    roas_mean = unit * a_v / b_v
    roas_var = roas_mean * roas_mean / a_v

    # --- blend by age
    mode = np.array([c.mode == "direct" for c in configs])[cfg_row]
    if "mode" in ads.columns:
        m_col = ads["mode"].cast(pl.Utf8)
        bad = m_col.drop_nulls().filter(~m_col.drop_nulls().is_in(["pipeline", "direct"]))
        if bad.len():
            raise ValueError(f"mode must be 'pipeline' or 'direct', not {bad[0]!r}")
        mode = np.where(m_col.is_null().to_numpy(), mode, (m_col == "direct").to_numpy())
    w = np.empty(n)
    for k, c in enumerate(configs):  # loop over distinct configs x modes, not ads
        for is_direct, knots in ((False, c.pipeline_blend), (True, c.direct_blend)):
            sel = (cfg_row == k) & (mode == is_direct)
            if sel.any():
                hours, weights = zip(*knots, strict=True)
                w[sel] = np.interp(age_h[sel], hours, weights)
    # CTR on the value scale: acc_roas * (1 + beta * (ctr / acc_ctr - 1)) = offset + scale * ctr
    ctr_scale = acc_roas * beta / acc_ctr
    ctr_offset = acc_roas * (1.0 - beta)
    ctr_value = np.maximum(ctr_offset + ctr_scale * ctr_mean, 0.1 * acc_roas)
    score_mean = boost * (w * ctr_value + (1 - w) * roas_mean)
    score_var = boost**2 * (w**2 * ctr_scale**2 * ctr_var + (1 - w) ** 2 * roas_var)
    score_sd = np.sqrt(score_var)

    # --- safety rules
    in_zone = (age_h < p("ignorance_days") * 24.0) | (spend < p("ignorance_spend"))
    p_low = _gamma_cdf(a_v, b_v * p("kill_roas") / unit, p("kill_probability"))
    p_high = 1.0 - _gamma_cdf(a_v, b_v * p("scale_roas") / unit, 1.0 - p("scale_probability"))
    looks_dead = p_low >= p("kill_probability")
    kill = ~in_zone & (spend >= p("kill_min_spend")) & looks_dead
    zone_saved = in_zone & looks_dead & (spend > 0)
    fat_ctr = ctr_change <= -p("fatigue_ctr_drop")
    fat_freq = freq > p("fatigue_frequency")
    fatigue = (fat_ctr | fat_freq) & ~kill
    scale_rule = (p_high >= p("scale_probability")) & ~kill & ~fatigue

    # --- P(best) and Thompson weights
    draw_args = {
        "a_ctr": a_ctr,
        "b_ctr": b_ctr,
        "a_v": a_v,
        "roas_scale": unit / b_v,
        "ctr_scale": ctr_scale,
        "ctr_offset": ctr_offset,
        "ctr_floor": 0.1 * acc_roas,
        "w": w,
        "boost": boost,
    }
    p_best = _p_best(rng, codes, n_groups, score_mean, score_sd, draw_args, base)
    alive = ~kill
    n_alive = _group_sum(codes, alive.astype(float), n_groups)
    even = np.where(n_alive > 0, acc_budget / np.maximum(n_alive, 1), 0.0)[codes]
    baseline = np.where(np.isnan(current), even, current)
    weight = p_best * np.where(fatigue, p("fatigue_budget_factor"), 1.0)
    weight = np.where(scale_rule, np.maximum(weight, 1.0 / np.maximum(n_alive[codes], 1)), weight)
    weight = np.where(alive, weight + 1e-12, 0.0)

    # --- which ads the account can fund at their floors (ranked by P(best), then score)
    explore = p("exploration_floor") * even
    floor = np.maximum(min_budget, explore)
    rank = np.zeros(n, dtype=np.int64)
    short = _group_sum(codes, np.where(alive, floor, 0.0), n_groups) > acc_budget + 1e-9
    if short.any():
        # Priority: alive first, then P(best), then score (ties at random); one float key.
        score_rank = np.empty(n)
        score_rank[np.argsort(_tiebreak(score_mean, rng))] = np.arange(n) / (n + 1.0)
        priority = np.where(alive, p_best * 1e9 + score_rank, score_rank - 2.0)
        order, rank = _segment_rank(codes, priority)
        floor_sorted = np.where(alive, floor, 0.0)[order]
        cum = np.cumsum(floor_sorted)
        counts = np.bincount(codes, minlength=n_groups)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        start_cum = np.where(counts > 0, cum[starts] - floor_sorted[starts], 0.0)
        cum_in_group = np.empty(n)
        cum_in_group[order] = cum - start_cum[codes[order]]
        fits = (cum_in_group <= acc_budget[codes] + 1e-9) | (rank == 0)
        funded = alive & (fits | ~short[codes])
    else:
        funded = alive
    floor = np.where(funded, np.minimum(floor, acc_budget[codes]), 0.0)
    remaining = np.maximum(acc_budget - _group_sum(codes, floor, n_groups), 0.0)
    cap = p("max_share") * acc_budget[codes]
    cap = np.where(fatigue, np.minimum(cap, np.maximum(baseline, floor)), cap)
    room = np.maximum(cap - floor, 0.0)
    extra = _water_fill(codes, n_groups, remaining, room, weight, funded)
    units = _round_units(codes, n_groups, (floor + extra) * unit_scale, budget_units, funded)
    budget = units / unit_scale

    # --- actions
    change = np.where(baseline > 0, budget / np.where(baseline > 0, baseline, 1.0) - 1.0, np.inf)
    change = np.where((baseline <= 0) & (budget <= 0), 0.0, change)
    band = p("change_band")
    unfunded = alive & ~funded
    up = change >= band
    down = change <= -band
    action = np.full(n, 1, dtype=np.int8)  # index into ACTIONS
    action[down] = 2
    action[up | (scale_rule & ~down)] = 0
    action[fatigue | unfunded] = 2
    action[kill] = 3

    # Reason template: 0 kill, 1 fatigue, 2 unfunded, 3 scale on ROAS, 4 scale on P(best),
    # 5 reduce on P(best), 6 hold while learning, 7 hold.
    learning = (w >= 0.5) | in_zone
    template = np.full(n, 7)
    template[learning] = 6
    template[down] = 5
    template[up] = 4
    template[scale_rule & ~down] = 3
    template[unfunded] = 2
    template[fatigue] = 1
    template[kill] = 0

    # --- confidence: the posterior probability of the claim behind the action
    acc_score = _group_sum(codes, np.where(alive, score_mean, 0.0), n_groups) / np.maximum(
        n_alive, 1
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (score_mean - acc_score[codes]) / np.where(score_sd > 0, score_sd, np.inf)
    p_above = special.ndtr(np.nan_to_num(z))
    fat_strength = np.fmax(
        np.nan_to_num(-ctr_change / np.maximum(p("fatigue_ctr_drop"), 1e-9)),
        np.nan_to_num(freq / np.maximum(p("fatigue_frequency"), 1e-9)),
    )
    conf = np.clip(1.0 - p_low - p_high, 0.0, 1.0)  # hold: between the kill and scale lines
    conf = np.where(template == 6, 1.0 - p_above * (1 - p_above) * 2, conf)
    conf = np.where(template == 5, 1.0 - p_above, conf)
    conf = np.where(template == 4, p_above, conf)
    conf = np.where(template == 3, p_high, conf)
    conf = np.where(template == 2, 1.0 - p_above, conf)
    conf = np.where(template == 1, np.clip(fat_strength - 0.5, 0.0, 1.0), conf)
    conf = np.where(template == 0, p_low, conf)
    conf = np.clip(np.nan_to_num(conf, nan=0.0), 0.0, 1.0)

    boost_reason = (
        ads["boost_reason"].cast(pl.Utf8)
        if "boost_reason" in ads.columns
        else pl.Series(values=[None] * n, dtype=pl.Utf8)
    )
    explain = {
        "template": template,
        "budget": budget,
        "base": baseline,
        "score": score_mean,
        "acc_score": acc_score[codes],
        "roas": roas_mean,
        "spend": spend,
        "maturity": np.where(spend > 0, matured / np.where(spend > 0, spend, 1.0), 1.0),
        "p_low": p_low,
        "p_high": p_high,
        "p_best": p_best,
        "kill_roas": p("kill_roas"),
        "scale_roas": p("scale_roas"),
        "ctr": ctr_mean,
        "acc_ctr": acc_ctr,
        "ctr_change": np.nan_to_num(ctr_change),
        "freq": np.nan_to_num(freq),
        "freq_max": p("fatigue_frequency"),
        "fat_ctr": np.nan_to_num(fat_ctr).astype(bool),
        "fat_freq": np.nan_to_num(fat_freq).astype(bool),
        "age_h": age_h,
        "w": w,
        "acc_budget": acc_budget[codes],
        "floor_min": min_budget,
        "rank": rank,
        "zone_saved": zone_saved & ~kill,
        "zone_days": p("ignorance_days"),
        "zone_spend": p("ignorance_spend"),
        "boost": boost,
        "boost_reason": boost_reason,
    }
    explain = {  # text inputs: finite numbers only
        k: np.nan_to_num(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
        for k, v in explain.items()
    }
    return {
        "budget": budget,
        "score": score_mean,
        "p_best": p_best,
        "action": action,
        "confidence": conf,
        "explain": explain,
    }


def allocate(
    ads: pl.DataFrame,
    total_budget: float | Mapping[str, float],
    *,
    now: datetime,
    rng: np.random.Generator,
    config: SamplerConfig | Mapping[str, SamplerConfig] | None = None,
) -> pl.DataFrame:
    """Split ``total_budget`` over live ads by Thompson sampling, with safety rules and reasons.

    Input columns (one row per live ad; ``ad_id`` unique):

    - required: ``ad_id`` (str), ``created_at`` (UTC datetime), ``impressions``, ``clicks``,
      ``spend`` (currency units), ``pipeline_value`` (attributed value arrived to date).
    - optional: ``account_id``, ``adset_id``; ``current_budget`` (today's budget of the ad;
      the baseline for scale/hold/reduce, default an even split); ``prior_alpha`` /
      ``prior_beta`` (CTR Beta prior); ``prior_roas`` (ROAS prior mean, e.g. from similar
      winners); ``boost`` (score multiplier, default 1) and ``boost_reason`` (text the reason
      names, e.g. the cross-account pattern); ``min_budget`` (the account's minimum per ad);
      ``matured_spend`` (spend whose value should have arrived by now, from
      ``lag.matured_spend``; without it the allocator does no lag correction);
      ``conversions`` (value events behind ``pipeline_value``; sets the value unit);
      fatigue history ``ctr_3d_change`` (relative CTR change of the last 3 days vs the 3
      before, -0.25 = down 25%) and ``frequency`` (impressions per person reached);
      ``mode`` (``pipeline``/``direct``, overrides the config's); ``account_budget``.
      Nulls, NaNs and negative numbers count as 0 / absent; clicks are capped at impressions.

    Budgets: ``total_budget`` is a float (one pool) or a mapping account_id -> budget. With
    several accounts, each account is allocated on its own: from the mapping, else from the
    ``account_budget`` column (one amount per account; ``total_budget`` must equal its sum),
    else the float is split across accounts in proportion to their summed ``current_budget``
    (evenly without it). Every account's budgets are rounded to ``minor_unit`` and sum to its
    budget exactly, except when every ad of the account is killed (then they are all 0).

    ``config`` is one :class:`SamplerConfig` or a mapping account_id -> config (key ``"*"`` is
    the default; the Monte Carlo settings always come from the default).

    Output (same order as the input): ``ad_id``, ``budget``, ``score`` (posterior mean of the
    blended score, in value per unit of spend), ``p_best``, ``action`` (scale/hold/reduce/kill),
    ``reason``, ``confidence`` (0-1: the posterior probability of the claim the action rests
    on: P(ROAS < kill line) for a kill, P(ROAS > scale line) for a scale on ROAS, P(score above
    / below the account's average) for a move on P(best), P(between the lines) for a hold,
    and how far past its threshold a fatigue signal is for a fatigue reduce).
    """
    res = _allocate_numbers(ads, total_budget, now, rng, config)
    if res is None:
        return _empty_output()
    reason = _reasons(pl.DataFrame(res["explain"]))
    return pl.DataFrame(
        {
            "ad_id": ads["ad_id"].cast(pl.Utf8),
            "budget": res["budget"],
            "score": res["score"],
            "p_best": res["p_best"],
            "action": pl.Series(res["action"]).replace_strict(
                dict(enumerate(ACTIONS)), return_dtype=pl.Utf8
            ),
            "reason": reason,
            "confidence": res["confidence"],
        },
        schema=OUTPUT_SCHEMA,
    )


def ad_performance(
    ads: pl.DataFrame,
    insights: pl.DataFrame,
    value_events: pl.DataFrame,
    *,
    now: datetime,
    lag_cdf: pl.DataFrame | None = None,
    fatigue_days: int = 3,
    min_fatigue_clicks: int = 100,
    minor_per_unit: float = 100.0,
) -> pl.DataFrame:
    """The allocator's input: one row per live ad, from warehouse-shaped frames.

    - ``ads`` (``meta_ads``): ``ad_id``, ``adset_id``, ``account_id``, ``created_at``, optional
      ``daily_budget`` (ad set budget, Int64 minor units), ``ad_status``/``adset_status`` (only
      ``ACTIVE`` rows are kept when present).
    - ``insights`` (``meta_ad_insights``): ``date``, ``ad_id``, ``spend``, ``impressions``,
      ``clicks``, optional ``reach``. Rows dated after ``now`` are ignored.
    - ``value_events``: ``ad_id``, ``occurred_at``, ``value`` (attributed value, e.g. credit x
      stage value delta). Events after ``now`` are ignored.
    - ``lag_cdf``: from ``lag.estimate_lag_cdf`` (optionally keyed by ``account_id``); without
      it ``matured_spend`` equals spend (no lag correction).

    Returns ``ad_id``, ``account_id``, ``adset_id``, ``created_at``, ``age_hours``,
    ``impressions``, ``clicks``, ``spend``, ``pipeline_value``, ``conversions`` (events with
    positive value), ``matured_spend``, ``lag_corrected_value``, ``ctr_3d_change`` (CTR of the
    last ``fatigue_days`` complete days vs the ``fatigue_days`` before; null with fewer than
    ``min_fatigue_clicks`` clicks in either window, where noise alone would move it ~15%),
    ``frequency`` (impressions / summed daily reach over the last
    ``fatigue_days`` days: a lower bound of the true frequency, so fatigue is flagged
    conservatively) and ``current_budget`` (the ad set budget split over its live ads by their
    spend over the last ``fatigue_days`` days, evenly without spend).
    """
    live = ads
    for col in ("ad_status", "adset_status"):
        if col in live.columns:
            live = live.filter(pl.col(col) == "ACTIVE")
    live = live.select(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("account_id").cast(pl.Utf8),
        pl.col("adset_id").cast(pl.Utf8),
        pl.col("created_at"),
        *([pl.col("daily_budget")] if "daily_budget" in live.columns else []),
    )
    today = lag_mod._day_number(now)
    ins = insights.with_columns(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("date").cast(pl.Date).cast(pl.Int32).alias("_d"),
        *[pl.col(c).cast(pl.Float64).fill_null(0.0) for c in ("spend", "impressions", "clicks")],
        (
            pl.col("reach").cast(pl.Float64).fill_null(0.0)
            if "reach" in insights.columns
            else pl.lit(0.0)
        ).alias("reach"),
    ).filter(pl.col("_d") <= today)
    fd = fatigue_days
    recent = (pl.col("_d") >= today - fd) & (pl.col("_d") < today)
    before = (pl.col("_d") >= today - 2 * fd) & (pl.col("_d") < today - fd)
    totals = ins.group_by("ad_id").agg(
        pl.col("impressions").sum(),
        pl.col("clicks").sum(),
        pl.col("spend").sum(),
        pl.col("impressions").filter(recent).sum().alias("_i1"),
        pl.col("clicks").filter(recent).sum().alias("_c1"),
        pl.col("impressions").filter(before).sum().alias("_i0"),
        pl.col("clicks").filter(before).sum().alias("_c0"),
        pl.col("reach").filter(recent).sum().alias("_r1"),
        pl.col("spend").filter(recent).sum().alias("_s1"),
    )
    ev = value_events.select(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("occurred_at"),
        pl.col("value").cast(pl.Float64).fill_null(0.0),
    )
    ev = ev.filter(pl.col("occurred_at").cast(pl.Date).cast(pl.Int32) <= today)
    vals = ev.group_by("ad_id").agg(
        pl.col("value").sum().clip(0.0, None).alias("pipeline_value"),
        (pl.col("value") > 0).sum().cast(pl.Float64).alias("conversions"),
    )
    df = (
        live.join(totals, on="ad_id", how="left")
        .join(vals, on="ad_id", how="left")
        .with_columns(
            pl.col(c).fill_null(0.0)
            for c in ("impressions", "clicks", "spend", "pipeline_value", "conversions")
        )
        .with_columns(pl.col(c).fill_null(0.0) for c in ("_i1", "_c1", "_i0", "_c0", "_r1", "_s1"))
    )
    if lag_cdf is not None:
        keys = lag_mod._key_columns(lag_cdf)
        sbd = ins.select("ad_id", "date", "spend")
        if keys:
            sbd = sbd.join(live.select("ad_id", *keys), on="ad_id", how="inner")
        corr = lag_mod.lag_corrected_value(
            df.select("ad_id", "pipeline_value"), sbd, lag_cdf, now
        ).select("ad_id", "matured_spend", "lag_corrected_value")
        df = df.join(corr, on="ad_id", how="left")
    else:
        df = df.with_columns(
            pl.col("spend").alias("matured_spend"),
            pl.col("pipeline_value").alias("lag_corrected_value"),
        )
    ctr1 = pl.col("_c1") / pl.col("_i1")
    ctr0 = pl.col("_c0") / pl.col("_i0")
    # ~100 clicks per window keep the noise of a CTR ratio near 14%, under the 20% threshold.
    enough = (pl.col("_c1") >= min_fatigue_clicks) & (pl.col("_c0") >= min_fatigue_clicks)
    if "daily_budget" in df.columns:
        adset_spend = pl.col("_s1").sum().over("adset_id")
        n_in_set = pl.len().over("adset_id")
        share = pl.when(adset_spend > 0).then(pl.col("_s1") / adset_spend).otherwise(1.0 / n_in_set)
        current = (pl.col("daily_budget").cast(pl.Float64) / minor_per_unit * share).alias(
            "current_budget"
        )
    else:
        current = pl.lit(None, dtype=pl.Float64).alias("current_budget")
    now_expr = pl.lit(now)
    created = pl.col("created_at")
    return df.select(
        "ad_id",
        "account_id",
        "adset_id",
        "created_at",
        ((now_expr - created).dt.total_seconds() / 3600.0).clip(0.0, None).alias("age_hours"),
        pl.col("impressions").cast(pl.Int64),
        pl.col("clicks").cast(pl.Int64),
        "spend",
        "pipeline_value",
        "conversions",
        "matured_spend",
        "lag_corrected_value",
        pl.when(enough).then(ctr1 / ctr0 - 1.0).alias("ctr_3d_change"),
        pl.when(pl.col("_r1") > 0).then(pl.col("_i1") / pl.col("_r1")).alias("frequency"),
        current,
    )
