"""Cross-account creative patterns: traits that win in many accounts boost new ads everywhere.

Two steps, and only the second one crosses account boundaries:

1. :func:`account_aggregates` sums each account's own ads per pattern (a creative trait such as
   ``hook_type=question`` or a pair such as ``hook_type=question & format=video``) and decides
   whether the pattern wins in that account. Its output has no ad ids.
2. :func:`patterns_from_aggregates` reads only those per-account sums: a pattern counts when it
   wins in at least ``min_accounts`` accounts; its boost (5-20%) grows with its confidence.

:func:`patterns` chains both; :func:`boosts_for` gives ads a ``boost`` multiplier and a
``boost_reason`` naming the pattern, the inputs the allocator (``sampler.allocate``) takes.

Input ``perf`` columns (one row per ad): ad_id, account_id, hook_type, format, cta, emotion
(Utf8, nullable), spend (Float64, currency units), pipeline_value (Float64), clicks, impressions
(Int64).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime

import polars as pl

TRAITS: tuple[str, ...] = ("hook_type", "format", "cta", "emotion")
PATTERN_DIMS: tuple[tuple[str, ...], ...] = tuple((t,) for t in TRAITS) + tuple(
    itertools.combinations(TRAITS, 2)
)
PATTERN_SCHEMA: dict[str, pl.DataType] = {
    "pattern": pl.Utf8(),
    "dims": pl.Utf8(),
    "accounts_present": pl.UInt32(),
    "accounts_won": pl.UInt32(),
    "consistency": pl.Float64(),
    "spend_won": pl.Float64(),
    "pipeline_value_won": pl.Float64(),
    "roas_won": pl.Float64(),
    "median_account_roas": pl.Float64(),
    "confidence": pl.Float64(),
    "boost": pl.Float64(),
    "reason": pl.Utf8(),
}


@dataclass(frozen=True)
class CrossAccountConfig:
    """When a pattern counts and how much it boosts (defaults from the learning issue)."""

    min_accounts: int = 3  # accounts where the pattern must win
    min_roas: float = 2.0  # pipeline ROAS the pattern needs inside an account to win there
    min_account_spend: float = 100.0  # spend behind a pattern before an account judges it
    min_boost: float = 0.05
    max_boost: float = 0.20
    accounts_full: int = 6  # winning accounts at which the accounts part of confidence is 1
    spend_half: float = 2000.0  # winning spend at which the spend part of confidence is 0.5


def _key_columns() -> list[pl.Expr]:
    """One 'dim=value [& dim=value]' column per pattern dimension; null when a trait is null."""
    return [
        pl.concat_str(
            [pl.lit(f"{d}=") + pl.col(d).cast(pl.Utf8) for d in dims], separator=" & "
        ).alias("+".join(dims))
        for dims in PATTERN_DIMS
    ]


def _with_traits(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, dtype=pl.Utf8).alias(t) for t in TRAITS if t not in frame.columns]
    return frame.with_columns(missing) if missing else frame


def account_aggregates(
    perf: pl.DataFrame, config: CrossAccountConfig | None = None
) -> pl.DataFrame:
    """Per (account_id, pattern): ads, spend, pipeline_value, clicks, impressions, roas, wins.

    A pattern wins in an account when the account spent at least ``min_account_spend`` on it,
    its pooled pipeline ROAS there is at least ``min_roas``, and at least the account's overall
    ROAS (it does not just ride a good account). No ad-level column survives this step.
    """
    cfg = config or CrossAccountConfig()
    base = _with_traits(perf).select(
        pl.col("account_id").cast(pl.Utf8),
        pl.col("spend").cast(pl.Float64).fill_null(0.0),
        pl.col("pipeline_value").cast(pl.Float64).fill_null(0.0),
        pl.col("clicks").cast(pl.Int64).fill_null(0),
        pl.col("impressions").cast(pl.Int64).fill_null(0),
        *_key_columns(),
    )
    account = base.group_by("account_id").agg(
        (pl.col("pipeline_value").sum() / pl.col("spend").sum()).alias("account_roas")
    )
    long = base.unpivot(
        index=["account_id", "spend", "pipeline_value", "clicks", "impressions"],
        on=["+".join(d) for d in PATTERN_DIMS],
        variable_name="dims",
        value_name="pattern",
    ).drop_nulls("pattern")
    agg = long.group_by("account_id", "dims", "pattern").agg(
        pl.len().alias("ads"),
        pl.col("spend").sum(),
        pl.col("pipeline_value").sum(),
        pl.col("clicks").sum(),
        pl.col("impressions").sum(),
    )
    roas = pl.when(pl.col("spend") > 0).then(pl.col("pipeline_value") / pl.col("spend"))
    return (
        agg.join(account, on="account_id", how="left")
        .with_columns(roas.alias("roas"))
        .with_columns(
            (
                (pl.col("spend") >= cfg.min_account_spend)
                & (pl.col("roas") >= cfg.min_roas)
                & (pl.col("roas") >= pl.col("account_roas"))
            )
            .fill_null(False)
            .alias("wins"),
            (pl.col("spend") >= cfg.min_account_spend).alias("judged"),
        )
        .sort("account_id", "dims", "pattern")
    )


def patterns_from_aggregates(
    aggregates: pl.DataFrame, config: CrossAccountConfig | None = None
) -> pl.DataFrame:
    """Patterns that win in >= ``min_accounts`` accounts, from per-account sums only.

    Confidence is the geometric mean of three parts in [0, 1]: accounts (winning accounts /
    ``accounts_full``), consistency (winning / judged accounts) and spend (winning spend /
    (winning spend + ``spend_half``)); ``boost = 1 + min_boost + (max_boost - min_boost) *
    confidence``. Columns: see ``PATTERN_SCHEMA``.
    """
    cfg = config or CrossAccountConfig()
    judged = aggregates.filter(pl.col("judged"))
    if judged.height == 0:
        return pl.DataFrame(schema=PATTERN_SCHEMA)
    won = pl.col("wins")
    stats = judged.group_by("dims", "pattern").agg(
        pl.len().cast(pl.UInt32).alias("accounts_present"),
        won.sum().cast(pl.UInt32).alias("accounts_won"),
        pl.col("spend").filter(won).sum().alias("spend_won"),
        pl.col("pipeline_value").filter(won).sum().alias("pipeline_value_won"),
        pl.col("roas").median().alias("median_account_roas"),
    )
    c_accounts = (pl.col("accounts_won") / cfg.accounts_full).clip(upper_bound=1.0)
    c_spend = pl.col("spend_won") / (pl.col("spend_won") + cfg.spend_half)
    confidence = (c_accounts * pl.col("consistency") * c_spend) ** (1.0 / 3.0)
    out = (
        stats.filter(pl.col("accounts_won") >= cfg.min_accounts)
        .with_columns(
            (pl.col("accounts_won") / pl.col("accounts_present")).alias("consistency"),
            (pl.col("pipeline_value_won") / pl.col("spend_won")).alias("roas_won"),
        )
        .with_columns(confidence.alias("confidence"))
        .with_columns(
            (1.0 + cfg.min_boost + (cfg.max_boost - cfg.min_boost) * pl.col("confidence")).alias(
                "boost"
            )
        )
    )
    reason = pl.format(
        "{} wins in {}/{} accounts (pipeline ROAS {}, ${} spend): +{}%",
        pl.col("pattern"),
        pl.col("accounts_won"),
        pl.col("accounts_present"),
        pl.col("roas_won").round(1),
        pl.col("spend_won").round(0).cast(pl.Int64),
        ((pl.col("boost") - 1.0) * 100).round(0).cast(pl.Int64),
    )
    return (
        out.with_columns(reason.alias("reason"))
        .select(list(PATTERN_SCHEMA))
        .cast(PATTERN_SCHEMA)
        .sort(["boost", "pattern"], descending=[True, False])
    )


def patterns(perf: pl.DataFrame, config: CrossAccountConfig | None = None) -> pl.DataFrame:
    """Cross-account winning patterns from per-ad performance (aggregated per account first)."""
    return patterns_from_aggregates(account_aggregates(perf, config), config)


def boosts_for(
    ads: pl.DataFrame,
    patterns: pl.DataFrame,
    *,
    now: datetime | None = None,
    max_age_hours: float = 168.0,
) -> pl.DataFrame:
    """Return ``ads`` with ``boost`` (1.0 = none) and ``boost_reason`` (null = none).

    An ad takes the strongest pattern it matches (boosts never compound). With ``now`` and a
    ``created_at`` column, only ads younger than ``max_age_hours`` are boosted: the boost is a
    prior for ads without their own evidence. An existing ``boost`` column is replaced.
    """
    base = _with_traits(ads.drop([c for c in ("boost", "boost_reason") if c in ads.columns]))
    rows = base.with_row_index("_row")
    if patterns.height == 0:
        best = pl.DataFrame(
            schema={"_row": pl.UInt32(), "boost": pl.Float64(), "boost_reason": pl.Utf8()}
        )
    else:
        eligible = rows
        if now is not None and "created_at" in base.columns:
            age_h = (pl.lit(now) - pl.col("created_at")).dt.total_seconds(fractional=True) / 3600
            eligible = rows.filter(age_h < max_age_hours)
        keys = eligible.select("_row", *_key_columns()).unpivot(
            index="_row", variable_name="dims", value_name="pattern"
        )
        best = (
            keys.join(patterns.select("pattern", "boost", "reason"), on="pattern", how="inner")
            .sort(["_row", "boost", "pattern"], descending=[False, True, False])
            .group_by("_row", maintain_order=True)
            .first()
            .select("_row", "boost", pl.col("reason").alias("boost_reason"))
        )
    keep = [c for c in ads.columns if c not in ("boost", "boost_reason")]
    return (
        rows.join(best, on="_row", how="left")
        .sort("_row")
        .with_columns(pl.col("boost").fill_null(1.0))
        .select(*keep, "boost", "boost_reason")
    )
