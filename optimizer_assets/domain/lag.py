"""Attribution lag: how long pipeline value takes to arrive, and what recent spend is still owed.

A service business books the money for a click days later (appointment, show-up, close), so
yesterday's spend has only a small part of its value in the CRM yet. This module estimates the
lag distribution from deal history and corrects recent spend for the part not yet arrived,
so young ads are judged on what they will probably earn rather than punished for the lag.

Pure numpy/polars, no I/O. Conventions:

- Lags are whole days between the *cohort day* (the day of the click/lead the value belongs to,
  e.g. the contact's ``created_at``) and the day the stage value arrived.
- ``lag_cdf`` frames have columns ``lag_days`` (Int32, 0..max_lag_days) and ``cdf`` (Float64,
  non-decreasing, ``cdf == 1`` at ``max_lag_days``): the share of a cohort's eventual value that
  has arrived within ``lag_days`` days. Optional extra key columns (for example ``account_id``)
  give one curve per key; the functions below join on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

import numpy as np
import polars as pl

_US_PER_DAY = 86_400_000_000

__all__ = [
    "estimate_lag_cdf",
    "cdf_at",
    "spend_age_days",
    "matured_spend",
    "lag_corrected_value",
    "lag_cdf_from_lags",
]


_NO_SPEND = 1e-8  # currency units


def _as_date_expr(name: str) -> pl.Expr:
    """Date of a Date/Datetime column (naive datetimes are read as UTC)."""
    return pl.col(name).cast(pl.Date)


def _day_number(d: date | datetime) -> int:
    """Days since 1970-01-01 of a date or (UTC) datetime."""
    if isinstance(d, datetime):
        d = d.date()
    return (d - date(1970, 1, 1)).days


def estimate_lag_cdf(
    events: pl.DataFrame,
    *,
    now: datetime,
    max_lag_days: int = 28,
    by: Sequence[str] = (),
) -> pl.DataFrame:
    """Estimate the value-weighted lag CDF from (possibly censored) deal history.

    ``events`` columns: ``cohort_at`` (Date/Datetime: the click or lead the value belongs to),
    ``occurred_at`` (Date/Datetime: when the stage value arrived), optional ``value`` (Float64:
    the stage value delta, may be negative for regressions; without it every event weighs 1),
    plus the ``by`` key columns. Events after ``now`` are ignored.

    Recent cohorts have not finished arriving (right-censoring), so a plain histogram of
    observed lags would be too short. This uses the chain-ladder method from insurance
    reserving: for each lag ``d`` it compares cumulative value at ``d`` and ``d+1`` only over
    cohorts old enough to have been observed at ``d+1``, and chains those ratios back from
    ``max_lag_days`` (where the CDF is 1 by definition). Lags beyond ``max_lag_days`` count
    as arriving at ``max_lag_days``. Without usable history the curve is flat at 1 (no
    correction).

    Returns one row per key and lag: ``*by``, ``lag_days`` (Int32), ``cdf`` (Float64),
    ``weight`` (Float64: the absolute value observed at that lag, for judging support).
    """
    if max_lag_days < 0:
        raise ValueError("max_lag_days must be >= 0")
    by = list(by)
    missing = {"cohort_at", "occurred_at", *by} - set(events.columns)
    if missing:
        raise ValueError(f"events lack columns: {sorted(missing)}")
    n_lags = max_lag_days + 1
    today = _day_number(now)
    weight = (
        pl.col("value").cast(pl.Float64).fill_null(0.0).fill_nan(0.0)
        if "value" in events.columns
        else pl.lit(1.0)
    )
    ev = (
        events.select(
            *[pl.col(c) for c in by],
            _as_date_expr("cohort_at").cast(pl.Int32).alias("_c"),
            _as_date_expr("occurred_at").cast(pl.Int32).alias("_o"),
            weight.alias("_w"),
        )
        .drop_nulls(["_c", "_o"])
        .filter((pl.col("_o") <= today) & (pl.col("_c") <= today))
    )
    keys = ev.select(by).unique().sort(by) if by else pl.DataFrame()
    if ev.height == 0:
        return _flat_cdf(keys if by else None, n_lags, by)

    first_day = int(ev["_c"].min())  # type: ignore[arg-type]
    n_cohorts = today - first_day + 1
    if by:
        keys = keys.with_row_index("_g")
        ev = ev.join(keys, on=by, how="left", nulls_equal=True)
        g = ev["_g"].to_numpy().astype(np.int64)
        n_groups = keys.height
    else:
        g = np.zeros(ev.height, dtype=np.int64)
        n_groups = 1
    cohort = ev["_c"].to_numpy().astype(np.int64) - first_day
    lag = np.clip(ev["_o"].to_numpy().astype(np.int64) - (cohort + first_day), 0, max_lag_days)
    w = ev["_w"].to_numpy()

    # Dense (group, cohort, lag) increments, then cumulative over lag.
    flat = (g * n_cohorts + cohort) * n_lags + lag
    inc = np.bincount(flat, weights=w, minlength=n_groups * n_cohorts * n_lags)
    cum = np.cumsum(inc.reshape(n_groups, n_cohorts, n_lags), axis=2)
    support = np.bincount(g * n_lags + lag, weights=np.abs(w), minlength=n_groups * n_lags).reshape(
        n_groups, n_lags
    )

    # Cohort c is observed up to lag (today - c); step d -> d+1 uses cohorts complete at d+1.
    observed_to = (today - first_day) - np.arange(n_cohorts)  # (n_cohorts,)
    d = np.arange(max_lag_days)
    # Only complete days count: lag d+1 of cohort c is complete once day c+d+1 has ended.
    eligible = observed_to[:, None] >= (d[None, :] + 2)  # (n_cohorts, max_lag)
    num = np.einsum("gcd,cd->gd", cum[:, :, :-1], eligible)  # value at d
    den = np.einsum("gcd,cd->gd", cum[:, :, 1:], eligible)  # value at d+1
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / den, 1.0)  # CDF(d) / CDF(d+1); 1 = no evidence
    ratio = np.clip(ratio, 0.0, 1.0)  # regressions can overshoot; the CDF stays monotone
    cdf = np.ones((n_groups, n_lags))
    if max_lag_days:
        # CDF(d) = prod_{k >= d} ratio_k, a reversed cumulative product.
        cdf[:, :-1] = np.cumprod(ratio[:, ::-1], axis=1)[:, ::-1]

    out = pl.DataFrame(
        {
            "_g": np.repeat(np.arange(n_groups), n_lags).astype(np.uint32),
            "lag_days": np.tile(np.arange(n_lags), n_groups).astype(np.int32),
            "cdf": cdf.ravel(),
            "weight": support.ravel(),
        }
    )
    if by:
        return keys.join(out, on="_g").drop("_g").sort([*by, "lag_days"])
    return out.drop("_g")


def _flat_cdf(keys: pl.DataFrame | None, n_lags: int, by: list[str]) -> pl.DataFrame:
    """A CDF of 1 everywhere: no evidence of lag, so no correction."""
    base = pl.DataFrame(
        {
            "lag_days": np.arange(n_lags, dtype=np.int32),
            "cdf": np.ones(n_lags),
            "weight": np.zeros(n_lags),
        }
    )
    if not by or keys is None or keys.height == 0:
        return base if not by else base.head(0).with_columns(*[pl.lit(None).alias(c) for c in by])
    return keys.join(base, how="cross").select([*by, "lag_days", "cdf", "weight"])


def lag_cdf_from_lags(lag_days: np.ndarray, weights: np.ndarray | None = None) -> pl.DataFrame:
    """An empirical lag CDF from complete (uncensored) lags, e.g. for tests or known presets."""
    lag_days = np.asarray(lag_days, dtype=np.int64)
    if lag_days.size == 0:
        return _flat_cdf(None, 1, [])
    lag_days = np.clip(lag_days, 0, None)
    w = np.ones(lag_days.size) if weights is None else np.asarray(weights, dtype=np.float64)
    hist = np.bincount(lag_days, weights=w)
    total = hist.sum()
    cdf = np.cumsum(hist) / total if total > 0 else np.ones(hist.size)
    return pl.DataFrame(
        {
            "lag_days": np.arange(hist.size, dtype=np.int32),
            "cdf": np.clip(cdf, 0.0, 1.0),
            "weight": np.abs(hist),
        }
    )


def cdf_at(age_days: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Share of value arrived for clicks ``age_days`` old (fractional ages interpolate).

    ``age_days`` counts complete days of arrivals after the cohort day, so age 0 means all of
    lag 0, and -1 means nothing yet; between those it interpolates. Ages past the curve give 1.
    """
    cdf = np.asarray(cdf, dtype=np.float64)
    xp = np.arange(-1, cdf.size, dtype=np.float64)
    fp = np.concatenate(([0.0], cdf))
    return np.interp(np.asarray(age_days, dtype=np.float64), xp, fp, left=0.0, right=1.0)


