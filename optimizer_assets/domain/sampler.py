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

import functools
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
    "evidence_weights",
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
    posterior_temperature: float = 0.5
    """Scale of the posterior spread used for P(best) only (safety rules use the plain
    posterior). Plain Thompson (1.0) over-explores with ~20 ads and a few weeks of noisy,
    delayed value: on the bench's tuning seeds 0.5-0.7 lowered median regret from 17.6% to
    14-16% (stationary) and from 27% to 21-22% (5-7 day delays). With the inputs weighted by
    ``evidence_weights`` (forgetting before a change), tuning seeds 0-47 gave median (mean)
    regret stationary / delayed / drift / fatigue of 12.2 (15.5) / 22.6 / 33.6 / 14.8 at 0.4,
    12.4 (15.3) / 21.7 / 36.3 / 13.2 at 0.5 and 12.2 (14.4) / 22.0 / 37.1 / 15.5 at 0.6: 0.5
    ties 0.4 on the sum and has lighter bad tails (stationary 75th percentile 15.3 vs 19.4)."""
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
    eb_strength = eligible_g & (_first(codes, n_groups, p("empirical_bayes_strength")) > 0)
    if not eb_strength.any():  # the default: the prior weight stays ``roas_prior_events``
        return a_def_g[codes], lam0, beta, lam
    t2r = tau2(lam0, np.maximum(n_has - 2, 0))
    a_max = _first(codes, n_groups, p("eb_max_prior_events"))
    a_eb = np.where(t2r > 0, lam_g**2 / np.maximum(t2r, 1e-300), a_max)
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
    a = np.asarray(ads[name].cast(pl.Float64, strict=False).fill_null(default).to_numpy())
    if not np.isfinite(a).all():
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
    if isinstance(col.dtype, pl.Datetime) and col.dtype.time_unit == "us":
        # microseconds since the epoch (UTC for zoned and naive columns alike)
        us = col.to_physical().cast(pl.Float64).to_numpy()
    else:
        if isinstance(col.dtype, pl.Datetime) and col.dtype.time_zone is not None:
            col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        us = col.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64).to_numpy()
    now_utc = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
    now_us = (now_utc - datetime(1970, 1, 1)).total_seconds() * 1e6
    age = (now_us - us) / 3.6e9
    return np.where(np.isfinite(age), np.maximum(age, 0.0), 0.0)


_SEGMENTS: tuple[np.ndarray, np.ndarray | None] | None = None
"""(codes, segment starts or None) of the last ``codes`` seen: ``allocate`` sums over the same
codes ~20 times per call, and rows sorted by account (the usual input) allow a segmented sum."""


def _segment_starts(codes: np.ndarray, n_groups: int) -> np.ndarray | None:
    """Start row of each group when ``codes`` is sorted and has every group 0..n-1, else None."""
    global _SEGMENTS
    cached = _SEGMENTS
    if cached is not None and cached[0] is codes:
        return cached[1]
    starts = None
    if codes.size and codes[0] == 0 and codes[-1] == n_groups - 1:
        step = np.diff(codes)
        if ((step == 0) | (step == 1)).all():
            starts = np.concatenate(([0], np.flatnonzero(step) + 1))
    _SEGMENTS = (codes, starts)
    return starts


