"""Guardrails: turn budget recommendations and ad kills into a safe, deterministic change plan.

Pure polars: no Dagster, no HTTP, no files. Money is in integer minor units (cents for USD).

Inputs (ids are strings, datetimes UTC):

- ``recommendations`` (one row per ad set): ``adset_id, account_id, campaign_id, current_budget,
  recommended_budget``. Rows with a null ``recommended_budget`` or one equal to the current budget
  ask for nothing and produce no plan row.
- ``current`` (the live ad sets of the accounts, the truth for old values and the daily cap):
  ``adset_id, account_id, campaign_id, daily_budget``. Ad sets missing here fall back to the
  recommendation's ``current_budget``.
- ``ad_actions`` (optional, one row per ad): ``ad_id, account_id, campaign_id, action`` and
  optionally ``current_status`` (default ``ACTIVE``). ``action == "kill"`` pauses the ad; other
  actions are budget-level and ignored here; an ad already ``PAUSED`` produces no row.
- ``history`` (rows of the ``ad_change_log``): ``object_id, field, old_value, new_value,
  applied_at, status`` and optionally ``campaign_id`` and ``change_id``. Rows whose status is
  ``applied`` or ``sending`` count (a ``sending`` row may have reached Meta); a null ``applied_at``
  counts as ``now`` (conservative). History rows without ``campaign_id`` are mapped to a campaign
  through the ad sets and ads of this call; rows that cannot be mapped do not count against the
  per-campaign limit (store ``campaign_id`` in the ledger to avoid that).

Output of :func:`plan_changes` (``PLAN_SCHEMA``), one row per requested change:

- ``change_id``: 32 hex chars of SHA-256 over account, object, field, old value, new value and the
  start of the planning window (``GuardrailConfig.plan_window``): recomputing the same plan in the
  same window gives the same ids, so the ledger insert is idempotent. The old value is part of the
  key so a skipped row (new == old) never takes the id of an applied change to that value.
- ``account_id, campaign_id, object_id``; ``object_type`` ``adset`` | ``ad``;
  ``field`` ``daily_budget`` | ``status``.
- ``old_value, new_value, requested_value``: one uniform ``String`` column each, so the plan
  appends to the ledger as is: budgets are decimal integer strings (``"2500"``; read them back
  with ``.cast(pl.Int64)``), statuses are Graph status strings (``"PAUSED"``).
- ``rule``: the guardrails that trimmed or held back the request, comma-separated in the fixed
  order of ``RULES``; null when the request passed untouched.
- ``status``: ``planned`` (to be sent) or ``skipped`` (not sent: ``new_value == old_value`` and
  ``rule`` says why). A trimmed request stays ``planned`` with the trimmed value; only a change
  that ends up too small (no churn), blocked entirely by a band, or beyond a count limit is
  ``skipped``.
- ``planned_at``: ``now``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

FIELD_BUDGET = "daily_budget"
FIELD_STATUS = "status"
OBJECT_ADSET = "adset"
OBJECT_AD = "ad"
AD_STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED")
PLANNED = "planned"
SKIPPED = "skipped"
# History rows that may have reached Meta and therefore count in windows.
COUNTED_STATUSES = ("applied", "sending")

RULE_MIN_BUDGET = "min_budget"
RULE_VELOCITY = "budget_velocity"
RULE_BUDGET_EDITS = "budget_edits_per_hour"
RULE_CAMPAIGN_ACTIONS = "campaign_actions_per_hour"
RULE_MAX_PER_RUN = "max_changes_per_run"
RULE_DAILY_CAP = "daily_cap"
RULE_NEUTRAL = "budget_neutral"
RULE_MIN_CHANGE = "min_change"
# Order of names inside the ``rule`` column (the order in which they are applied).
RULES = (
    RULE_MIN_BUDGET,
    RULE_VELOCITY,
    RULE_BUDGET_EDITS,
    RULE_CAMPAIGN_ACTIONS,
    RULE_MAX_PER_RUN,
    RULE_DAILY_CAP,
    RULE_NEUTRAL,
    RULE_MIN_CHANGE,
)
# Extra rules only :func:`check_plan` reports.
RULE_STALE = "stale_old_value"
RULE_DUPLICATE = "duplicate_change"
RULE_INVALID = "invalid_value"

HOUR = timedelta(hours=1)
UTC_US = pl.Datetime("us", "UTC")
PLAN_SCHEMA: dict[str, pl.DataType] = {
    "change_id": pl.String(),
    "account_id": pl.String(),
    "campaign_id": pl.String(),
    "object_id": pl.String(),
    "object_type": pl.String(),
    "field": pl.String(),
    "old_value": pl.String(),
    "new_value": pl.String(),
    "requested_value": pl.String(),
    "rule": pl.String(),
    "status": pl.String(),
    "planned_at": UTC_US,
}
HISTORY_SCHEMA: dict[str, pl.DataType] = {
    "object_id": pl.String(),
    "campaign_id": pl.String(),
    "field": pl.String(),
    "old_value": pl.String(),
    "new_value": pl.String(),
    "applied_at": UTC_US,
    "status": pl.String(),
}
_BPS = 10_000  # percentages are handled as integer basis points to keep the bounds exact


@dataclass(frozen=True)
class GuardrailConfig:
    """Per-account guardrails; defaults are the seeded values documented beside each field."""

    velocity_pct: float = 0.20  # budget moves at most +-20% ...
    velocity_window: timedelta = timedelta(hours=6)  # ... within any 6 hours, per ad set
    max_budget_edits_per_hour: int = 4  # Meta's own limit (error 613/1487632 past it)
    max_campaign_actions_per_hour: int = 15  # budget edits + status changes per campaign
    min_budget: int = 100  # minor units; set from the account's minimum_budgets
    daily_cap: int | None = None  # max sum of ad set daily budgets per account; None = no cap
    min_change_pct: float = 0.05  # no churn: a budget change must be >= 5% of the old budget ...
    min_change_abs: int = 100  # ... and >= 100 minor units
    max_changes_per_run: int = 200  # planned changes per account per run
    plan_window: timedelta = timedelta(hours=1)  # change ids are stable within this window
    # budget-neutral trims: when guardrails trim one side of a reallocation, the other side is
    # cut back so the account's net budget change stays the requested one (the optimizer's
    # apply step turns this on unless the settings say otherwise)
    keep_total: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.velocity_pct < 1.0:
            raise ValueError("velocity_pct must be in [0, 1)")
        if not 0.0 <= self.min_change_pct < 1.0:
            raise ValueError("min_change_pct must be in [0, 1)")
        for name in ("velocity_window", "plan_window"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        for name in (
            "max_budget_edits_per_hour",
            "max_campaign_actions_per_hour",
            "min_change_abs",
            "max_changes_per_run",
        ):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.min_budget < 1:
            raise ValueError("min_budget must be >= 1 minor unit")
        if self.daily_cap is not None and self.daily_cap < 0:
            raise ValueError("daily_cap must be >= 0 or None")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GuardrailConfig:
        """Build from a settings mapping (e.g. a ``data/accounts.yaml`` block).

        Keys are the field names; durations may also be given as ``<field>_hours`` numbers.
        Unknown keys raise ``ValueError`` so a typo never silently disables a guardrail.
        """
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key.endswith("_hours") and key[: -len("_hours")] in {
                "velocity_window",
                "plan_window",
            }:
                kwargs[key[: -len("_hours")]] = timedelta(hours=float(value))
            elif key in names:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown guardrail setting: {key}")
        return cls(**kwargs)

    def with_minimum_budgets(
        self, rows: Sequence[Mapping[str, Any]], currency: str
    ) -> GuardrailConfig:
        """Copy with ``min_budget`` taken from Graph ``minimum_budgets`` rows."""
        return replace(self, min_budget=min_budget_from_rows(rows, currency))


def min_budget_from_rows(rows: Sequence[Mapping[str, Any]], currency: str) -> int:
    """Minimum daily budget (minor units) from Graph ``GET /act_{id}/minimum_budgets`` rows.

    Takes the largest ``min_daily_budget*`` value of the currency's row, so the floor holds
    whatever the ad set optimizes for.
    """
    matching = [r for r in rows if str(r.get("currency", "")).upper() == currency.upper()]
    if not matching and len(rows) == 1 and "currency" not in rows[0]:
        matching = list(rows)
    values = [
        int(float(v))
        for r in matching
        for k, v in r.items()
        if k.startswith("min_daily_budget") and v is not None and str(v).strip() != ""
    ]
    if not values:
        raise ValueError(f"no minimum daily budget for currency {currency}")
    return max(values)


@dataclass(frozen=True)
class Violation:
    """One guardrail a plan row (or an account's plan) breaks."""

    rule: str
    account_id: str | None
    object_id: str | None
    change_id: str | None
    detail: str


# ----------------------------------------------------------------------------- helpers


def _as_utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def _utc_column(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    """Cast a datetime column to Datetime(us, UTC); naive values are taken as UTC."""
    dtype = frame.schema[name]
    if isinstance(dtype, pl.Datetime):
        expr = pl.col(name)
        expr = (
            expr.dt.replace_time_zone("UTC")
            if dtype.time_zone is None
            else expr.dt.convert_time_zone("UTC")
        )
        return frame.with_columns(expr.cast(UTC_US))
    return frame.with_columns(pl.col(name).cast(UTC_US))


def _config_of(
    config: GuardrailConfig | Mapping[str, GuardrailConfig], account: str
) -> GuardrailConfig:
    if isinstance(config, GuardrailConfig):
        return config
    if account not in config:
        raise ValueError(f"no GuardrailConfig for account {account}")
    return config[account]


def _config_frame(
    accounts: Sequence[str],
    config: GuardrailConfig | Mapping[str, GuardrailConfig],
    now: datetime,
) -> pl.DataFrame:
    """One row of guardrail settings per account (a loop over accounts, not ad sets)."""
    rows = []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for account in sorted(set(accounts)):
        c = _config_of(config, account)
        window_us = int(c.plan_window / timedelta(microseconds=1))
        now_us = (now - epoch) // timedelta(microseconds=1)
        rows.append(
            {
                "account_id": account,
                "velocity_bps": round(c.velocity_pct * _BPS),
                "velocity_window": c.velocity_window,
                "max_edits": int(c.max_budget_edits_per_hour),
                "max_campaign": int(c.max_campaign_actions_per_hour),
                "min_budget": int(c.min_budget),
                "daily_cap": None if c.daily_cap is None else int(c.daily_cap),
                "min_change_bps": round(c.min_change_pct * _BPS),
                "min_change_abs": int(c.min_change_abs),
                "max_per_run": int(c.max_changes_per_run),
                "keep_total": bool(c.keep_total),
                "window_start": epoch + timedelta(microseconds=(now_us // window_us) * window_us),
            }
        )
    schema = {
        "account_id": pl.String,
        "velocity_bps": pl.Int64,
        "velocity_window": pl.Duration("us"),
        "max_edits": pl.Int64,
        "max_campaign": pl.Int64,
        "min_budget": pl.Int64,
        "daily_cap": pl.Int64,
        "min_change_bps": pl.Int64,
        "min_change_abs": pl.Int64,
        "max_per_run": pl.Int64,
        "keep_total": pl.Boolean,
        "window_start": UTC_US,
    }
    return pl.DataFrame(rows, schema=schema)


def empty_history() -> pl.DataFrame:
    """An empty ``history`` frame with the columns the guardrails read."""
    return pl.DataFrame(schema=HISTORY_SCHEMA)


def _prepare_history(
    history: pl.DataFrame | None,
    now: datetime,
    object_campaigns: pl.DataFrame,
    exclude_change_ids: pl.Series | None = None,
) -> pl.LazyFrame:
    """Counted history rows: object_id, campaign_id, field, old_i, new_i, t (event time)."""
    if history is None or history.height == 0:
        history = empty_history()
    missing = {"object_id", "field", "old_value", "new_value", "applied_at", "status"} - set(
        history.columns
    )
    if missing:
        raise ValueError(f"history lacks columns {sorted(missing)}")
    h = _utc_column(history, "applied_at")
    if exclude_change_ids is not None and "change_id" in h.columns:
        # The plan's own rows (e.g. already marked sending) must not count against themselves.
        h = h.filter(~pl.col("change_id").is_in(exclude_change_ids.implode()))
    if "campaign_id" not in h.columns:
        h = h.with_columns(campaign_id=pl.lit(None, dtype=pl.String))
    h = (
        h.lazy()
        .filter(pl.col("status").is_in(COUNTED_STATUSES))
        .select(
            pl.col("object_id").cast(pl.String),
            pl.col("campaign_id").cast(pl.String),
            pl.col("field").cast(pl.String),
            old_i=pl.col("old_value").cast(pl.String).cast(pl.Int64, strict=False),
            new_i=pl.col("new_value").cast(pl.String).cast(pl.Int64, strict=False),
            t=pl.col("applied_at").fill_null(pl.lit(now, dtype=UTC_US)),
        )
    )
    return (
        h.join(object_campaigns.lazy().rename({"campaign_id": "_map"}), on="object_id", how="left")
        .with_columns(campaign_id=pl.coalesce("campaign_id", "_map"))
        .drop("_map")
    )


def _velocity_band(
    objs: pl.LazyFrame, hist: pl.LazyFrame, now: datetime, held: Sequence[str] = ("old_i",)
) -> pl.LazyFrame:
    """Add ``lo_vel``/``hi_vel``: the budgets reachable from every value held in the window.

    ``objs`` has object_id, velocity_bps, velocity_window and the ``held`` columns (budgets held
    now: the current budget, and for a re-check also the plan's old value). The values held during
    [now - window, now] are the current budget, the old and new value of every change applied in
    the window, and the budget at the window start reconstructed from history (new value of the
    last change before it). A new budget within +-p of each of them keeps every pair of budgets
    at most the window apart within +-p of the earlier one.
    """
    hb = hist.filter(pl.col("field") == FIELD_BUDGET).join(
        objs.select("object_id", "velocity_window"), on="object_id", how="inner"
    )
    in_window = pl.col("t") >= pl.lit(now, dtype=UTC_US) - pl.col("velocity_window")
    inside = hb.filter(in_window)
    before = hb.filter(~in_window).group_by("object_id").agg(v=pl.col("new_i").sort_by("t").last())
    values = pl.concat(
        [
            inside.select("object_id", v=pl.col("old_i")),
            inside.select("object_id", v=pl.col("new_i")),
            before.select("object_id", "v"),
        ]
    ).filter(pl.col("v").is_not_null())
    agg = values.group_by("object_id").agg(vmin=pl.col("v").min(), vmax=pl.col("v").max())
    out = objs.join(agg, on="object_id", how="left").with_columns(
        vmin=pl.min_horizontal("vmin", *held),
        vmax=pl.max_horizontal("vmax", *held),
    )
    bps = pl.col("velocity_bps")
    return out.with_columns(
        # ceil(vmax * (1 - p)) and floor(vmin * (1 + p)) in exact integer arithmetic
        lo_vel=-((-pl.col("vmax") * (_BPS - bps)) // _BPS),
        hi_vel=(pl.col("vmin") * (_BPS + bps)) // _BPS,
    ).drop("vmin", "vmax")


def _recent_counts(hist: pl.LazyFrame, now: datetime) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Budget edits per ad set and actions per campaign in the closed last hour."""
    recent = hist.filter(pl.col("t") >= pl.lit(now - HOUR, dtype=UTC_US))
    edits = (
        recent.filter(pl.col("field") == FIELD_BUDGET)
        .group_by("object_id")
        .agg(edits_count=pl.len().cast(pl.Int64))
    )
    actions = (
        recent.filter(pl.col("campaign_id").is_not_null())
        .group_by("campaign_id")
        .agg(campaign_count=pl.len().cast(pl.Int64))
    )
    return edits, actions


def _is_churn(old: pl.Expr, new: pl.Expr) -> pl.Expr:
    delta = (new - old).abs()
    return (delta < pl.col("min_change_abs")) | (delta * _BPS < old * pl.col("min_change_bps"))


def _nearest(granted: pl.Expr, wanted: pl.Expr, smallest: pl.Expr) -> pl.Expr:
    """A grant below the smallest real change goes to 0 or to that change, whichever is nearer."""
    partial = (granted > 0) & (granted < wanted) & (granted < smallest)
    return (
        pl.when(partial)
        .then(pl.when(2 * granted >= smallest).then(smallest).otherwise(0))
        .otherwise(granted)
    )


def _change_id() -> pl.Expr:
    """Stable ids: SHA-256 (not polars' hash, which may change between versions) of the key."""
    key = pl.concat_str(
        [
            "account_id",
            "object_type",
            "object_id",
            "field",
            "old_value",
            "new_value",
            pl.col("window_start").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        ],
        separator="|",
    )
    return key.map_batches(_sha256_32, return_dtype=pl.String).alias("change_id")


def _sha256_32(keys: pl.Series) -> pl.Series:
    # one C-level hashlib call per change; the set of changes per run is small
    return pl.Series(
        keys.name,
        [hashlib.sha256(k.encode()).hexdigest()[:32] for k in keys.to_list()],
        dtype=pl.String,
    )


def _rule_column(flags: Sequence[tuple[str, str]]) -> pl.Expr:
    """Comma-separated names of the set flag columns, null when none is set."""
    joined = pl.concat_str(
        [pl.when(pl.col(col)).then(pl.lit(name)) for name, col in flags],
        separator=",",
        ignore_nulls=True,
    )
    return pl.when(joined == "").then(None).otherwise(joined).alias("rule")


# ----------------------------------------------------------------------------- inputs


def _budget_requests(recommendations: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    need = {"adset_id", "account_id", "campaign_id", "recommended_budget"}
    missing = need - set(recommendations.columns)
    if missing:
        raise ValueError(f"recommendations lack columns {sorted(missing)}")
    recs = recommendations.select(
        object_id=pl.col("adset_id").cast(pl.String),
        account_id=pl.col("account_id").cast(pl.String),
        campaign_id=pl.col("campaign_id").cast(pl.String),
        rec_old=(
            pl.col("current_budget").cast(pl.Float64).round(0).cast(pl.Int64)
            if "current_budget" in recommendations.columns
            else pl.lit(None, dtype=pl.Int64)
        ),
        req_i=pl.col("recommended_budget").cast(pl.Float64).round(0).cast(pl.Int64),
    ).filter(pl.col("req_i").is_not_null())
    if recs["object_id"].is_duplicated().any():
        raise ValueError("recommendations have more than one row per adset_id")
    cur = _current_budgets(current)
    out = (
        recs.join(cur.drop("account_id", "campaign_id"), on="object_id", how="left")
        .with_columns(old_i=pl.coalesce("cur_budget", "rec_old"))
        .drop("cur_budget", "rec_old")
    )
    if out["old_i"].is_null().any():
        raise ValueError("no current budget for some recommended ad sets")
    return out.filter(pl.col("req_i") != pl.col("old_i"))


def _current_budgets(current: pl.DataFrame | None) -> pl.DataFrame:
    schema = {
        "object_id": pl.String,
        "account_id": pl.String,
        "campaign_id": pl.String,
        "cur_budget": pl.Int64,
    }
    if current is None or current.height == 0:
        return pl.DataFrame(schema=schema)
    return current.select(
        object_id=pl.col("adset_id").cast(pl.String),
        account_id=pl.col("account_id").cast(pl.String),
        campaign_id=pl.col("campaign_id").cast(pl.String),
        cur_budget=pl.col("daily_budget").cast(pl.Float64).round(0).cast(pl.Int64),
    ).unique("object_id", keep="last", maintain_order=True)


def _status_requests(ad_actions: pl.DataFrame | None) -> pl.DataFrame:
    schema = {
        "object_id": pl.String,
        "account_id": pl.String,
        "campaign_id": pl.String,
        "old_s": pl.String,
        "req_s": pl.String,
    }
    if ad_actions is None or ad_actions.height == 0:
        return pl.DataFrame(schema=schema)
    acts = ad_actions.select(
        object_id=pl.col("ad_id").cast(pl.String),
        account_id=pl.col("account_id").cast(pl.String),
        campaign_id=pl.col("campaign_id").cast(pl.String),
        old_s=(
            pl.col("current_status").cast(pl.String).fill_null("ACTIVE")
            if "current_status" in ad_actions.columns
            else pl.lit("ACTIVE")
        ),
        action=pl.col("action").cast(pl.String),
    ).filter(pl.col("action") == "kill")
    if acts["object_id"].is_duplicated().any():
        raise ValueError("ad_actions have more than one kill per ad_id")
    return (
        acts.with_columns(req_s=pl.lit("PAUSED"))
        .filter(pl.col("old_s") != pl.col("req_s"))
        .select(list(schema))
    )


# ----------------------------------------------------------------------------- planning


def plan_changes(
    recommendations: pl.DataFrame,
    current: pl.DataFrame,
    history: pl.DataFrame,
    *,
    now: datetime,
    config: GuardrailConfig | Mapping[str, GuardrailConfig],
    ad_actions: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Guarded change plan (``PLAN_SCHEMA``) for budget recommendations and ad kills.

    Budgets: floor at ``min_budget``, clip to the velocity band, then at most
    ``max_budget_edits_per_hour`` per ad set, no churn, at most ``max_campaign_actions_per_hour``
    per campaign (kills first, then larger budget moves), at most ``max_changes_per_run`` per
    account, and increases granted largest first from the headroom so an account's total never
    rises above ``daily_cap``; with ``keep_total`` the side of a reallocation that was trimmed less
    is granted (largest first) only as far as keeps the account's net budget change at the
    requested one (rule ``budget_neutral``). Each requested change yields exactly one row; trims
    keep the row ``planned`` with the trimmed value and name the rule; held-back rows are
    ``skipped`` with the rule.
    ``config`` is one config for all accounts or a mapping account_id -> config.
    """
    now = _as_utc(now)
    budgets = _budget_requests(recommendations, current)
    kills = _status_requests(ad_actions)
    cfg = _config_frame(
        budgets["account_id"].to_list() + kills["account_id"].to_list(), config, now
    )
    cur = _current_budgets(current)
    object_campaigns = pl.concat(
        [
            cur.select("object_id", "campaign_id"),
            budgets.select("object_id", "campaign_id"),
            kills.select("object_id", "campaign_id"),
        ]
    ).unique("object_id", keep="first", maintain_order=True)
    hist = _prepare_history(history, now, object_campaigns)
    edits, actions = _recent_counts(hist, now)

    # --- value rules on budgets: floor and velocity band, never past the request or reversed
    lcfg = cfg.lazy()
    b = _velocity_band(budgets.lazy().join(lcfg, on="account_id", how="left"), hist, now)
    lo = pl.max_horizontal("lo_vel", "min_budget", pl.min_horizontal("old_i", "req_i"))
    hi = pl.min_horizontal("hi_vel", pl.max_horizontal("old_i", "req_i"))
    b = (
        b.with_columns(_lo=lo, _hi=hi)
        .with_columns(
            new_i=pl.when(pl.col("_lo") > pl.col("_hi"))
            .then(pl.col("old_i"))
            .otherwise(pl.col("req_i").clip(pl.col("_lo"), pl.col("_hi"))),
            # name the bound that decided the value (both on a tie)
            f_min_budget=(pl.col("req_i") < pl.col("min_budget"))
            & (pl.col("min_budget") >= pl.col("lo_vel")),
            f_velocity=(
                (pl.col("req_i") < pl.col("lo_vel")) & (pl.col("lo_vel") >= pl.col("min_budget"))
            )
            | (pl.col("req_i") > pl.col("hi_vel")),
        )
        .join(edits, on="object_id", how="left")
        .with_columns(
            blocked=pl.col("new_i") == pl.col("old_i"),
            edits_full=pl.col("edits_count").fill_null(0) >= pl.col("max_edits"),
        )
        .with_columns(
            f_edits=~pl.col("blocked") & pl.col("edits_full"),
        )
        .with_columns(
            f_churn=~pl.col("blocked")
            & ~pl.col("f_edits")
            & _is_churn(pl.col("old_i"), pl.col("new_i")),
        )
        .select(
            "account_id",
            "campaign_id",
            "object_id",
            object_type=pl.lit(OBJECT_ADSET),
            field=pl.lit(FIELD_BUDGET),
            old_i="old_i",
            new_i="new_i",
            req_i="req_i",
            lo_vel="lo_vel",
            hi_vel="hi_vel",
            old_s=pl.col("old_i").cast(pl.String),
            req_s=pl.col("req_i").cast(pl.String),
            new_s=pl.lit(None, dtype=pl.String),
            f_min_budget="f_min_budget",
            f_velocity="f_velocity",
            f_edits="f_edits",
            f_churn="f_churn",
            candidate=~(pl.col("blocked") | pl.col("f_edits") | pl.col("f_churn")),
        )
    )
    s = kills.lazy().select(
        "account_id",
        "campaign_id",
        "object_id",
        object_type=pl.lit(OBJECT_AD),
        field=pl.lit(FIELD_STATUS),
        old_i=pl.lit(None, dtype=pl.Int64),
        new_i=pl.lit(None, dtype=pl.Int64),
        req_i=pl.lit(None, dtype=pl.Int64),
        lo_vel=pl.lit(None, dtype=pl.Int64),
        hi_vel=pl.lit(None, dtype=pl.Int64),
        old_s="old_s",
        req_s="req_s",
        new_s="req_s",
        f_min_budget=pl.lit(False),
        f_velocity=pl.lit(False),
        f_edits=pl.lit(False),
        f_churn=pl.lit(False),
        candidate=pl.lit(True),
    )
    u = pl.concat([b, s]).join(lcfg, on="account_id", how="left")

    # --- count limits: kills first, then the largest budget moves, ties by object id
    u = (
        u.join(actions, on="campaign_id", how="left")
        .with_columns(
            _kill=pl.col("field") == FIELD_STATUS,
            _size=(pl.col("new_i") - pl.col("old_i")).abs().fill_null(0),
        )
        .sort(
            ["account_id", "campaign_id", "_kill", "_size", "object_id"],
            descending=[False, False, True, True, False],
        )
        .with_columns(
            _rank_c=pl.col("candidate").cast(pl.Int64).cum_sum().over("account_id", "campaign_id")
        )
        .with_columns(
            f_campaign=pl.col("candidate")
            & (
                pl.col("_rank_c")
                > (pl.col("max_campaign") - pl.col("campaign_count").fill_null(0)).clip(0)
            )
        )
        .with_columns(candidate=pl.col("candidate") & ~pl.col("f_campaign"))
        .sort(["account_id", "_kill", "_size", "object_id"], descending=[False, True, True, False])
        .with_columns(_rank_a=pl.col("candidate").cast(pl.Int64).cum_sum().over("account_id"))
        .with_columns(f_run=pl.col("candidate") & (pl.col("_rank_a") > pl.col("max_per_run")))
        .with_columns(candidate=pl.col("candidate") & ~pl.col("f_run"))
    )

    # --- daily cap: the headroom left after planned decreases goes to increases, largest first
    delta = pl.col("new_i") - pl.col("old_i")
    is_budget = pl.col("field") == FIELD_BUDGET
    totals = pl.concat(
        [
            cur.lazy().select("object_id", "account_id", v="cur_budget"),
            b.select("object_id", "account_id", v="old_i"),
        ]
    ).unique("object_id", keep="first", maintain_order=True)
    totals = totals.group_by("account_id").agg(total=pl.col("v").sum())
    u = (
        u.join(totals, on="account_id", how="left")
        .sort(["account_id", "_kill", "_size", "object_id"], descending=[False, True, True, False])
        .with_columns(
            _dec=pl.when(pl.col("candidate") & is_budget & (delta < 0)).then(delta).otherwise(0),
            _inc=pl.when(pl.col("candidate") & is_budget & (delta > 0)).then(delta).otherwise(0),
        )
        .with_columns(
            _headroom=(
                pl.col("daily_cap") - pl.col("total") - pl.col("_dec").sum().over("account_id")
            ).clip(0),
            _inc_before=pl.col("_inc").cum_sum().over("account_id") - pl.col("_inc"),
        )
        .with_columns(
            _granted=(pl.col("_headroom") - pl.col("_inc_before")).clip(0, pl.col("_inc")),
        )
        .with_columns(
            f_cap=(pl.col("_inc") > 0)
            & pl.col("daily_cap").is_not_null()
            & (pl.col("_granted") < pl.col("_inc")),
        )
        .with_columns(
            new_i=pl.when(pl.col("f_cap"))
            .then(pl.col("old_i") + pl.col("_granted"))
            .otherwise(pl.col("new_i"))
        )
        .with_columns(
            # a cut-back increase must still be a real change inside the floor and the band
            # (the band may exclude the old value when the budget moved outside the optimizer)
            _cap_churn=pl.col("f_cap")
            & (
                (pl.col("new_i") == pl.col("old_i"))
                | _is_churn(pl.col("old_i"), pl.col("new_i"))
                | (pl.col("new_i") < pl.max_horizontal("lo_vel", "min_budget"))
                | (pl.col("new_i") > pl.col("hi_vel"))
            ),
        )
        .with_columns(
            f_churn=pl.col("f_churn")
            | (pl.col("_cap_churn") & _is_churn(pl.col("old_i"), pl.col("new_i"))),
            candidate=pl.col("candidate") & ~pl.col("_cap_churn"),
        )
    )

    # --- budget neutrality (keep_total): when trims left one side of a reallocation larger than
    # the request's net change allows, that side is granted largest first up to what keeps the
    # account's net change at the requested one (like the cap's headroom)
    d = pl.col("new_i") - pl.col("old_i")
    budget_candidate = pl.col("candidate") & is_budget
    u = (
        u.with_columns(
            _rq=pl.when(is_budget).then(pl.col("req_i") - pl.col("old_i")).otherwise(0),
            _up=pl.when(budget_candidate & (d > 0)).then(d).otherwise(0),
            _dn=pl.when(budget_candidate & (d < 0)).then(-d).otherwise(0),
        )
        .with_columns(
            _R=pl.col("_rq").sum().over("account_id"),
            _I=pl.col("_up").sum().over("account_id"),
            _D=pl.col("_dn").sum().over("account_id"),
            _up_before=pl.col("_up").cum_sum().over("account_id") - pl.col("_up"),
            _dn_before=pl.col("_dn").cum_sum().over("account_id") - pl.col("_dn"),
        )
        .with_columns(
            _dn_allow=pl.when(pl.col("keep_total") & (pl.col("_I") - pl.col("_D") < pl.col("_R")))
            .then((pl.col("_I") - pl.col("_R")).clip(0, pl.col("_D")))
            .otherwise(pl.col("_D")),
            _up_allow=pl.when(pl.col("keep_total") & (pl.col("_I") - pl.col("_D") > pl.col("_R")))
            .then((pl.col("_D") + pl.col("_R")).clip(0, pl.col("_I")))
            .otherwise(pl.col("_I")),
        )
        .with_columns(
            _dn_g=(pl.col("_dn_allow") - pl.col("_dn_before")).clip(0, pl.col("_dn")),
            _up_g=(pl.col("_up_allow") - pl.col("_up_before")).clip(0, pl.col("_up")),
            # the smallest real change of the row (no churn)
            _t=pl.max_horizontal(
                "min_change_abs", -((-pl.col("old_i") * pl.col("min_change_bps")) // _BPS)
            ),
        )
        .with_columns(
            # the one partly granted row rounds to the nearer of 0 and the smallest real change,
            # so the total is off by at most half of that, either way (no drift in one direction)
            _nearest(pl.col("_dn_g"), pl.col("_dn"), pl.col("_t")).alias("_dn_g"),
            _nearest(pl.col("_up_g"), pl.col("_up"), pl.col("_t")).alias("_up_g"),
        )
        .with_columns(
            f_neutral=(pl.col("_dn_g") < pl.col("_dn")) | (pl.col("_up_g") < pl.col("_up")),
        )
        .with_columns(
            new_i=pl.when(pl.col("f_neutral") & (d < 0))
            .then(pl.col("old_i") - pl.col("_dn_g"))
            .when(pl.col("f_neutral") & (d > 0))
            .then(pl.col("old_i") + pl.col("_up_g"))
            .otherwise(pl.col("new_i"))
        )
        .with_columns(
            # a cut-back change must still be a real change inside the floor and the band
            _neutral_held=pl.col("f_neutral")
            & (
                (pl.col("new_i") == pl.col("old_i"))
                | _is_churn(pl.col("old_i"), pl.col("new_i"))
                | (pl.col("new_i") < pl.max_horizontal("lo_vel", "min_budget"))
                | (pl.col("new_i") > pl.col("hi_vel"))
            ),
        )
        .with_columns(
            f_churn=pl.col("f_churn")
            | (pl.col("_neutral_held") & _is_churn(pl.col("old_i"), pl.col("new_i"))),
            candidate=pl.col("candidate") & ~pl.col("_neutral_held"),
        )
    )

    # --- assemble
    flags = [
        (RULE_MIN_BUDGET, "f_min_budget"),
        (RULE_VELOCITY, "f_velocity"),
        (RULE_BUDGET_EDITS, "f_edits"),
        (RULE_CAMPAIGN_ACTIONS, "f_campaign"),
        (RULE_MAX_PER_RUN, "f_run"),
        (RULE_DAILY_CAP, "f_cap"),
        (RULE_NEUTRAL, "f_neutral"),
        (RULE_MIN_CHANGE, "f_churn"),
    ]
    u = u.with_columns(
        _rule=_rule_column(flags),
        status=pl.when(pl.col("candidate")).then(pl.lit(PLANNED)).otherwise(pl.lit(SKIPPED)),
        new_value=pl.when(~pl.col("candidate"))
        .then(pl.col("old_s"))
        .when(is_budget)
        .then(pl.col("new_i").cast(pl.String))
        .otherwise(pl.col("new_s")),
    ).select(
        "account_id",
        "campaign_id",
        "object_id",
        "object_type",
        "field",
        old_value="old_s",
        new_value="new_value",
        requested_value="req_s",
        rule="_rule",
        status="status",
        planned_at=pl.lit(now, dtype=UTC_US),
        window_start="window_start",
    )
    u = u.sort(["account_id", "campaign_id", "object_type", "object_id"])
    return u.with_columns(_change_id()).select(list(PLAN_SCHEMA)).cast(PLAN_SCHEMA).collect()


# ----------------------------------------------------------------------------- verification


def check_plan(
    plan: pl.DataFrame,
    history: pl.DataFrame,
    now: datetime,
    config: GuardrailConfig | Mapping[str, GuardrailConfig],
    current: pl.DataFrame | None = None,
) -> list[Violation]:
    """Re-verify every guardrail for the ``planned`` rows of ``plan`` at time ``now``.

    Used by the blocking asset check and again just before sending. ``history`` may already hold
    the plan's own rows (they are excluded by ``change_id``). ``current`` (live ad sets, as for
    :func:`plan_changes`) is needed for the daily cap and to catch stale old values; without it
    a configured ``daily_cap`` raises ``ValueError`` rather than pass unchecked. Returns an empty
    list when the plan is safe to send.
    """
    now = _as_utc(now)
    p = plan.filter(pl.col("status") == PLANNED)
    if p.height == 0:
        return []
    cfg = _config_frame(p["account_id"].to_list(), config, now)
    if current is None and cfg["daily_cap"].is_not_null().any():
        raise ValueError("current is required to verify daily_cap")
    cur = _current_budgets(current)
    object_campaigns = pl.concat(
        [cur.select("object_id", "campaign_id"), p.select("object_id", "campaign_id")]
    ).unique("object_id", keep="first", maintain_order=True)
    hist = _prepare_history(history, now, object_campaigns, exclude_change_ids=p["change_id"])
    edits, actions = _recent_counts(hist, now)
    parts: list[pl.LazyFrame] = []

    def emit(frame: pl.LazyFrame, rule: str, detail: pl.Expr) -> None:
        parts.append(
            frame.select(
                rule=pl.lit(rule),
                account_id="account_id",
                object_id="object_id",
                change_id="change_id",
                detail=detail.cast(pl.String),
            )
        )

    p = (
        p.lazy()
        .join(cfg.lazy(), on="account_id", how="left")
        .with_columns(
            old_i=pl.col("old_value").cast(pl.Int64, strict=False),
            new_i=pl.col("new_value").cast(pl.Int64, strict=False),
        )
    )
    dup = p.filter(pl.struct("object_id", "field").is_duplicated())
    emit(dup, RULE_DUPLICATE, pl.lit("more than one planned change for this object and field"))

    is_budget = pl.col("field") == FIELD_BUDGET
    is_status = pl.col("field") == FIELD_STATUS
    bad = p.filter(
        ~(is_budget | is_status)
        | (is_budget & (pl.col("new_i").is_null() | pl.col("old_i").is_null()))
        | (is_status & ~pl.col("new_value").is_in(AD_STATUSES))
        | (pl.col("new_value") == pl.col("old_value"))
    )
    emit(bad, RULE_INVALID, pl.format("{} {} -> {}", "field", "old_value", "new_value"))

    b = p.filter(is_budget & pl.col("new_i").is_not_null() & pl.col("old_i").is_not_null())
    if current is not None:
        b = b.join(cur.lazy().select("object_id", "cur_budget"), on="object_id", how="left")
        emit(
            b.filter(
                pl.col("cur_budget").is_not_null() & (pl.col("cur_budget") != pl.col("old_i"))
            ),
            RULE_STALE,
            pl.format("planned from {} but the ad set now has {}", "old_i", "cur_budget"),
        )
    emit(
        b.filter(pl.col("new_i") < pl.col("min_budget")),
        RULE_MIN_BUDGET,
        pl.format("{} below minimum {}", "new_i", "min_budget"),
    )
    # the live budget, when known, is one of the values held in the window too
    band = _velocity_band(
        b, hist, now, ("old_i", "cur_budget") if current is not None else ("old_i",)
    )
    emit(
        band.filter((pl.col("new_i") < pl.col("lo_vel")) | (pl.col("new_i") > pl.col("hi_vel"))),
        RULE_VELOCITY,
        pl.format("{} outside [{}, {}]", "new_i", "lo_vel", "hi_vel"),
    )
    emit(
        b.filter(_is_churn(pl.col("old_i"), pl.col("new_i"))),
        RULE_MIN_CHANGE,
        pl.format("{} -> {} is below the minimum change", "old_i", "new_i"),
    )
    be = (
        b.join(edits, on="object_id", how="left")
        .with_columns(
            _n=pl.col("edits_count").fill_null(0) + pl.len().over("object_id").cast(pl.Int64)
        )
        .filter(pl.col("_n") > pl.col("max_edits"))
    )
    emit(be, RULE_BUDGET_EDITS, pl.format("{} budget edits within an hour", "_n"))
    pc = (
        p.join(actions, on="campaign_id", how="left")
        .with_columns(
            _n=pl.col("campaign_count").fill_null(0)
            + pl.len().over("account_id", "campaign_id").cast(pl.Int64)
        )
        .filter(pl.col("_n") > pl.col("max_campaign"))
    )
    emit(
        pc,
        RULE_CAMPAIGN_ACTIONS,
        pl.format("{} actions in campaign {} within an hour", "_n", "campaign_id"),
    )
    pr = p.with_columns(_n=pl.len().over("account_id").cast(pl.Int64)).filter(
        pl.col("_n") > pl.col("max_per_run")
    )
    emit(pr, RULE_MAX_PER_RUN, pl.format("{} planned changes in one run", "_n"))

    if current is not None:
        base = pl.concat(
            [
                cur.lazy().select("object_id", "account_id", v="cur_budget"),
                b.select("object_id", "account_id", v="old_i"),
            ]
        ).unique("object_id", keep="first", maintain_order=True)
        after = (
            base.join(b.select("object_id", "new_i"), on="object_id", how="left")
            .group_by("account_id")
            .agg(total_after=pl.coalesce("new_i", "v").sum())
        )
        cap = (
            b.filter(pl.col("new_i") > pl.col("old_i"))
            .join(after, on="account_id", how="left")
            .filter(
                pl.col("daily_cap").is_not_null() & (pl.col("total_after") > pl.col("daily_cap"))
            )
        )
        emit(
            cap,
            RULE_DAILY_CAP,
            pl.format("account total {} above cap {} with an increase", "total_after", "daily_cap"),
        )
    found = pl.concat(parts).collect()
    return [Violation(*r) for r in found.iter_rows()]