def _key_columns(lag_cdf: pl.DataFrame) -> list[str]:
    return [c for c in lag_cdf.columns if c not in ("lag_days", "cdf", "weight")]


def _cdf_matrix(lag_cdf: pl.DataFrame, keys: list[str]) -> tuple[pl.DataFrame, np.ndarray]:
    """(key table with ``_g``, CDF matrix of shape (groups, lags)) from a lag_cdf frame."""
    if lag_cdf.height == 0:
        return pl.DataFrame(), np.ones((1, 1))
    n_lags = int(lag_cdf["lag_days"].max()) + 1  # type: ignore[arg-type]
    if keys:
        table = lag_cdf.select(keys).unique().sort(keys).with_row_index("_g")
        lc = lag_cdf.join(table, on=keys, nulls_equal=True)
        g = lc["_g"].to_numpy().astype(np.int64)
    else:
        table = pl.DataFrame()
        lc = lag_cdf
        g = np.zeros(lc.height, dtype=np.int64)
    n_groups = int(g.max()) + 1
    mat = np.full((n_groups, n_lags), np.nan)
    mat[g, lc["lag_days"].to_numpy().astype(np.int64)] = lc["cdf"].to_numpy()
    # Missing lags take the last known value (0 before the first); the curve stays monotone.
    mat = np.fmax.accumulate(np.where(np.isnan(mat), -np.inf, mat), axis=1)
    mat = np.clip(np.where(np.isfinite(mat), mat, 0.0), 0.0, 1.0)
    mat[:, -1] = 1.0
    return table, mat