def _group_sum(codes: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    starts = _segment_starts(codes, n_groups)
    if starts is not None:  # contiguous groups: a segmented sum, ~20x cheaper than bincount
        return np.add.reduceat(np.asarray(values, dtype=np.float64), starts)
    return np.bincount(codes, weights=values, minlength=n_groups)


def _segment_rank(codes: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank within group): groups ascending, ``key`` descending inside each group.

    One float argsort of the key, then a stable sort by group code, which numpy does as a
    radix sort when the codes fit in 16 bits (~50x cheaper than a second comparison sort).
    """
    n = codes.size
    by_key = np.argsort(-key)  # exact ties are rare (jittered) and harmless
    small = codes.max(initial=0) < np.iinfo(np.int16).max
    grp = codes[by_key].astype(np.int16 if small else np.int64)
    order = by_key[np.argsort(grp, kind="stable")]
    counts = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[codes[order]]
    return order, rank


def _top_k_per_group(codes: np.ndarray, n_groups: int, key: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` largest ``key`` values of each group, grouped by group ascending
    (order inside a group unspecified).

    Groups go into a padded (groups, largest group) matrix (a radix sort by code) and each
    row is partitioned (``argpartition``, linear time) instead of sorting all rows; when the
    groups are too uneven for padding (> 4x the rows) it falls back to ``_segment_rank``.
    """
    n = codes.size
    counts = np.bincount(codes, minlength=n_groups)
    width = int(counts.max(initial=0))
    if n == 0 or n_groups * width > 4 * n or n_groups >= np.iinfo(np.int16).max:
        order, rank = _segment_rank(codes, key)
        return order[rank[order] < k]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    if n_groups * width == n and _segment_starts(codes, n_groups) is not None:
        by_group = None  # sorted groups of one size: the rows already are the matrix
        mat = -np.nan_to_num(key, nan=-np.inf).reshape(n_groups, width)
    else:
        by_group = np.argsort(codes.astype(np.int16), kind="stable")  # radix sort
        g = codes[by_group]
        mat = np.full((n_groups, width), np.inf)
        mat[g, np.arange(n) - starts[g]] = -np.nan_to_num(key[by_group], nan=-np.inf)
    kk = min(k, width)
    top = (
        np.argpartition(mat, kk - 1, axis=1)[:, :kk]
        if kk < width
        else np.indices((n_groups, width))[1]
    )
    valid = top < counts[:, None]
    rows = (starts[:, None] + top)[valid]
    return rows if by_group is None else by_group[rows]


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


def _wilson_hilferty(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 - c, sqrt(c)) with c = 1 / (9 shape): the per-shape terms of ``_gamma_cdf``."""
    c = 1.0 / (9.0 * shape)
    return 1.0 - c, np.sqrt(c)


def _gamma_cdf(
    shape: np.ndarray,
    x: np.ndarray,
    thresholds: np.ndarray,
    wh: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """P(Gamma(shape, 1) <= x): Wilson-Hilferty everywhere, exact (scipy) near ``thresholds``.

    The approximation is within ~0.01 for shape >= 1, so decisions against a probability
    threshold are made on the exact value whenever the approximation lands within 0.05 of it
    (the exact incomplete gamma costs ~15x more per ad). ``wh``: ``_wilson_hilferty(shape)``
    when the caller evaluates several ``x`` for one ``shape``.
    """
    one_minus_c, sqrt_c = _wilson_hilferty(shape) if wh is None else wh
    x = np.maximum(x, 0.0)
    z = x / shape  # z = (cbrt(x / shape) - (1 - c)) / sqrt(c), in place
    np.cbrt(z, out=z)
    z -= one_minus_c
    z /= sqrt_c
    p = special.ndtr(z, out=z)
    near = np.abs(p - thresholds) < 0.05
    if near.any():
        p[near] = special.gammainc(shape[near], x[near])
    return p


def _draw_beta(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, k: int, big: float):
    """(k, n) Beta draws; normal approximation where both parameters are large."""
    n = a.size
    if n == 0:
        return np.empty((k, 0))
    approx = (a >= big) & (b >= big)
    n_approx = int(approx.sum())
    out = np.empty((k, n)) if n_approx < n else None
    if n_approx:
        aa, bb = (a, b) if out is None else (a[approx], b[approx])
        ab = aa + bb
        mean = aa / ab
        sd = np.sqrt(mean * (bb / ab) / (ab + 1.0))
        z = rng.standard_normal((k, n_approx))
        z *= sd
        z += mean
        np.clip(z, 0.0, 1.0, out=z)
        if out is None:
            return z
        out[:, np.flatnonzero(approx)] = z  # integer columns: ~2x faster than a mask
    exact = ~approx
    # Beta = Ga / (Ga + Gb): each Gamma exact or Wilson-Hilferty by its own shape, so a
    # young ad (few clicks, many impressions) costs one exact Gamma instead of two.
    ga = _draw_gamma(rng, a[exact], k, big)
    gb = _draw_gamma(rng, b[exact], k, big)
    out[:, exact] = ga / np.maximum(ga + gb, 1e-300)
    return out


def _draw_gamma(rng: np.random.Generator, shape: np.ndarray, k: int, big: float):
    """(k, n) unit-rate Gamma draws; Wilson-Hilferty approximation for large shapes."""
    n = shape.size
    if n == 0:
        return np.empty((k, 0))
    approx = shape >= big
    n_approx = int(approx.sum())
    out = np.empty((k, n)) if n_approx < n else None
    if n_approx:
        s = shape if out is None else shape[approx]
        c = 1.0 / (9.0 * s)
        t = rng.standard_normal((k, n_approx))
        t *= np.sqrt(c)
        t += 1.0 - c
        np.maximum(t, 0.0, out=t)
        t *= t * t  # cube
        t *= s
        if out is None:
            return t
        out[:, np.flatnonzero(approx)] = t  # integer columns: ~2x faster than a mask
    out[:, ~approx] = rng.gamma(shape[~approx], 1.0, size=(k, n - n_approx))
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
    cand_sorted = _top_k_per_group(codes, n_groups, _tiebreak(ucb, rng), base.p_best_top_k)
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
    cw = boost * w  # weights of the CTR value and the ROAS draws in the blended score
    rw = boost * (1.0 - w) * roas_scale
    m = cand_sorted.size
    # Padded layout: account j's candidates sit in slots j * width .. j * width + count - 1 of
    # a (draws, groups, width) array, empty slots at -inf, so the best of each account is a
    # reduction over the last axis (no ragged reduceat).
    width = int(seg_counts.max())
    n_seg = seg_counts.size
    slot = (
        np.arange(m)
        - np.repeat(starts, seg_counts)
        + np.repeat(np.arange(n_seg) * width, seg_counts)
    )
    wins = np.zeros(n_seg * width)
    chunk = max(1, min(base.n_draws, base.max_draw_cells // max(n_seg * width, 1)))
    done = 0
    while done < base.n_draws:  # loop over draw chunks, never over ads
        k = min(chunk, base.n_draws - done)
        ctr = _draw_beta(rng, a_ctr, b_ctr, k, base.normal_approx_min)
        roas = _draw_gamma(rng, a_v, k, base.normal_approx_min)
        ctr *= ctr_scale  # in place: score = cw * max(offset + scale * ctr, floor) + rw * roas
        ctr += ctr_offset
        np.maximum(ctr, ctr_floor, out=ctr)
        ctr *= cw
        roas *= rw
        score = ctr
        score += roas
        if not np.isfinite(score).all():
            score = np.nan_to_num(score, nan=0.0, posinf=np.finfo(np.float64).max)
        # (draws, width, groups): the maximum runs over contiguous rows of accounts (~2.5x
        # faster than reducing the short last axis of (draws, groups, width)).
        if m == n_seg * width:
            padded = roas.reshape(k, width, n_seg)  # reuse the ROAS draws' memory
            np.copyto(padded, score.reshape(k, n_seg, width).transpose(0, 2, 1))
        else:
            padded = np.full((k, n_seg * width), -np.inf)
            padded[:, slot] = score
            padded = np.ascontiguousarray(padded.reshape(k, n_seg, width).transpose(0, 2, 1))
        best = padded >= padded.max(axis=1, keepdims=True)
        # Ties (identical draws) share the win.
        n_best = best.sum(axis=1, keepdims=True)
        if n_best.max() == 1:  # no ties: the win counts themselves (same sums, no division)
            wins += best.sum(axis=0).T.ravel()
        else:
            wins += (best / n_best).sum(axis=0).T.ravel()
        done += k
    wins = wins[slot]
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


def _ctr_pct(expr: pl.Expr) -> pl.Expr:
    return _fmt2(expr * 100)


def _fmt2_of(fmt: Callable[[pl.Expr], pl.Expr]) -> Callable[[pl.Expr], pl.Expr]:
    """The ``round(2)`` format behind ``fmt`` (``_ctr_pct`` is ``_fmt2`` of 100 x)."""
    return _fmt2 if fmt is _ctr_pct else fmt


def _drop_pct(expr: pl.Expr) -> pl.Expr:
    """A relative CTR change -0.28 as '28' (percent down)."""
    return _fmt_int(-expr * 100)


def _days(expr: pl.Expr) -> pl.Expr:
    """Hours as days with one decimal."""
    return (expr / 24).round(1).cast(pl.Utf8)


def _ordinal(expr: pl.Expr) -> pl.Expr:
    """A 0-based rank as its 1-based text."""
    return (expr + 1).cast(pl.Utf8)


_ACTION_TEXT = pl.Series("action", ACTIONS, dtype=pl.Utf8)
_PCT_TEXT = pl.Series("pct", [str(i) for i in range(101)], dtype=pl.Utf8)
"""'0' ... '100': a percentage in [0, 1] is formatted by a lookup, not a cast."""


_INT_TEXT = pl.Series("int", [], dtype=pl.Utf8)
_INT_TEXT_MAX = 1 << 20
_ROUND_MAGIC = 2.0**52
"""x + 2**52 - 2**52 rounds 0 <= x < 2**52 to an integer, ties to even (``round(0)``'s mode)."""


def _int_text(x: np.ndarray) -> pl.Series | None:
    """``_fmt_int`` of per-row numbers by table lookup (None when out of the table's range).

    Same text as the polars cast: the table is ``Int64 -> Utf8`` of 0 .. size-1, built once
    per process and grown by powers of two."""
    global _INT_TEXT
    if x.size == 0 or not (x.min() >= 0.0 and x.max() < _INT_TEXT_MAX):
        return None
    k = ((x + _ROUND_MAGIC) - _ROUND_MAGIC).astype(np.int64)
    top = int(k.max()) + 1
    if top > _INT_TEXT.len():
        size = max(1 << 12, 1 << (top - 1).bit_length())
        _INT_TEXT = pl.int_range(0, size, eager=True, dtype=pl.Int64).cast(pl.Utf8)
    return _INT_TEXT.gather(k)


_CAST_TEXT: dict[Callable[[pl.Expr], pl.Expr], Callable[[pl.Expr], pl.Expr]] = {}
"""For formats that are ``round(2)`` then a cast: that cast (filled below)."""


def _float_text(x: np.ndarray, fmt: Callable[[pl.Expr], pl.Expr]) -> pl.Series | None:
    """``fmt`` (``round(2)`` + cast) of per-row numbers, casting each distinct rounded value
    once (ads share most of them); None when that does not apply (then cast every row).

    Exact: the rows' polars ``round(2)`` must equal k / 100 bit for bit, with k the nearest
    integer to 100 x, so each row's text is the cast of its k's value."""
    cast = _CAST_TEXT[fmt]
    if x.size == 0 or not (x.min() >= 0.0 and x.max() < 1e13):
        return None
    rounded = pl.Series(x).round(2).to_numpy()
    k = x * 100.0
    k += _ROUND_MAGIC
    k -= _ROUND_MAGIC
    if not np.array_equal((k / 100.0).view(np.int64), rounded.view(np.int64)):
        return None
    ki = k.astype(np.int64)
    lo = int(ki.min())
    ki -= lo
    size = int(ki.max()) + 1
    if size > 4 * ki.size + 65536:
        return None
    seen = np.zeros(size, dtype=bool)
    seen[ki] = True
    values = np.flatnonzero(seen)
    pos = np.zeros(size, dtype=np.int64)
    pos[values] = np.arange(values.size)
    texts = pl.DataFrame({"v": (values + lo) / 100.0}).select(cast(pl.col("v"))).to_series()
    return texts.gather(pos[ki])


_CAST_TEXT[_fmt2] = lambda e: e.cast(pl.Utf8)
_CAST_TEXT[_fmt_money] = lambda e: e.cast(pl.Decimal(38, 2)).cast(pl.Utf8)


@functools.lru_cache(maxsize=256)
def _scalar_text(fmt: Callable[[pl.Expr], pl.Expr], value: float) -> str:
    """A threshold formatted exactly as the per-row columns are (cached: settings repeat)."""
    return pl.select(fmt(pl.lit(value))).item()


_EAGER_ROWS = 4096
"""From this many rows a number column is formatted on its own (per distinct value or by
table lookup); below, the cast runs inside the shape's one ``select``."""

Part = str | pl.Expr
Col = Callable[[str, Callable[[pl.Expr], pl.Expr]], Part]


def _sentence(*parts: Part) -> pl.Expr:
    """One flat ``pl.format`` from literal text and expressions (no nested formats)."""
    text = "".join(
        x.replace("{", "{{").replace("}", "}}") if isinstance(x, str) else "{}" for x in parts
    )
    return pl.format(text, *[x for x in parts if not isinstance(x, str)])


def _age_parts(col: Col, young: bool) -> list[Part]:
    if young:
        return [col("age_h", _fmt_int), " h"]
    return [col("age_h", _days), " days"]


def _fatigue_parts(col: Col, kind: int) -> list[Part]:
    """``kind``: bit 1 CTR drop, bit 2 frequency (both joined by ' and ')."""
    out: list[Part] = []
    if kind & 1:
        out += ["CTR down ", col("ctr_change", _drop_pct), "% over 3 days"]
    if kind & 2:
        out += [" and "] if out else []
        out += ["frequency ", col("freq", _fmt2), " above ", col("freq_max", _fmt2)]
    return out


def _template_parts(t: int, col: Col, fatigue: int, young: bool) -> list[Part]:
    """Reason template ``t`` (see ``_allocate_numbers``); only the columns it names are built."""

    def move() -> list[Part]:
        return ["budget $", col("base", _fmt_money), " -> $", col("budget", _fmt_money), "."]

    def roas() -> list[Part]:
        return ["ROAS ", col("roas", _fmt2), " on $", col("spend", _fmt_int), " spend"]

    def ctr() -> list[Part]:
        return ["CTR ", col("ctr", _ctr_pct), "% vs account ", col("acc_ctr", _ctr_pct), "%"]

    if t == 0:
        return [
            "Kill: ", *roas(), " (", col("maturity", _pct), "% of its value due by now), ",
            col("p_low", _pct), "% likely below the ", col("kill_roas", _fmt2), " kill line.",
        ]  # fmt: skip
    if t == 1:
        return ["Reduce: ad fatigue, ", *_fatigue_parts(col, fatigue), "; ", *move()]
    if t == 2:
        return [
            "Reduce: paused for budget, $", col("acc_budget", _fmt_money),
            " cannot fund every ad at its $", col("floor_min", _fmt_money),
            " minimum and this one ranks #", col("rank", _ordinal),
            " (P(best) ", col("p_best", _pct), "%).",
        ]  # fmt: skip
    if t == 3:
        return [
            "Scale: ", *roas(), ", ", col("p_high", _pct), "% likely above ",
            col("scale_roas", _fmt2), " (P(best) ", col("p_best", _pct), "%); ", *move(),
        ]  # fmt: skip
    if t in (4, 5):
        verb = "Scale: " if t == 4 else "Reduce: "
        return [
            verb, col("p_best", _pct), "% chance of being the account's best; ", *roas(), ", ",
            *ctr(), "; ", *move(),
        ]  # fmt: skip
    if t == 6:
        return [
            "Hold: still learning (", *_age_parts(col, young), " old, $", col("spend", _fmt_int),
            " spent), judged ", col("w", _pct), "% on ", *ctr(), "; ", *move(),
        ]  # fmt: skip
    return [
        "Hold: ", *roas(), " (P(best) ", col("p_best", _pct), "%), between the ",
        col("kill_roas", _fmt2), " kill and ", col("scale_roas", _fmt2), " scale lines; ",
        *move(),
    ]  # fmt: skip


def _zone_parts(col: Col, young: bool) -> list[Part]:
    return [
        " ROAS looks low but it is inside the ignorance zone (", *_age_parts(col, young),
        " old, $", col("spend", _fmt_int), " spent): no kill before ", col("zone_days", _fmt2),
        " days and $", col("zone_spend", _fmt_int), ".",
    ]  # fmt: skip


def _boost_parts(col: Col, kind: int) -> list[Part]:
    """``kind`` 1: the boost has a reason text; 2: it has none."""
    if kind == 1:
        return [" Boost x", col("boost", _fmt2), " from ", col("boost_reason", str), "."]
    return [" Boost x", col("boost", _fmt2), " applied."]


N_TEMPLATES = 8


class _Columns:
    """Text columns of one call. Per shape of sentence, one frame holds only the rows of that
    shape and only the columns it prints: per-row numbers are cast inside its one ``select``,
    per-account numbers are formatted once per account (then gathered), settings once
    (literal text), percentages by table lookup."""

    def __init__(self, ex: Mapping[str, Any], acct: Mapping[str, np.ndarray], codes: np.ndarray):
        self.ex, self.acct, self.codes = ex, acct, codes
        self.per_account: dict[str, pl.Series] = {}

    def rows(self, idx: np.ndarray) -> tuple[Col, dict[str, Any]]:
        """(column getter, frame columns) for the rows ``idx``."""
        frame: dict[str, Any] = {}

        def col(key: str, fmt: Callable[[pl.Expr], pl.Expr]) -> Part:
            name = f"{key}:{fmt.__name__}"
            if key in self.acct:
                if name not in self.per_account:
                    v = np.nan_to_num(self.acct[key])
                    texts = pl.DataFrame({"v": v}).select(fmt(pl.col("v"))).to_series()
                    self.per_account[name] = texts
                if name not in frame:
                    frame[name] = self.per_account[name].gather(self.codes[idx])
                return pl.col(name)
            v = self.ex[key]
            if isinstance(v, pl.Series):  # text (boost_reason): as is
                if key not in frame:
                    frame[key] = v.gather(idx)
                return pl.col(key)
            if not isinstance(v, np.ndarray):  # one value for every row: format it once
                return _scalar_text(fmt, float(np.nan_to_num(v)))
            if fmt is _pct:
                if name not in frame:
                    x = np.clip(np.nan_to_num(v[idx]), 0.0, 1.0)
                    frame[name] = _PCT_TEXT.gather(np.rint(x * 100).astype(np.int64))
                return pl.col(name)
            if idx.size < _EAGER_ROWS:  # few rows: cast inside the one select (fewer calls)
                if key not in frame:
                    x = v[idx]
                    frame[key] = np.nan_to_num(x) if x.dtype.kind == "f" else x
                return fmt(pl.col(key))
            if fmt is _fmt_int or fmt is _drop_pct:
                if name not in frame:
                    x = np.nan_to_num(v[idx])
                    text = _int_text(x if fmt is _fmt_int else -x * 100)
                    if text is None:
                        frame[name] = pl.DataFrame({"v": x}).select(fmt(pl.col("v"))).to_series()
                    else:
                        frame[name] = text
                return pl.col(name)
            if fmt in _CAST_TEXT or fmt is _ctr_pct:
                if name not in frame:
                    x = np.nan_to_num(v[idx])
                    text = _float_text(x if fmt is not _ctr_pct else x * 100, _fmt2_of(fmt))
                    if text is None:
                        text = pl.DataFrame({"v": x}).select(fmt(pl.col("v"))).to_series()
                    frame[name] = text
                return pl.col(name)
            if key not in frame:
                x = v[idx]
                frame[key] = np.nan_to_num(x) if x.dtype.kind == "f" else x
            return fmt(pl.col(key))

        return col, frame


def _reasons(ex: Mapping[str, Any], acct: Mapping[str, np.ndarray], codes: np.ndarray):
    """One media-buyer sentence per ad, with the numbers behind the action.

    ``ex`` holds per-row arrays (or scalars shared by every row), ``acct`` per-account arrays
    (indexed by ``codes``). Rows are grouped by sentence shape (template; fatigue signal;
    ignorance-zone note; boost note; age in hours or days), decided in numpy, so each group
    is one flat ``pl.format`` over only its rows and only the columns it prints (no
    ``when/then`` evaluating every branch for every row).
    """
    template = np.asarray(ex["template"], dtype=np.int64)
    n = template.size
    zone = np.asarray(ex["zone_saved"], dtype=bool)
    boosted = np.asarray(ex["boost"]) != 1.0
    boost_kind = np.zeros(n, dtype=np.int64)
    if boosted.any():
        why = ex["boost_reason"]
        has_why = (why.is_not_null() & (why != "")).fill_null(False).to_numpy()
        boost_kind = np.where(boosted, np.where(has_why, 1, 2), 0)
    uses_age = (template == 6) | zone
    young = np.nan_to_num(ex["age_h"]) < 48
    age_kind = np.where(uses_age, np.where(young, 1, 2), 0)
    fat_kind = np.where(
        template == 1,
        np.asarray(ex["fat_ctr"], dtype=np.int64) + 2 * np.asarray(ex["fat_freq"], dtype=np.int64),
        0,
    )
    # shape = template + 8 zone + 16 boost kind (0-2) + 48 age kind (0-2) + 144 fatigue (0-3)
    shape = template + 8 * zone + 16 * boost_kind + 48 * age_kind + 144 * fat_kind
    order = np.argsort(shape.astype(np.int16), kind="stable")  # radix sort
    counts = np.bincount(shape, minlength=576)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    columns = _Columns(ex, acct, codes)
    parts = []
    for s in np.flatnonzero(counts):  # <= 576 shapes, a handful in practice; never over ads
        t, z, bk, ak, fk = s % 8, (s // 8) % 2, (s // 16) % 3, (s // 48) % 3, s // 144
        idx = order[offsets[s] : offsets[s + 1]]
        col, frame = columns.rows(idx)
        pieces = _template_parts(int(t), col, int(fk), ak == 1)
        if z:
            pieces += _zone_parts(col, ak == 1)
        if bk:
            pieces += _boost_parts(col, int(bk))
        data = pl.DataFrame(frame) if frame else pl.DataFrame({"_": np.zeros(idx.size)})
        parts.append(data.select(_sentence(*pieces).alias("reason")).to_series())
    text = pl.concat(parts, rechunk=True)  # one chunk: gathering views is ~10x cheaper
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    return text.gather(inverse)


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

    # --- accounts -> dense codes 0..G-1 in order of first appearance, so that rows grouped by
    # account (the usual input) have contiguous, ascending codes (segmented sums, see _group_sum)
    if "account_id" in ads.columns:
        acct = ads["account_id"].cast(pl.Utf8).fill_null("")
        run_start = np.ones(n, dtype=bool)
        run_start[1:] = (acct.slice(1) != acct.slice(0, n - 1)).to_numpy()
        starts = np.flatnonzero(run_start)
        names_s = acct.gather(starts)
    if "account_id" in ads.columns and names_s.n_unique() == starts.size:
        # rows grouped by account (the usual input): the codes are the run numbers
        codes = np.cumsum(run_start) - 1
        n_groups = int(starts.size)
        names = names_s.to_list()
    elif "account_id" in ads.columns:
        lex = (acct.rank("dense").to_numpy().astype(np.int64)) - 1
        n_groups = int(lex.max()) + 1
        _, first = np.unique(lex, return_index=True)
        appear = np.argsort(first)
        remap = np.empty(n_groups, dtype=np.int64)
        remap[appear] = np.arange(n_groups)
        codes = remap[lex]
        names = acct.gather(first[appear]).to_list()
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
            hours, weights = zip(*knots, strict=True)
            if sel.all():
                w = np.interp(age_h, hours, weights)
            elif sel.any():
                w[sel] = np.interp(age_h[sel], hours, weights)
    # CTR on the value scale: acc_roas * (1 + beta * (ctr / acc_ctr - 1)) = offset + scale * ctr
    ctr_scale = acc_roas * beta / acc_ctr
    ctr_offset = acc_roas * (1.0 - beta)
    ctr_value = np.maximum(ctr_offset + ctr_scale * ctr_mean, 0.1 * acc_roas)
    score_mean = boost * (w * ctr_value + (1 - w) * roas_mean)
    score_var = boost**2 * (w**2 * ctr_scale**2 * ctr_var + (1 - w) ** 2 * roas_var)
    score_sd = np.sqrt(score_var)
    # Free what is no longer needed: later arrays reuse that memory instead of new pages
    # (with ~50 arrays of 100k floats alive, fresh pages cost ~1/3 of the CPU time).
    del imps, clicks, value, pa, pb, ok_prior, ab, ctr_var, rel_ctr, a0, lam0, lam_acc
    del prior_roas, r0, roas_var, ctr_value, score_var, x_events

    # --- safety rules
    in_zone = (age_h < p("ignorance_days") * 24.0) | (spend < p("ignorance_spend"))
    wh = _wilson_hilferty(a_v)
    p_low = _gamma_cdf(a_v, b_v * p("kill_roas") / unit, p("kill_probability"), wh)
    p_high = 1.0 - _gamma_cdf(a_v, b_v * p("scale_roas") / unit, 1.0 - p("scale_probability"), wh)
    del wh
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
    del draw_args, a_ctr, b_ctr, a_v, b_v, unit, ctr_scale, ctr_offset, acc_roas
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
        else pl.repeat(None, n, dtype=pl.Utf8, eager=True)
    )
    # Text inputs: per-row arrays (made finite where a template reads them), per-account
    # numbers in ``acct`` (formatted once per account), scalars shared by every row.
    explain: dict[str, Any] = {
        "template": template,
        "budget": budget,
        "base": baseline,
        "roas": roas_mean,
        "spend": spend,
        "maturity": np.where(spend > 0, matured / np.where(spend > 0, spend, 1.0), 1.0),
        "p_low": p_low,
        "p_high": p_high,
        "p_best": p_best,
        "ctr": ctr_mean,
        "ctr_change": ctr_change,
        "freq": freq,
        "fat_ctr": fat_ctr,
        "fat_freq": fat_freq,
        "age_h": age_h,
        "w": w,
        "floor_min": min_budget,
        "rank": rank,
        "zone_saved": zone_saved & ~kill,
        "boost": boost,
        "boost_reason": boost_reason,
    }
    acct = {"acc_budget": acc_budget, "acc_ctr": _first(codes, n_groups, acc_ctr)}
    for key, name in (
        ("kill_roas", "kill_roas"),
        ("scale_roas", "scale_roas"),
        ("freq_max", "fatigue_frequency"),
        ("zone_days", "ignorance_days"),
        ("zone_spend", "ignorance_spend"),
    ):
        v = p(name)
        if isinstance(v, np.ndarray):
            acct[key] = _first(codes, n_groups, v)
        else:
            explain[key] = v
    explain["_acct"] = acct
    explain["_codes"] = codes
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
    ex = res["explain"]
    reason = _reasons(ex, ex.pop("_acct"), ex.pop("_codes"))
    return pl.DataFrame(
        {
            "ad_id": ads["ad_id"].cast(pl.Utf8),
            "budget": res["budget"],
            "score": res["score"],
            "p_best": res["p_best"],
            "action": _ACTION_TEXT.gather(res["action"]),
            "reason": reason,
            "confidence": res["confidence"],
        },
        schema=OUTPUT_SCHEMA,
    )


def _binom_ll(c: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Binomial log-likelihood of ``c`` clicks in ``i`` impressions at the MLE rate c / i."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(i > 0, c / np.where(i > 0, i, 1.0), 0.0)
        hit = np.where(c > 0, c * np.log(np.where(p > 0, p, 1.0)), 0.0)
        miss = np.where(i - c > 0, (i - c) * np.log(np.where(p < 1, 1.0 - p, 1.0)), 0.0)
    return hit + miss


def evidence_weights(
    impressions: np.ndarray,
    clicks: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    change_llr: float = 20.0,
    keep: float = 0.1,
    account_z: float | None = 6.0,
    min_days: int = 2,
) -> np.ndarray:
    """Per (day, ad) weights that forget the evidence from before a detected change.

    Thompson sampling on lifetime counts keeps trusting what an ad did before a platform shift
    or before it fatigued, and with 5-7 day value lags the new value shows up late. CTR arrives
    without lag, so a change in it is the earliest sign. For each ad (a column of the
    ``(days, ads)`` daily ``impressions`` / ``clicks``, oldest day first) the most likely single
    change day of its CTR is found by a binomial likelihood ratio over every split that leaves
    ``min_days`` days on both sides; when 2 x log LR exceeds ``change_llr`` the days before it
    get weight ``keep`` (a discounted, "restarted" posterior), the others 1. The defaults were
    chosen on the bench's tuning seeds 0-31 (at temperature 0.4, ``change_llr`` 15-30 made no
    difference; ``keep`` 0.05 / 0.1 / 0.2 / 0.35 gave drift-world median regret 31.3 / 30.1 /
    32.4 / 35.4%); no change was detected in the stationary and plain-delay worlds there.

    With ``account_z``, a change shared by a whole account (``groups``: one code per ad, all
    one account when None) is also detected: the ads' 2 x log LRs summed at a common split,
    against K + ``account_z`` x sqrt(2K) for K ads (their chi-square mean and sd), and then
    every ad of the account forgets before that day, including ads too starved of budget to
    show the change on their own (their own change day wins when they have one).

    Multiply each day's spend, impressions, clicks, matured spend, and value by its click day,
    by these weights and pass the sums to ``allocate`` as its cumulative columns. Vectorized
    over ads and days (O(days x ads)).
    """
    imps = np.nan_to_num(np.asarray(impressions, dtype=np.float64))
    clk = np.minimum(np.nan_to_num(np.asarray(clicks, dtype=np.float64)), imps)
    if imps.ndim != 2 or imps.shape != clk.shape:
        raise ValueError("impressions and clicks must be (days, ads) arrays of one shape")
    if not 0.0 <= keep <= 1.0:
        raise ValueError("keep must be in [0, 1]")
    days, k = imps.shape
    w = np.ones((days, k))
    if days < 2 * min_days or k == 0:
        return w
    ci, cc = np.cumsum(imps, axis=0), np.cumsum(clk, axis=0)
    split = np.arange(min_days, days - min_days + 1)  # days [0, s) vs [s, days)
    i1, c1 = ci[split - 1], cc[split - 1]
    i_all, c_all = ci[-1], cc[-1]
    llr = 2.0 * (
        _binom_ll(c1, i1) + _binom_ll(c_all - c1, i_all - i1) - _binom_ll(c_all, i_all)[None, :]
    )
    llr = np.maximum(np.nan_to_num(llr), 0.0)
    best = llr.argmax(axis=0)
    cut = np.where(llr[best, np.arange(k)] > change_llr, split[best], 0)
    if account_z is not None:
        codes = np.zeros(k, dtype=np.int64) if groups is None else np.asarray(groups)
        n_groups = int(codes.max()) + 1
        total = np.zeros((n_groups, split.size))
        np.add.at(total, codes, llr.T)
        n_ads = np.bincount(codes[i_all > 0], minlength=n_groups)
        j = total.argmax(axis=1)
        shared = total[np.arange(n_groups), j] > n_ads + account_z * np.sqrt(2.0 * n_ads)
        cut = np.where((cut == 0) & shared[codes], np.where(shared, split[j], 0)[codes], cut)
    w[np.arange(days)[:, None] < cut[None, :]] = keep
    return w


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