def spend_age_days(dates: np.ndarray, now: datetime) -> np.ndarray:
    """Complete days of value arrivals since each spend day (see :func:`cdf_at`).

    ``dates`` are day numbers (days since 1970-01-01). Spend on day s, seen at ``now`` on day
    t after a fraction f of day t has passed, has arrivals for lags up to t - s - 1 plus f of
    lag t - s, i.e. an age of t - s - 1 + f.
    """
    f = (now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6) / 86_400
    return _day_number(now) - np.asarray(dates, dtype=np.float64) - 1.0 + f


def matured_spend(spend_by_day: pl.DataFrame, lag_cdf: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """Per ad: ``spend`` and ``matured_spend`` = sum over days of spend x CDF(age of that day).

    ``spend_by_day`` columns: ``ad_id``, ``date`` (Date/Datetime), ``spend``, plus the key
    columns of ``lag_cdf`` if it has any (e.g. ``account_id``). Keys without a curve use CDF 1.
    Spend dated after ``now`` is ignored. ``matured_spend`` is the spend whose value should be
    in the CRM by now; dividing observed value by it gives an unbiased ROAS.
    """
    keys = _key_columns(lag_cdf)
    table, mat = _cdf_matrix(lag_cdf, keys)
    today = _day_number(now)
    s = spend_by_day.select(
        pl.col("ad_id").cast(pl.Utf8),
        *[pl.col(k) for k in keys],
        _as_date_expr("date").cast(pl.Int32).alias("_d"),
        pl.col("spend").cast(pl.Float64).fill_null(0.0).fill_nan(0.0).clip(0.0, None),
    ).filter(pl.col("_d") <= today)
    if keys and table.height:
        s = s.join(table, on=keys, how="left", nulls_equal=True)
        g = s["_g"].fill_null(-1).to_numpy().astype(np.int64)
    else:
        g = np.zeros(s.height, dtype=np.int64)
    age = spend_age_days(s["_d"].to_numpy(), now)
    # Interpolate every row on its own curve: x in [-1, n_lags-1] maps onto [0, cdf...].
    ext = np.concatenate([np.zeros((mat.shape[0], 1)), mat], axis=1)
    x = np.clip(age + 1.0, 0.0, mat.shape[1])
    lo = np.minimum(np.floor(x).astype(np.int64), mat.shape[1])
    hi = np.minimum(lo + 1, mat.shape[1])
    gi = np.maximum(g, 0)
    share = ext[gi, lo] + (x - lo) * (ext[gi, hi] - ext[gi, lo])
    share = np.where((g < 0) | (age >= mat.shape[1] - 1), 1.0, share)
    return (
        s.select("ad_id", "spend")
        .with_columns(pl.Series("matured_spend", s["spend"].to_numpy() * share))
        .group_by("ad_id", maintain_order=True)
        .agg(pl.col("spend").sum(), pl.col("matured_spend").sum())
    )


def lag_corrected_value(
    value: pl.DataFrame,
    spend_by_day: pl.DataFrame,
    lag_cdf: pl.DataFrame,
    now: datetime,
    *,
    prior_roas: float | None = None,
    shrink_spend: float = 100.0,
) -> pl.DataFrame:
    """Per ad: observed value scaled up for what recent spend has not delivered yet.

    ``value`` columns: ``ad_id``, ``pipeline_value`` (attributed value arrived so far) and
    optionally ``prior_roas`` (per-ad prior, e.g. from similar winners). ``spend_by_day`` as in
    :func:`matured_spend`.

    The value still owed is the unmatured spend (S - M) times a shrunk ROAS estimate
    ``(V + k * r0) / (M + k)`` with ``k = shrink_spend`` (currency units of pseudo-spend) and
    ``r0`` the prior ROAS (``prior_roas`` column, else the argument, else the pooled
    ``sum(V) / sum(M)`` of the frame). So with no matured spend a young ad is valued at the
    prior ROAS instead of at 0, and tiny CDFs cannot blow up (plain V / CDF would).
    With ``k = 0`` and one day of spend it is exactly ``V / CDF(age)``.

    Returns ``ad_id``, ``spend``, ``matured_spend``, ``maturity`` (M / S, 1 for no spend),
    ``pipeline_value``, ``lag_corrected_value``. Ads without spend rows get spend 0.
    """
    if shrink_spend < 0:
        raise ValueError("shrink_spend must be >= 0")
    ms = matured_spend(spend_by_day, lag_cdf, now)
    v = value.select(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("pipeline_value").cast(pl.Float64).fill_null(0.0).fill_nan(0.0).clip(0.0, None),
        *([pl.col("prior_roas").cast(pl.Float64)] if "prior_roas" in value.columns else []),
    )
    df = v.join(ms, on="ad_id", how="left").with_columns(
        pl.col("spend").fill_null(0.0), pl.col("matured_spend").fill_null(0.0)
    )
    val = df["pipeline_value"].to_numpy()
    s = df["spend"].to_numpy()
    m = np.minimum(df["matured_spend"].to_numpy(), s)
    if prior_roas is None:
        total_m = m.sum()
        # below a millionth of a cent matured spend is no evidence (and would divide to inf)
        prior_roas = float(val.sum() / total_m) if total_m > _NO_SPEND else 0.0
    r0 = np.full(df.height, float(prior_roas))
    if "prior_roas" in df.columns:
        col = df["prior_roas"].to_numpy()
        r0 = np.where(np.isfinite(col) & (col >= 0), col, r0)
    k = float(shrink_spend)
    with np.errstate(divide="ignore", invalid="ignore"):
        roas_hat = np.where(m + k > _NO_SPEND, (val + k * r0) / np.maximum(m + k, _NO_SPEND), r0)
        maturity = np.where(s > 0, m / s, 1.0)
    corrected = val + (s - m) * roas_hat
    return pl.DataFrame(
        {
            "ad_id": df["ad_id"],
            "spend": s,
            "matured_spend": m,
            "maturity": maturity,
            "pipeline_value": val,
            "lag_corrected_value": corrected,
        }
    )
