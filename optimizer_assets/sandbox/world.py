"""The seeded sandbox world: ad accounts, ads with hidden true rates, clicks, leads and deals.

Time moves only in ``World.advance``. The world is simulated in whole hours, vectorized over
all ads with numpy; each hour's randomness comes from ``default_rng([seed, TAG, hour])`` so
the same seed gives the same world byte for byte and ``advance(24); advance(24)`` equals
``advance(48)``. Records (leads, contacts, deals and their whole stage paths) are drawn when
their click happens and carry timestamps; the frames show what is visible at ``now``.
Only per-ad *daily* aggregates are kept (not hourly), so 100 accounts x 1,000 ads fit.

Magnitudes (service business): CTR 0.4-4.5% (all clicks), CPM $8-25, click -> lead 2-18% (of
link clicks), lead -> deal 30-85%, deal -> won 15-65% (lead -> won about 10-35%), deal values
lognormal with means $5k-30k. Quality = shared creative-trait effects (identical in every
account, so cross-account learning has something real to find) + account effect + ad noise.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from optimizer_assets.sandbox import creatives as cr
from optimizer_assets.sandbox import people as pp
from optimizer_assets.sandbox.capi_ledger import (
    CapiLedger,
    IdentityIndex,
    build_identity_index,
    match_summary,
)
from optimizer_assets.sandbox.pipeline import (
    LOST,
    SHOW_UP,
    SLOTS,
    STAGE_LABELS,
    WON,
    draw_deal_paths,
    pipeline_objects,
    stage_at,
)

GRAPH_API_VERSION = "v24.0"
META_TOKEN = "sandbox-meta-token"
HUBSPOT_TOKEN = "sandbox-hubspot-token"
SIM_START = datetime(2026, 11, 1, tzinfo=UTC)
CURRENCY = "USD"
TIMEZONE = "UTC"

STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED")
ACTIVE, PAUSED, ARCHIVED, DELETED = range(4)
BUDGET_EDITS_PER_HOUR = 4
MAX_DAILY_OVERSPEND = 1.25  # Meta may spend up to 125% of the daily budget on one day

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MINUTE_MS = 60_000
_NO_TIME = np.iinfo(np.int32).max  # unused deal slot (seconds)

# Stream tags for np.random.default_rng([seed, tag, ...]): independent, stable streams.
_TAG_CATALOG, _TAG_TRAITS, _TAG_DRIFT, _TAG_HOUR = 11, 12, 13, 14

# Spend pacing by hour of day (peak in the evening), mean 1; CPM is a little higher at peak.
_HOURS = np.arange(24)
SPEND_DIURNAL = 1.0 + 0.6 * np.cos(2 * np.pi * (_HOURS - 20) / 24)
CPM_DIURNAL = 1.0 + 0.12 * np.cos(2 * np.pi * (_HOURS - 20) / 24)
FORMAT_CPM = np.array([1.0, 1.15, 1.05, 0.9])  # image, video, carousel, reel

# Source variants of a HubSpot contact (what survived of the link to the ad).
SOURCE_VARIANTS = (
    "click_id",  # first URL with utm_content=<ad_id> and fbclid, hs_facebook_click_id
    "campaign_utm",  # first URL with utm_campaign only
    "source_data",  # hs_analytics_source_data_1="facebook", _2=<campaign name>
    "paid_social_only",  # only hs_analytics_source="PAID_SOCIAL"
    "direct",  # came back by typing the address (cross-path contacts only)
    "lead_form",  # synced from a Meta lead form
)
_LOST_VARIANT_WEIGHTS = np.array([0.4, 0.3, 0.3])  # campaign_utm, source_data, paid_social_only
_CROSS_VARIANT_WEIGHTS = np.array([0.3, 0.25, 0.25, 0.2])  # the three above + direct


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the sandbox world; every default is the realistic baseline."""

    seed: int = 7
    accounts: int = 3
    ads_per_account: int = 24  # scale test: 1000
    ads_per_adset: int = 4
    adsets_per_campaign: int = 3
    start: datetime = SIM_START
    click_id_survival: float = 0.6  # share of landing-page contacts keeping fbclid/utm ad id
    lead_form_share: float = 0.3  # share of leads that come through Meta lead forms
    cross_path_share: float = 0.25  # lead-form people who later convert again via another path
    drift_at_hours: float | None = 360.0  # platform drift moment (hours after start)
    drift_strength: float = 0.5  # log CTR multiplier of the most-gaining hook type
    trait_strength: float = 1.0  # scales the shared creative-trait effects (0 = traits useless)
    account_spread: float = 1.0  # scales account effects on CTR and conversion rates
    min_daily_budget: int = 500  # minor units (cents): account minimum for ad set budgets
    budget_range: tuple[int, int] = (2000, 10000)  # initial ad set daily budgets (cents)
    pacing_noise: float = 0.25  # hourly log-sd of ad set delivery around its budget pace
    fatigue_rate: float = 0.25  # CTR factor 1 / (1 + rate * max(0, frequency - 1))
    audience_size: float = 12000.0  # median people an ad can reach (sets how fast it fatigues)
    pixel_seen_share: float = 0.7  # landing-page leads Meta's pixel reports as lead actions
    landing_phone_share: float = 0.8  # landing-page contacts that typed a phone number
    regress_share: float = 0.1  # deals that move back one stage once before going on
    initial_paused_share: float = 0.05  # ads paused at the start
    learning_reset_change: float = 0.3  # budget edits beyond +-30% restart the learning phase
    learning_hours: float = 72.0  # how long an ad set stays in learning after such an edit
    learning_cpm_penalty: float = 0.15  # CPM is 15% higher while an ad set is learning


class WorldError(Exception):
    """A refused mutation, carrying the Graph error fields the server puts in its envelope."""

    def __init__(
        self,
        code: int,
        subcode: int | None,
        message: str,
        http_status: int = 400,
        error_type: str = "OAuthException",
        is_transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode
        self.message = message
        self.http_status = http_status
        self.error_type = error_type
        self.is_transient = is_transient


def _unique_ints(
    rng: np.random.Generator, n: int, low: int, high: int, taken: set[int]
) -> np.ndarray:
    """n distinct ints in [low, high) not in ``taken`` (adds them to it); seeded, stable."""
    out = rng.integers(low, high, n, dtype=np.int64)
    while True:
        _, first = np.unique(out, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        dup |= np.isin(out, np.fromiter(taken, dtype=np.int64, count=len(taken)))
        if not dup.any():
            break
        out[dup] = rng.integers(low, high, int(dup.sum()), dtype=np.int64)
    taken.update(out.tolist())
    return out


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _ids(values: np.ndarray) -> np.ndarray:
    """Digit-string ids from int64s (numpy; for the catalog)."""
    return np.asarray(values, dtype=np.int64).astype(str)


def _id_series(values: np.ndarray) -> pl.Series:
    """Digit-string ids from int64s as a polars Series (fast and compact for records)."""
    return pl.Series(np.asarray(values, dtype=np.int64)).cast(pl.Utf8)


_UTC = pl.Datetime("us", "UTC")
# Column contracts of the record frames (the empty world returns the same schemas).
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "leads": {
        "lead_id": pl.Utf8, "created_time": _UTC, "ad_id": pl.Utf8, "adset_id": pl.Utf8,
        "campaign_id": pl.Utf8, "form_id": pl.Utf8, "account_id": pl.Utf8, "email": pl.Utf8,
        "phone": pl.Utf8, "full_name": pl.Utf8,
    },
    "contacts": {
        "contact_id": pl.Utf8, "createdate": _UTC, "lastmodifieddate": _UTC, "email": pl.Utf8,
        "phone": pl.Utf8, "firstname": pl.Utf8, "lastname": pl.Utf8,
        "hs_analytics_source": pl.Utf8, "hs_analytics_source_data_1": pl.Utf8,
        "hs_analytics_source_data_2": pl.Utf8, "hs_analytics_first_url": pl.Utf8,
        "hs_facebook_click_id": pl.Utf8,
    },
    "deals": {
        "deal_id": pl.Utf8, "dealname": pl.Utf8, "amount": pl.Float64, "dealstage": pl.Utf8,
        "pipeline": pl.Utf8, "closedate": _UTC, "createdate": _UTC, "hs_lastmodifieddate": _UTC,
    },
    "deal_contacts": {"deal_id": pl.Utf8, "contact_id": pl.Utf8},
    "deal_stage_history": {
        "deal_id": pl.Utf8, "dealstage": pl.Utf8, "stage_label": pl.Utf8, "occurred_at": _UTC,
    },
    "insights": {
        "date_start": pl.Date, "ad_id": pl.Utf8, "adset_id": pl.Utf8, "campaign_id": pl.Utf8,
        "account_id": pl.Utf8, "spend": pl.Float64, "impressions": pl.Int64, "reach": pl.Int64,
        "clicks": pl.Int64, "inline_link_clicks": pl.Int64, "leads": pl.Int64,
    },
    "truth_contacts": {
        "contact_id": pl.Utf8, "true_ad_id": pl.Utf8, "person_id": pl.Int64, "path": pl.Utf8,
        "kept_click_id": pl.Boolean, "account_id": pl.Utf8, "source_variant": pl.Utf8,
        "lead_id": pl.Utf8, "click_time": _UTC, "createdate": _UTC,
    },
    "truth_deals": {
        "deal_id": pl.Utf8, "contact_id": pl.Utf8, "true_ad_id": pl.Utf8, "account_id": pl.Utf8,
        "value_if_won": pl.Float64, "person_id": pl.Int64, "final_stage": pl.Utf8,
        "closes_at": _UTC,
    },
    "truth_ads_daily": {
        "date": pl.Date, "ad_id": pl.Utf8, "account_id": pl.Utf8, "true_ctr": pl.Float64,
        "true_click_to_lead": pl.Float64, "true_lead_to_deal": pl.Float64,
        "true_deal_to_won": pl.Float64, "mean_deal_value": pl.Float64, "frequency": pl.Float64,
        "true_value_per_impression": pl.Float64,
    },
}  # fmt: skip


def _conform(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    """Select and cast a frame to its contract in SCHEMAS (stable even when empty)."""
    return frame.select(pl.col(c).cast(t) for c, t in SCHEMAS[name].items())


_DAY_FIELDS = ("idx", "spend_cents", "impressions", "reach", "clicks", "link_clicks", "leads")


@dataclass
class _Day:
    """Per-ad aggregates of one simulated day (rows only for ads with impressions)."""

    day: int
    idx: np.ndarray
    spend_cents: np.ndarray
    impressions: np.ndarray
    reach: np.ndarray
    clicks: np.ndarray
    link_clicks: np.ndarray
    leads: np.ndarray
    true_ctr: np.ndarray  # all ads: impression-weighted true CTR of the day
    frequency: np.ndarray  # all ads: cumulative impressions / reach at the end of the day


class World:
    """Seeded simulation of Meta ad accounts feeding one HubSpot portal (see module doc).

    Public API (INTERFACES.md) plus: ``hours_elapsed``, ``counts()``, ``object_kind(id)``,
    ``update_campaign(id, status=)``, ``deal_stage_history()``, ``capi_events()`` and the
    ``trait_effects`` dict. Extra columns: accounts.vertical, campaigns.form_id,
    adsets.effective_status/updated_time/learning_stage, ads.effective_status/updated_time,
    truth_contacts.account_id/source_variant/lead_id/click_time/createdate,
    truth_deals.person_id/final_stage/closes_at, truth_ads_daily.true_deal_to_won/
    frequency/true_value_per_impression. Frames are cached until the next advance/mutation;
    treat them as read-only.
    """

    def __init__(self, config: WorldConfig = WorldConfig()) -> None:  # noqa: B008
        self.config = config
        self._now_ms = 0
        self._hours_done = 0
        self._cache: dict[Any, Any] = {}
        self._catalog_cache: dict[Any, Any] = {}
        self._pl_catalog: dict[str, pl.Series] = {}
        self._build_catalog()
        self._days: list[_Day] = []
        self._chunks: list[dict[str, np.ndarray]] = []
        self._n_people = 0
        self._budget_edits: dict[int, deque[int]] = {}
        self._budget_blocked_until: dict[int, int] = {}
        self._capi = CapiLedger()
        self._reset_day_accumulators()

    # ------------------------------------------------------------------ catalog construction
    def _build_catalog(self) -> None:
        cfg = self.config
        if cfg.accounts < 1 or cfg.ads_per_account < 1 or cfg.ads_per_adset < 1:
            raise ValueError("accounts, ads_per_account and ads_per_adset must be >= 1")
        rng = np.random.default_rng([cfg.seed, _TAG_CATALOG])
        n_acc = cfg.accounts
        ads_acc = cfg.ads_per_account
        sets_acc = -(-ads_acc // cfg.ads_per_adset)
        camps_acc = -(-sets_acc // cfg.adsets_per_campaign)
        n_ads, n_sets, n_camps = n_acc * ads_acc, n_acc * sets_acc, n_acc * camps_acc
        self.n_accounts, self.n_ads, self.n_adsets, self.n_campaigns = n_acc, n_ads, n_sets, n_camps

        acc_of_ad = np.repeat(np.arange(n_acc), ads_acc)
        self._ad_account = acc_of_ad.astype(np.int32)
        self._ad_adset = (
            acc_of_ad * sets_acc + np.tile(np.arange(ads_acc) // cfg.ads_per_adset, n_acc)
        ).astype(np.int32)
        self._adset_account = np.repeat(np.arange(n_acc), sets_acc).astype(np.int32)
        self._adset_campaign = (
            self._adset_account * camps_acc
            + np.tile(np.arange(sets_acc) // cfg.adsets_per_campaign, n_acc)
        ).astype(np.int32)
        self._campaign_account = np.repeat(np.arange(n_acc), camps_acc).astype(np.int32)
        self._ad_campaign = self._adset_campaign[self._ad_adset]

        # ids: accounts 10 digits; every other Graph object 15 digits from one pool
        taken: set[int] = set()
        self._account_ids = _ids(_unique_ints(rng, n_acc, 10**9, 10**10, taken))
        pool = _unique_ints(rng, n_camps * 2 + n_sets + n_ads + n_acc, 10**14, 10**15, taken)
        cuts = np.cumsum([n_camps, n_sets, n_ads, n_acc])
        camp_ids, set_ids, ad_ids, pixel_ids, form_ids = np.split(pool, cuts)
        self._campaign_ids, self._adset_ids, self._ad_ids = (
            _ids(camp_ids),
            _ids(set_ids),
            _ids(ad_ids),
        )
        self._pixel_ids, self._form_ids = _ids(pixel_ids), _ids(form_ids)  # one form per campaign
        hub = _unique_ints(rng, n_acc * 6, 10**8, 10**9, taken)
        self._pipeline_ids = _ids(hub[:n_acc])
        self._stage_ids = _ids(hub[n_acc:]).reshape(n_acc, 5)
        self._lead_id_base = int(rng.integers(10**15, 2 * 10**15))
        self._lead_id_step = int(rng.integers(101, 997))
        self._contact_id_base = int(rng.integers(10**10, 5 * 10**10))
        self._deal_id_base = int(rng.integers(5 * 10**10, 9 * 10**10))
        self._id_index = {
            **{v: ("account", i) for i, v in enumerate(self._account_ids)},
            **{v: ("campaign", i) for i, v in enumerate(self._campaign_ids)},
            **{v: ("adset", i) for i, v in enumerate(self._adset_ids)},
            **{v: ("ad", i) for i, v in enumerate(self._ad_ids)},
            **{v: ("pixel", i) for i, v in enumerate(self._pixel_ids)},
            **{v: ("form", i) for i, v in enumerate(self._form_ids)},
        }

        # accounts: vertical, brand, CPM level, account effects
        self._acc_vertical = rng.integers(0, len(cr.VERTICAL_NAMES), n_acc)
        brand = rng.integers(0, len(cr.BRAND_WORDS), n_acc)
        city = rng.integers(0, len(cr.CITIES), n_acc)
        self._account_names = np.array(
            [
                f"{cr.BRAND_WORDS[brand[i]]} {cr.VERTICAL_NAMES[self._acc_vertical[i]].title()}"
                f" {cr.CITIES[city[i]]}"
                for i in range(n_acc)
            ]
        )
        self._acc_cpm = np.exp(rng.uniform(math.log(9.0), math.log(21.0), n_acc))
        spread = cfg.account_spread
        acc_ctr, acc_c2l, acc_l2d, acc_won = rng.normal(0, 0.2 * spread, (4, n_acc))
        typical_value = np.array([cr.VERTICALS[v][5] for v in cr.VERTICAL_NAMES])
        acc_value = typical_value[self._acc_vertical] * rng.lognormal(0, 0.15, n_acc)

        # shared creative-trait effects (same in every account)
        trng = np.random.default_rng([cfg.seed, _TAG_TRAITS])
        ts = cfg.trait_strength
        n_h, n_f, n_c, n_e = len(cr.HOOK_TYPES), len(cr.FORMATS), len(cr.CTAS), len(cr.EMOTIONS)
        hook_ctr = trng.normal(0, 0.3, n_h)
        fmt_ctr = trng.normal(0, 0.2, n_f)
        emo_ctr = trng.normal(0, 0.15, n_e)
        cta_ctr = trng.normal(0, 0.05, n_c)
        cta_c2l = trng.normal(0, 0.25, n_c)
        hook_c2l = trng.normal(0, 0.12, n_h)
        emo_c2l = trng.normal(0, 0.1, n_e)
        # click-bait hooks bring worse leads: quality partly opposes CTR
        hook_l2d = -0.5 * hook_ctr + trng.normal(0, 0.12, n_h)
        emo_l2d = trng.normal(0, 0.15, n_e)
        hook_won = trng.normal(0, 0.15, n_h)
        hook_val = trng.normal(0, 0.12, n_h)
        fmt_val = trng.normal(0, 0.06, n_f)
        self.trait_effects = {
            "ctr": {"hook_type": hook_ctr, "format": fmt_ctr, "emotion": emo_ctr, "cta": cta_ctr},
            "click_to_lead": {"cta": cta_c2l, "hook_type": hook_c2l, "emotion": emo_c2l},
            "lead_to_deal": {"hook_type": hook_l2d, "emotion": emo_l2d},
            "deal_to_won": {"hook_type": hook_won},
            "log_value": {"hook_type": hook_val, "format": fmt_val},
        }

        # ads: traits, copy, hidden true rates
        hook = rng.integers(0, n_h, n_ads)
        fmt = rng.choice(n_f, n_ads, p=[0.4, 0.3, 0.15, 0.15])
        cta = rng.integers(0, n_c, n_ads)
        emo = rng.integers(0, n_e, n_ads)
        self._ad_hook, self._ad_format, self._ad_cta, self._ad_emotion = hook, fmt, cta, emo
        a = acc_of_ad
        noise = rng.normal(0, 1, (5, n_ads))
        self._ctr_base = np.clip(
            _expit(
                _logit(0.015)
                + ts * (hook_ctr[hook] + fmt_ctr[fmt] + emo_ctr[emo] + cta_ctr[cta])
                + acc_ctr[a]
                + 0.3 * noise[0]
            ),
            0.004,
            0.045,
        )
        self._c2l = np.clip(
            _expit(
                _logit(0.075)
                + ts * (cta_c2l[cta] + hook_c2l[hook] + emo_c2l[emo])
                + acc_c2l[a]
                + 0.25 * noise[1]
            ),
            0.02,
            0.18,
        )
        self._l2d = np.clip(
            _expit(
                _logit(0.55) + ts * (hook_l2d[hook] + emo_l2d[emo]) + acc_l2d[a] + 0.2 * noise[2]
            ),
            0.3,
            0.85,
        )
        self._d2w = np.clip(
            _expit(_logit(0.42) + ts * hook_won[hook] + acc_won[a] + 0.2 * noise[3]), 0.15, 0.65
        )
        self._val_sigma = rng.uniform(0.3, 0.45, n_ads)
        mean_value = np.clip(
            acc_value[a] * np.exp(ts * (hook_val[hook] + fmt_val[fmt]) + 0.1 * noise[4]),
            5000.0,
            30000.0,
        )
        self._val_mu = np.log(mean_value) - self._val_sigma**2 / 2
        self._link_share = rng.uniform(0.7, 0.9, n_ads)
        self._audience = cfg.audience_size * rng.lognormal(0, 0.6, n_ads)

        vert_of_ad = self._acc_vertical[a]
        titles, bodies = cr.ad_copy(rng, vert_of_ad, hook, emo, cta)
        self._ad_titles, self._ad_bodies = np.array(titles), np.array(bodies)
        self._ad_names = np.array(
            [
                f"{cr.HOOK_TYPES[hook[i]]}-{cr.FORMATS[fmt[i]]}-{cr.EMOTIONS[emo[i]]}"
                f" #{i % ads_acc + 1}"
                for i in range(n_ads)
            ]
        )
        audience = rng.integers(0, len(cr.AUDIENCES), n_sets)
        self._adset_names = np.array(
            [f"{cr.AUDIENCES[audience[i]]} | AS{i % sets_acc + 1:03d}" for i in range(n_sets)]
        )
        self._campaign_names = np.array(
            [
                f"{cr.VERTICALS[cr.VERTICAL_NAMES[self._acc_vertical[self._campaign_account[i]]]][0].title()}"
                f" | Leads | C{i % camps_acc + 1:02d}"
                for i in range(n_camps)
            ]
        )

        # creation times (before the start) and the exposure history they imply
        start_ms = 0
        camp_age = rng.uniform(30, 150, n_camps) * DAY_MS
        set_age = camp_age[self._adset_campaign] * rng.uniform(0.5, 1.0, n_sets)
        ad_age = set_age[self._ad_adset] * rng.uniform(0.05, 1.0, n_ads)
        self._campaign_created = (start_ms - camp_age).astype(np.int64) // 1000 * 1000
        self._adset_created = (start_ms - set_age).astype(np.int64) // 1000 * 1000
        self._ad_created = (start_ms - ad_age).astype(np.int64) // 1000 * 1000
        lo, hi = cfg.budget_range
        budget = np.exp(rng.uniform(math.log(lo), math.log(hi), n_sets))
        self._budget = (np.round(budget / 100) * 100).astype(np.int64)
        per_ad_dollars = self._budget[self._ad_adset] / 100 / cfg.ads_per_adset
        est_daily_imps = per_ad_dollars / self._acc_cpm[a] * 1000
        self._cum_imps = ad_age / DAY_MS * est_daily_imps * rng.uniform(0.1, 0.6, n_ads)
        self._cum_reach = self._audience * -np.expm1(-self._cum_imps / self._audience)

        self._campaign_status = np.zeros(n_camps, dtype=np.int8)
        self._adset_status = np.zeros(n_sets, dtype=np.int8)
        self._ad_status = np.where(rng.random(n_ads) < cfg.initial_paused_share, PAUSED, ACTIVE)
        self._ad_status = self._ad_status.astype(np.int8)
        self._adset_updated = self._adset_created.copy()
        self._learning_until = np.full(n_sets, -1, dtype=np.int64)  # ms; all start learned
        self._ad_updated = self._ad_created.copy()

        # platform drift: hook types shift CTR by exp(strength * z), z spread over [-1, 1]
        drng = np.random.default_rng([cfg.seed, _TAG_DRIFT])
        z = drng.permutation(np.linspace(-1.0, 1.0, n_h))
        self._drift_hook_mult = np.exp(cfg.drift_strength * z)
        self._drift_hour = None if cfg.drift_at_hours is None else float(cfg.drift_at_hours)

        # per-day state drawn at each day's first hour
        self._spent_today = np.zeros(n_sets, dtype=np.int64)
        self._day_pacing = np.ones(n_sets)
        self._day_cpm = np.ones(n_acc)

    def _reset_day_accumulators(self) -> None:
        n = self.n_ads
        self._acc_spend = np.zeros(n, dtype=np.int64)
        self._acc_imps = np.zeros(n, dtype=np.int64)
        self._acc_clicks = np.zeros(n, dtype=np.int64)
        self._acc_link = np.zeros(n, dtype=np.int64)
        self._acc_leads = np.zeros(n, dtype=np.int64)
        self._acc_ctr_imps = np.zeros(n)

    # ------------------------------------------------------------------ clock
    @property
    def now(self) -> datetime:
        """Simulated UTC clock."""
        return self.config.start + timedelta(milliseconds=self._now_ms)

    @property
    def hours_elapsed(self) -> float:
        """Simulated hours since the start."""
        return self._now_ms / HOUR_MS

    def advance(self, hours: float) -> None:
        """Move the clock; simulates every hour that has started by the new time."""
        if not math.isfinite(hours) or hours < 0:
            raise ValueError("hours must be a finite number >= 0")
        self._now_ms += round(hours * HOUR_MS)
        while self._hours_done * HOUR_MS < self._now_ms:
            self._simulate_hour(self._hours_done)
            self._hours_done += 1
        self._cache.clear()
        self._catalog_cache.pop("adsets", None)  # learning_stage depends on the clock

    # ------------------------------------------------------------------ hourly dynamics
    def _ctr_now(self, hour: int) -> np.ndarray:
        """True CTR of every ad in this hour: base x drift x fatigue."""
        freq = self._cum_imps / np.maximum(self._cum_reach, 1e-9)
        fatigue = 1.0 / (1.0 + self.config.fatigue_rate * np.maximum(0.0, freq - 1.0))
        ctr = self._ctr_base * fatigue
        if self._drift_hour is not None and hour >= self._drift_hour:
            ctr = ctr * self._drift_hook_mult[self._ad_hook]
        return np.minimum(ctr, 0.2)

    def _simulate_hour(self, hour: int) -> None:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, _TAG_HOUR, hour])
        hod = hour % 24
        if hod == 0:
            self._spent_today[:] = 0
            self._day_pacing = _lognoise(rng, 0.08, self.n_adsets)
            self._day_cpm = _lognoise(rng, 0.06, self.n_accounts)

        camp_on = self._campaign_status == ACTIVE
        set_on = (self._adset_status == ACTIVE) & camp_on[self._adset_campaign]
        ad_on = (self._ad_status == ACTIVE) & set_on[self._ad_adset]
        ctr = self._ctr_now(hour)

        # ad set spend this hour: budget pacing with noise, capped at 125% of budget per day
        budget = self._budget
        target = budget * (SPEND_DIURNAL[hod] / 24.0) * self._day_pacing
        target = np.floor(target * _lognoise(rng, cfg.pacing_noise, self.n_adsets)).astype(np.int64)
        cap = np.floor(MAX_DAILY_OVERSPEND * budget).astype(np.int64) - self._spent_today
        set_cents = np.where(set_on, np.clip(target, 0, np.maximum(cap, 0)), 0)

        # split over the set's active ads, favouring high-CTR ads like Meta's delivery does
        weight = np.where(ad_on, ctr * ctr * _lognoise(rng, 0.3, self.n_ads), 0.0)
        wsum = np.bincount(self._ad_adset, weights=weight, minlength=self.n_adsets)
        act = np.flatnonzero(weight > 0)  # only serving ads draw anything below
        a_set, a_acc = self._ad_adset[act], self._ad_account[act]
        cents = np.floor(set_cents[a_set] * (weight[act] / wsum[a_set]))
        cpm = (
            self._acc_cpm[a_acc]
            * self._day_cpm[a_acc]
            * CPM_DIURNAL[hod]
            * FORMAT_CPM[self._ad_format[act]]
            * np.where(
                self._learning_until[a_set] > hour * HOUR_MS, 1.0 + cfg.learning_cpm_penalty, 1.0
            )
        )
        imps = _poisson(rng, cents * (10.0 / cpm))
        cents = np.where(imps > 0, cents, 0).astype(np.int64)  # billed per impression
        # Poisson splitting: clicks ~ Poisson(imps x ctr) split into leads / other link clicks /
        # non-link clicks (exact thinning; binomial(imps, ctr) ~ Poisson for ctr << 1)
        mu = imps * ctr[act]
        ls, c2l = self._link_share[act], self._c2l[act]
        leads = _poisson(rng, mu * ls * c2l)
        link = leads + _poisson(rng, mu * ls * (1.0 - c2l))
        clicks = link + _poisson(rng, mu * (1.0 - ls))

        self._spent_today += np.bincount(a_set, weights=cents, minlength=self.n_adsets).astype(
            np.int64
        )
        aud, reach = self._audience[act], self._cum_reach[act]
        self._cum_reach[act] = reach + (aud - reach) * -np.expm1(-imps / aud)
        self._cum_imps[act] += imps
        self._acc_spend[act] += cents
        self._acc_imps[act] += imps
        self._acc_clicks[act] += clicks
        self._acc_link[act] += link
        self._acc_ctr_imps[act] += mu

        if leads.any():
            nz = np.flatnonzero(leads)
            lead_ad = np.repeat(act[nz], leads[nz]).astype(np.int32)
            chunk = self._draw_people(rng, hour, lead_ad)
            self._acc_leads += np.bincount(
                lead_ad, weights=chunk["reported"], minlength=self.n_ads
            ).astype(np.int64)
            self._chunks.append(chunk)
        if hod == 23:
            self._close_day(hour // 24, ctr)

    def _close_day(self, day: int, ctr_end: np.ndarray) -> None:
        self._days.append(self._snapshot_day(day, ctr_end))
        self._reset_day_accumulators()

    def _snapshot_day(self, day: int, ctr_end: np.ndarray | None) -> _Day:
        """Compact per-ad rows of the running day; truth arrays only when ``ctr_end`` given."""
        imps = self._acc_imps
        idx = np.flatnonzero(imps > 0).astype(np.int32)
        aud = self._audience[idx]
        reach = np.minimum(imps[idx], np.maximum(1, np.round(aud * -np.expm1(-imps[idx] / aud))))
        if ctr_end is None:
            true_ctr = frequency = np.zeros(0, dtype=np.float32)
        else:
            true_ctr = np.divide(self._acc_ctr_imps, imps, out=ctr_end.copy(), where=imps > 0)
            true_ctr = true_ctr.astype(np.float32)
            frequency = (self._cum_imps / np.maximum(self._cum_reach, 1e-9)).astype(np.float32)
        return _Day(
            day=day,
            idx=idx,
            spend_cents=self._acc_spend[idx].astype(np.int32),
            impressions=imps[idx].astype(np.int32),
            reach=reach.astype(np.int32),
            clicks=self._acc_clicks[idx].astype(np.int32),
            link_clicks=self._acc_link[idx].astype(np.int32),
            leads=self._acc_leads[idx].astype(np.int32),
            true_ctr=true_ctr,
            frequency=frequency,
        )

    def _draw_people(self, rng: np.random.Generator, hour: int, lead_ad: np.ndarray) -> dict:
        """Every lead is a new person: identity, path into HubSpot, and (maybe) a deal."""
        cfg = self.config
        m = len(lead_ad)
        pid = np.arange(self._n_people, self._n_people + m, dtype=np.int64)
        self._n_people += m
        click_ms = hour * HOUR_MS + rng.integers(0, HOUR_MS, m)
        lead_form = rng.random(m) < cfg.lead_form_share
        lead_ms = click_ms + rng.integers(MINUTE_MS // 2, 6 * MINUTE_MS, m)
        c1_ms = np.where(
            lead_form,
            lead_ms + rng.integers(MINUTE_MS, 15 * MINUTE_MS, m),
            click_ms + rng.integers(2 * MINUTE_MS, 30 * MINUTE_MS, m),
        )
        kept = ~lead_form & (rng.random(m) < cfg.click_id_survival)
        lost_variant = 1 + pp.pick(rng, _LOST_VARIANT_WEIGHTS, m)
        variant = np.where(lead_form, 5, np.where(kept, 0, lost_variant)).astype(np.int8)
        reported = lead_form | (rng.random(m) < cfg.pixel_seen_share)
        person = pp.draw_people(rng, m)
        lead_phone_style = pp.draw_phone_styles(rng, m, lead_form=True)
        form_phone_style = pp.draw_phone_styles(rng, m, lead_form=False)
        has_phone = rng.random(m) < cfg.landing_phone_share
        c1_phone_style = np.where(
            lead_form, lead_phone_style, np.where(has_phone, form_phone_style, -1)
        )
        lead_email_case = np.where(rng.random(m) < 0.9, 0, pp.draw_email_cases(rng, m)).astype(
            np.int8
        )
        form_email_case = pp.draw_email_cases(rng, m)
        c1_email_case = np.where(lead_form, lead_email_case, form_email_case).astype(np.int8)

        cross = lead_form & (rng.random(m) < cfg.cross_path_share)
        cross_ms = lead_ms + rng.integers(HOUR_MS, 6 * DAY_MS, m)
        cross_by_phone = rng.random(m) < 0.5  # else by email
        shift = rng.integers(1, pp.N_PHONE_STYLES, m)
        cross_phone_style = np.where(
            cross_by_phone, (c1_phone_style + shift) % pp.N_PHONE_STYLES, -1
        ).astype(np.int8)
        case_shift = rng.integers(1, pp.N_EMAIL_CASES, m)
        cross_email_case = ((c1_email_case + case_shift) % pp.N_EMAIL_CASES).astype(np.int8)
        cross_variant = (1 + pp.pick(rng, _CROSS_VARIANT_WEIGHTS, m)).astype(np.int8)

        has_deal = rng.random(m) < self._l2d[lead_ad]
        deal_contact_ms = np.where(cross, cross_ms, c1_ms)
        deal_lag = np.minimum(0.02 + rng.exponential(12.0, m), 48.0)
        deal_t0 = deal_contact_ms + (deal_lag * HOUR_MS).astype(np.int64)
        stages, times = draw_deal_paths(rng, self._d2w[lead_ad], deal_t0, cfg.regress_share)
        value = rng.lognormal(self._val_mu[lead_ad], self._val_sigma[lead_ad])
        value = np.round(value / 50.0) * 50.0
        fbclid = pp.draw_fbclid_words(rng, m)

        d = has_deal
        return {
            "pid": pid,
            "ad": lead_ad,
            "click_ms": click_ms,
            "lead_form": lead_form,
            "lead_ms": lead_ms,
            "c1_ms": c1_ms,
            "variant": variant,
            "reported": reported,
            "c1_phone_style": c1_phone_style.astype(np.int8),
            "c1_email_case": c1_email_case,
            "cross": cross,
            "cross_ms": cross_ms,
            "cross_by_phone": cross_by_phone,
            "cross_phone_style": cross_phone_style,
            "cross_email_case": cross_email_case,
            "cross_variant": cross_variant,
            "fbclid": fbclid,
            **{f"p_{k}": v for k, v in person.items()},
            "has_deal": has_deal,
            # deals (only rows with a deal)
            "deal_pid": pid[d],
            "deal_stages": stages[d],
            # seconds since start (int32 halves the largest per-record array)
            "deal_times": np.where(stages[d] >= 0, times[d] // 1000, _NO_TIME).astype(np.int32),
            "deal_value": value[d],
        }

    # ------------------------------------------------------------------ record tables
    def _people(self) -> dict[str, np.ndarray]:
        """All simulated people (including not-yet-visible ones), concatenated and cached."""
        key = ("people", self._hours_done)
        if key not in self._cache:
            if self._chunks:
                keys = self._chunks[0].keys()
                merged = {k: np.concatenate([c[k] for c in self._chunks]) for k in keys}
                self._chunks = [merged]  # keep one copy, not chunks + merged
                self._cache[key] = merged
            else:
                self._cache[key] = _empty_people()
        return self._cache[key]

    def _cached(self, key: str, build) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _dt(self, ms: np.ndarray) -> pl.Series:
        """ms since start -> UTC datetimes."""
        base = int(self.config.start.timestamp() * 1000)
        return (
            pl.Series(np.asarray(ms, dtype=np.int64) + base)
            .cast(pl.Datetime("ms"))
            .cast(pl.Datetime("us"))
            .dt.replace_time_zone("UTC")
        )

    def _lead_ids(self, pid: np.ndarray) -> pl.Series:
        return _id_series(self._lead_id_base + pid * self._lead_id_step)

    def _g(self, name: str, idx: np.ndarray) -> pl.Series:
        """Catalog strings (ids, names) at row indexes, as a compact polars gather."""
        if name not in self._pl_catalog:
            values = getattr(self, f"_{name}")
            self._pl_catalog[name] = pl.Series(name, np.asarray(values).ravel())
        return self._pl_catalog[name].gather(np.asarray(idx, dtype=np.int64))

    def leads(self) -> pl.DataFrame:
        """Meta lead-form leads visible now (raw PII; sandbox only)."""
        return self._cached("leads", lambda: _conform(self._build_leads(), "leads"))

    def _build_leads(self) -> pl.DataFrame:
        p = self._people()
        sel = p["lead_form"] & (p["lead_ms"] <= self._now_ms)
        ad = p["ad"][sel]
        first, last = pp.name_strings(p["p_first"][sel], p["p_last"][sel])
        frame = pl.DataFrame(
            {
                "lead_id": self._lead_ids(p["pid"][sel]),
                "created_time": self._dt(p["lead_ms"][sel]),
                "ad_id": self._g("ad_ids", ad),
                "adset_id": self._g("adset_ids", self._ad_adset[ad]),
                "campaign_id": self._g("campaign_ids", self._ad_campaign[ad]),
                "form_id": self._g("form_ids", self._ad_campaign[ad]),
                "account_id": self._g("account_ids", self._ad_account[ad]),
                "email": pp.email_strings(
                    p["p_first"][sel],
                    p["p_last"][sel],
                    p["p_email_style"][sel],
                    p["p_email_num"][sel],
                    p["p_domain"][sel],
                    p["c1_email_case"][sel],
                ),
                "phone": pp.phone_strings(
                    p["p_area"][sel],
                    p["p_exchange"][sel],
                    p["p_line"][sel],
                    p["c1_phone_style"][sel],
                ),
                "full_name": first + " " + last,
            }
        )
        return frame.sort(["created_time", "lead_id"])

    def _contact_table(self) -> dict[str, np.ndarray]:
        """Contacts as index arrays: first contact of every person + cross-path contacts."""
        p = self._people()
        n = len(p["pid"])
        cross = np.flatnonzero(p["cross"])
        row = np.concatenate([np.arange(n), cross])  # person row behind each contact
        second = np.concatenate([np.zeros(n, dtype=bool), np.ones(len(cross), dtype=bool)])
        created = np.where(second, p["cross_ms"][row], p["c1_ms"][row])
        return {"row": row, "second": second, "created": created}

    def contacts(self) -> pl.DataFrame:
        """HubSpot contacts visible now (raw PII; sandbox only)."""
        return self._cached("contacts", lambda: _conform(self._build_contacts(), "contacts"))

    def _build_contacts(self) -> pl.DataFrame:
        p = self._people()
        t = self._contact_table()
        vis = t["created"] <= self._now_ms
        row, second, created = t["row"][vis], t["second"][vis], t["created"][vis]
        pid = p["pid"][row]
        ad = p["ad"][row]
        by_phone = second & p["cross_by_phone"][row]
        variant = np.where(second, p["cross_variant"][row], p["variant"][row])
        main_email = pp.email_strings(
            p["p_first"][row],
            p["p_last"][row],
            p["p_email_style"][row],
            p["p_email_num"][row],
            p["p_domain"][row],
            np.where(second, p["cross_email_case"][row], p["c1_email_case"][row]),
        )
        alt = row[by_phone]  # cross-path contacts matched by phone use another address
        alt_email = pp.email_strings(
            p["p_first"][alt],
            p["p_last"][alt],
            p["p_alt_email_style"][alt],
            p["p_alt_email_num"][alt],
            p["p_alt_domain"][alt],
            np.zeros(len(alt), dtype=np.int8),
        )
        email = main_email.scatter(np.flatnonzero(by_phone), alt_email)
        phone_style = np.where(second, p["cross_phone_style"][row], p["c1_phone_style"][row])
        phone = pp.phone_strings(
            p["p_area"][row], p["p_exchange"][row], p["p_line"][row], phone_style
        )
        first, last = pp.name_strings(p["p_first"][row], p["p_last"][row])
        # deal creation touches the contact it hangs on
        deal_on = p["has_deal"][row] & (second == p["cross"][row])
        deal_t0 = np.full(len(row), -1, dtype=np.int64)
        if len(p["deal_pid"]):
            pos = np.searchsorted(p["deal_pid"], pid)
            pos = np.minimum(pos, len(p["deal_pid"]) - 1)
            deal_t0 = np.where(deal_on, p["deal_times"][pos, 0].astype(np.int64) * 1000, -1)
        modified = np.where((deal_t0 >= 0) & (deal_t0 <= self._now_ms), deal_t0, created)

        acc = self._ad_account[ad]
        camp = self._ad_campaign[ad]
        fbclid = pp.fbclid_strings(p["fbclid"][row])
        frame = pl.DataFrame(
            {
                "contact_id": _id_series(self._contact_id_base + 2 * pid + second),
                "createdate": self._dt(created),
                "lastmodifieddate": self._dt(modified),
                "email": email,
                "phone": phone,
                "firstname": first,
                "lastname": last,
                "variant": variant,
                "lead_id": self._lead_ids(pid),
                "campaign_id": self._g("campaign_ids", camp),
                "campaign_name": self._g("campaign_names", camp),
                "ad_id": self._g("ad_ids", ad),
                "account_id": self._g("account_ids", acc),
                "fbclid": fbclid,
            }
        )
        v = pl.col("variant")
        lp = pl.concat_str([pl.lit("https://example-"), pl.col("account_id"), pl.lit(".com/lp")])
        utm = pl.concat_str(
            [
                lp,
                pl.lit("?utm_source=facebook&utm_medium=paid_social&utm_campaign="),
                pl.col("campaign_id"),
            ]
        )
        full = pl.concat_str(
            [utm, pl.lit("&utm_content="), pl.col("ad_id"), pl.lit("&fbclid="), pl.col("fbclid")]
        )
        null = pl.lit(None, dtype=pl.Utf8)
        frame = frame.with_columns(
            hs_analytics_source=pl.when(v == 4)
            .then(pl.lit("DIRECT_TRAFFIC"))
            .otherwise(pl.lit("PAID_SOCIAL")),
            hs_analytics_source_data_1=pl.when(v == 5)
            .then(pl.lit("Facebook Lead Ads"))
            .when(v.is_in([0, 2]))
            .then(pl.lit("facebook"))
            .otherwise(null),
            hs_analytics_source_data_2=pl.when(v == 5)
            .then(pl.col("lead_id"))
            .when(v.is_in([0, 2]))
            .then(pl.col("campaign_name"))
            .otherwise(null),
            hs_analytics_first_url=pp.per_code(
                frame, "variant", {0: full, 1: utm, 2: lp, 3: lp, 4: lp}
            ),
            hs_facebook_click_id=pl.when(v == 0).then(pl.col("fbclid")).otherwise(null),
        )
        return frame.select(
            "contact_id",
            "createdate",
            "lastmodifieddate",
            "email",
            "phone",
            "firstname",
            "lastname",
            "hs_analytics_source",
            "hs_analytics_source_data_1",
            "hs_analytics_source_data_2",
            "hs_analytics_first_url",
            "hs_facebook_click_id",
        ).sort(["createdate", "contact_id"])

    def truth_contacts(self) -> pl.DataFrame:
        """True ad and person behind every visible contact."""
        return self._cached(
            "truth_contacts", lambda: _conform(self._build_truth_contacts(), "truth_contacts")
        )

    def _build_truth_contacts(self) -> pl.DataFrame:
        p = self._people()
        t = self._contact_table()
        vis = t["created"] <= self._now_ms
        row, second, created = t["row"][vis], t["second"][vis], t["created"][vis]
        pid = p["pid"][row]
        ad = p["ad"][row]
        variant = np.where(second, p["cross_variant"][row], p["variant"][row])
        path = np.where(second, 2, p["lead_form"][row].astype(np.int64))
        lead_form = p["lead_form"][row]
        frame = pl.DataFrame(
            {
                "contact_id": _id_series(self._contact_id_base + 2 * pid + second),
                "true_ad_id": self._g("ad_ids", ad),
                "person_id": pid,
                "path": pl.Series(["landing", "lead_form", "cross_path"]).gather(path),
                "kept_click_id": variant == 0,
                "account_id": self._g("account_ids", self._ad_account[ad]),
                "source_variant": pl.Series(SOURCE_VARIANTS).gather(variant.astype(np.int64)),
                "lead_id": self._lead_ids(pid),
                "_lead_form": lead_form,
                "click_time": self._dt(p["click_ms"][row]),
                "createdate": self._dt(created),
            }
        )
        return (
            frame.with_columns(lead_id=pl.when("_lead_form").then("lead_id"))
            .drop("_lead_form")
            .sort(["createdate", "contact_id"])
        )

    def _deal_view(self) -> dict[str, np.ndarray]:
        """Visible deals with their current stage at ``now`` (vectorized over all deals)."""
        key = ("deal_view", self._now_ms)
        if key in self._cache:
            return self._cache[key]
        p = self._people()
        now = self._now_ms
        vis = p["deal_times"][:, 0].astype(np.int64) * 1000 <= now
        times = p["deal_times"][vis].astype(np.int64) * 1000
        stages = p["deal_stages"][vis]
        deal_pid = p["deal_pid"][vis]
        row = np.searchsorted(p["pid"], deal_pid)
        last, final = stage_at(stages, times, now)
        ridx = np.arange(len(times))
        cur_stage = stages[ridx, last]
        show_at = np.where(stages == SHOW_UP, times, np.iinfo(np.int64).max).min(
            axis=1, initial=np.iinfo(np.int64).max
        )
        view = {
            "row": row,
            "pid": deal_pid,
            "stages": stages,
            "times": times,
            "value": p["deal_value"][vis],
            "stage": cur_stage,
            "modified": times[ridx, last],
            "amount_set": show_at <= now,
            "closed": np.isin(cur_stage, [WON, LOST]),
            "final_stage": stages[ridx, final],
            "final_ms": times[ridx, final],
            "contact_second": p["cross"][row],
            "ad": p["ad"][row],
        }
        self._cache[key] = view
        return view

    def deals(self) -> pl.DataFrame:
        """HubSpot deals visible now, with the stage and amount they have at ``now``."""
        return self._cached("deals", lambda: _conform(self._build_deals(), "deals"))

    def _build_deals(self) -> pl.DataFrame:
        v = self._deal_view()
        acc = self._ad_account[v["ad"]]
        deal_ids = _id_series(self._deal_id_base + v["pid"])
        service = pl.Series([cr.VERTICALS[n][0].capitalize() for n in cr.VERTICAL_NAMES])
        frame = pl.DataFrame(
            {
                "deal_id": deal_ids,
                "dealname": service.gather(self._acc_vertical[acc]),
                "amount": pl.Series(v["value"], dtype=pl.Float64),
                "dealstage": self._g("stage_ids", acc * 5 + v["stage"]),
                "pipeline": self._g("pipeline_ids", acc),
                "closedate": self._dt(v["modified"]),
                "createdate": self._dt(v["times"][:, 0]),
                "hs_lastmodifieddate": self._dt(v["modified"]),
                "_amount_set": v["amount_set"],
                "_closed": v["closed"],
            },
            schema_overrides={"dealname": pl.Utf8, "dealstage": pl.Utf8, "pipeline": pl.Utf8},
        )
        return (
            frame.with_columns(
                dealname=pl.concat_str([pl.col("dealname"), pl.lit(" #"), pl.col("deal_id")]),
                amount=pl.when("_amount_set").then("amount"),
                closedate=pl.when("_closed").then("closedate"),
            )
            .drop("_amount_set", "_closed")
            .sort(["createdate", "deal_id"])
        )

    def deal_contacts(self) -> pl.DataFrame:
        """Deal -> contact associations (each deal hangs on one contact)."""
        return self._cached(
            "deal_contacts", lambda: _conform(self._build_deal_contacts(), "deal_contacts")
        )

    def _build_deal_contacts(self) -> pl.DataFrame:
        v = self._deal_view()
        return pl.DataFrame(
            {
                "deal_id": _id_series(self._deal_id_base + v["pid"]),
                "contact_id": _id_series(
                    self._contact_id_base + 2 * v["pid"] + v["contact_second"]
                ),
            }
        )

    def deal_stage_history(self) -> pl.DataFrame:
        """Every stage change of visible deals up to now: deal_id, dealstage, stage_label,
        occurred_at (creation is the first row, in 'Lead')."""
        return self._cached(
            "deal_history", lambda: _conform(self._build_history(), "deal_stage_history")
        )

    def _build_history(self) -> pl.DataFrame:
        v = self._deal_view()
        seen = (v["stages"] >= 0) & (v["times"] <= self._now_ms)
        r, c = np.nonzero(seen)
        acc = self._ad_account[v["ad"]][r]
        stage = v["stages"][r, c]
        return pl.DataFrame(
            {
                "deal_id": _id_series(self._deal_id_base + v["pid"][r]),
                "dealstage": self._g("stage_ids", acc * 5 + stage),
                "stage_label": pl.Series(STAGE_LABELS).gather(stage.astype(np.int64)),
                "occurred_at": self._dt(v["times"][r, c]),
            }
        )

    def truth_deals(self) -> pl.DataFrame:
        """True ad, contact and value behind every visible deal (final outcome included)."""
        return self._cached(
            "truth_deals", lambda: _conform(self._build_truth_deals(), "truth_deals")
        )

    def _build_truth_deals(self) -> pl.DataFrame:
        v = self._deal_view()
        acc = self._ad_account[v["ad"]]
        return pl.DataFrame(
            {
                "deal_id": _id_series(self._deal_id_base + v["pid"]),
                "contact_id": _id_series(
                    self._contact_id_base + 2 * v["pid"] + v["contact_second"]
                ),
                "true_ad_id": self._g("ad_ids", v["ad"]),
                "account_id": self._g("account_ids", acc),
                "value_if_won": v["value"],
                "person_id": v["pid"],
                "final_stage": pl.Series(STAGE_LABELS).gather(v["final_stage"].astype(np.int64)),
                "closes_at": self._dt(v["final_ms"]),
            },
            schema_overrides={
                "deal_id": pl.Utf8,
                "contact_id": pl.Utf8,
                "true_ad_id": pl.Utf8,
                "account_id": pl.Utf8,
                "final_stage": pl.Utf8,
            },
        )

    # ------------------------------------------------------------------ catalog frames
    def _catalog(self, key: str, build) -> pl.DataFrame:
        if key not in self._catalog_cache:
            self._catalog_cache[key] = build()
        return self._catalog_cache[key]

    def accounts(self) -> pl.DataFrame:
        """Ad accounts with their pixel and HubSpot pipeline."""
        return self._catalog(
            "accounts",
            lambda: pl.DataFrame(
                {
                    "account_id": self._account_ids,
                    "name": self._account_names,
                    "currency": [CURRENCY] * self.n_accounts,
                    "timezone": [TIMEZONE] * self.n_accounts,
                    "pixel_id": self._pixel_ids,
                    "hubspot_pipeline_id": self._pipeline_ids,
                    "min_daily_budget": pl.Series(
                        [self.config.min_daily_budget] * self.n_accounts, dtype=pl.Int64
                    ),
                    "vertical": np.array(cr.VERTICAL_NAMES)[self._acc_vertical],
                }
            ),
        )

    def campaigns(self) -> pl.DataFrame:
        """Campaigns (objective OUTCOME_LEADS), one lead form each."""
        return self._catalog(
            "campaigns",
            lambda: pl.DataFrame(
                {
                    "campaign_id": self._campaign_ids,
                    "account_id": self._account_ids[self._campaign_account],
                    "name": self._campaign_names,
                    "objective": ["OUTCOME_LEADS"] * self.n_campaigns,
                    "status": np.array(STATUSES)[self._campaign_status],
                    "created_time": self._dt(self._campaign_created),
                    "form_id": self._form_ids,
                }
            ),
        )

    def _effective_adset_status(self) -> np.ndarray:
        camp = self._campaign_status[self._adset_campaign]
        own = np.array(STATUSES)[self._adset_status]
        return np.where((self._adset_status == ACTIVE) & (camp != ACTIVE), "CAMPAIGN_PAUSED", own)

    def adsets(self) -> pl.DataFrame:
        """Ad sets with their current daily budget (Int64 minor units) and status."""
        return self._catalog(
            "adsets",
            lambda: pl.DataFrame(
                {
                    "adset_id": self._adset_ids,
                    "campaign_id": self._campaign_ids[self._adset_campaign],
                    "account_id": self._account_ids[self._adset_account],
                    "name": self._adset_names,
                    "daily_budget": pl.Series(self._budget, dtype=pl.Int64),
                    "status": np.array(STATUSES)[self._adset_status],
                    "created_time": self._dt(self._adset_created),
                    "effective_status": self._effective_adset_status(),
                    "updated_time": self._dt(self._adset_updated),
                    # Graph learning_stage_info.status: big budget edits restart learning
                    "learning_stage": np.where(
                        self._learning_until > self._now_ms, "LEARNING", "SUCCESS"
                    ),
                }
            ),
        )

    def ads(self) -> pl.DataFrame:
        """Ads with creative traits and copy."""

        def build() -> pl.DataFrame:
            set_eff = self._effective_adset_status()[self._ad_adset]
            own = np.array(STATUSES)[self._ad_status]
            eff = np.where(
                (self._ad_status == ACTIVE) & (set_eff != "ACTIVE"),
                np.where(set_eff == "CAMPAIGN_PAUSED", "CAMPAIGN_PAUSED", "ADSET_PAUSED"),
                own,
            )
            return pl.DataFrame(
                {
                    "ad_id": self._ad_ids,
                    "adset_id": self._adset_ids[self._ad_adset],
                    "campaign_id": self._campaign_ids[self._ad_campaign],
                    "account_id": self._account_ids[self._ad_account],
                    "name": self._ad_names,
                    "status": own,
                    "created_time": self._dt(self._ad_created),
                    "form_id": self._form_ids[self._ad_campaign],
                    "hook_type": np.array(cr.HOOK_TYPES)[self._ad_hook],
                    "format": np.array(cr.FORMATS)[self._ad_format],
                    "cta": np.array(cr.CTAS)[self._ad_cta],
                    "emotion": np.array(cr.EMOTIONS)[self._ad_emotion],
                    "title": self._ad_titles,
                    "body": self._ad_bodies,
                    "effective_status": eff,
                    "updated_time": self._dt(self._ad_updated),
                }
            )

        return self._catalog("ads", build)

    def pipelines(self) -> list[dict]:
        """HubSpot deal pipelines exactly as GET /crm/v3/pipelines/deals lists them."""
        created = (self.config.start - timedelta(days=365)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        labels = np.char.add(self._account_names.astype(str), " pipeline")
        return pipeline_objects(self._pipeline_ids, self._stage_ids, labels, created)

    def object_kind(self, object_id: str) -> str | None:
        """'account', 'campaign', 'adset', 'ad', 'pixel' or 'form' for a Graph id, else None."""
        hit = self._id_index.get(str(object_id))
        return hit[0] if hit else None

    # ------------------------------------------------------------------ insights and truth
    def insights(self, account_id: str, since: date, until: date) -> pl.DataFrame:
        """Daily per-ad insights of one account (rows with impressions only), since..until."""
        key = ("insights", str(account_id), since, until)
        return self._cached(
            key, lambda: _conform(self._build_insights(str(account_id), since, until), "insights")
        )

    def _day_rows(self) -> dict[str, np.ndarray]:
        """All daily rows (closed days + the running day), concatenated and cached."""
        key = ("day_rows", self._hours_done)
        if key in self._cache:
            return self._cache[key]
        days = list(self._days)
        if self._hours_done % 24:
            days.append(self._snapshot_day(self._hours_done // 24, None))
        rows = {
            "day": np.concatenate([np.full(len(d.idx), d.day, np.int32) for d in days] or [[]]),
            **{
                k: np.concatenate([getattr(d, k) for d in days] or [np.zeros(0, np.int32)])
                for k in _DAY_FIELDS
            },
        }
        self._cache[key] = rows
        return rows

    def _build_insights(self, account_id: str, since: date, until: date) -> pl.DataFrame:
        account = self._lookup("account", account_id)
        rows = self._day_rows()
        start_day = self.config.start.date()
        lo, hi = (since - start_day).days, (until - start_day).days
        sel = (self._ad_account[rows["idx"]] == account) & (rows["day"] >= lo) & (rows["day"] <= hi)
        idx = rows["idx"][sel]
        frame = pl.DataFrame(
            {
                "date_start": pl.Series(rows["day"][sel], dtype=pl.Int32),
                "ad_id": self._g("ad_ids", idx),
                "adset_id": self._g("adset_ids", self._ad_adset[idx]),
                "campaign_id": self._g("campaign_ids", self._ad_campaign[idx]),
                "account_id": self._g("account_ids", self._ad_account[idx]),
                "spend": rows["spend_cents"][sel] / 100.0,
                "impressions": pl.Series(rows["impressions"][sel], dtype=pl.Int64),
                "reach": pl.Series(rows["reach"][sel], dtype=pl.Int64),
                "clicks": pl.Series(rows["clicks"][sel], dtype=pl.Int64),
                "inline_link_clicks": pl.Series(rows["link_clicks"][sel], dtype=pl.Int64),
                "leads": pl.Series(rows["leads"][sel], dtype=pl.Int64),
            },
            schema_overrides={"spend": pl.Float64},
        )
        return (
            frame.with_columns(
                date_start=pl.lit(start_day) + pl.duration(days=pl.col("date_start"))
            )
            .with_columns(pl.col("date_start").cast(pl.Date))
            .sort(["date_start", "ad_id"])
        )

    def truth_ads_daily(self) -> pl.DataFrame:
        """True rates of every ad on every closed day.

        true_ctr: expected clicks per impression that day (drift and fatigue included,
        impression-weighted); true_click_to_lead: leads per click; true_lead_to_deal: P(deal |
        lead); true_deal_to_won: P(won | deal); mean_deal_value: mean of the ad's lognormal
        value; frequency: cumulative impressions / reach at day end;
        true_value_per_impression: expected won revenue per impression.
        """
        return self._cached(
            "truth_ads_daily",
            lambda: _conform(self._build_truth_ads_daily(), "truth_ads_daily"),
        )

    def _build_truth_ads_daily(self) -> pl.DataFrame:
        if not self._days:
            return pl.DataFrame(schema=SCHEMAS["truth_ads_daily"])
        n, k = self.n_ads, len(self._days)
        start_day = self.config.start.date()
        dates = [start_day + timedelta(days=d.day) for d in self._days]
        ctr = np.concatenate([d.true_ctr for d in self._days])
        mean_value = np.exp(self._val_mu + self._val_sigma**2 / 2)
        vpi = self._link_share * self._c2l * self._l2d * self._d2w * mean_value
        return pl.DataFrame(
            {
                "date": pl.Series(np.repeat(np.array(dates, dtype="datetime64[D]"), n)).cast(
                    pl.Date
                ),
                "ad_id": self._g("ad_ids", np.tile(np.arange(n), k)),
                "account_id": self._g("account_ids", np.tile(self._ad_account, k)),
                "true_ctr": ctr,
                "true_click_to_lead": np.tile(self._c2l * self._link_share, k),
                "true_lead_to_deal": np.tile(self._l2d, k),
                "true_deal_to_won": np.tile(self._d2w, k),
                "mean_deal_value": np.tile(mean_value, k),
                "frequency": np.concatenate([d.frequency for d in self._days]),
                "true_value_per_impression": ctr * np.tile(vpi, k),
            }
        )

    def truth_drifts(self) -> list[dict]:
        """Drifts that have happened: per account, the CTR multiplier of each hook type."""
        if self._drift_hour is None:
            return []
        hour = math.ceil(self._drift_hour)  # first simulated hour with the shifted CTRs
        if self._hours_done <= hour:
            return []
        at = (self.config.start + timedelta(hours=hour)).isoformat().replace("+00:00", "Z")
        mult = {h: float(self._drift_hook_mult[i]) for i, h in enumerate(cr.HOOK_TYPES)}
        return [
            {
                "at": at,
                "account_id": str(acc),
                "kind": "ctr_shift",
                "trait": "hook_type",
                "strength": self.config.drift_strength,
                "multipliers": dict(mult),
            }
            for acc in self._account_ids
        ]

    # ------------------------------------------------------------------ mutations
    def _lookup(self, kind: str, object_id: str) -> int:
        hit = self._id_index.get(str(object_id))
        if hit is None or hit[0] != kind:
            raise WorldError(
                100,
                33,
                f"Unsupported post request. Object with ID '{object_id}' does not exist, cannot be "
                "loaded due to missing permissions, or does not support this operation.",
                400,
                "GraphMethodException",
            )
        return hit[1]

    @staticmethod
    def _check_status(status: str, current: int) -> int:
        if status not in STATUSES:
            raise WorldError(
                100, None, "(#100) Param status must be one of {ACTIVE, PAUSED, DELETED, ARCHIVED}"
            )
        if current == DELETED and status != "DELETED":
            raise WorldError(100, 1487056, "(#100) A deleted object cannot be changed.")
        return STATUSES.index(status)

    def update_adset(
        self, adset_id: str, *, daily_budget: int | None = None, status: str | None = None
    ) -> None:
        """Change an ad set's budget and/or status; effective from the next simulated hour."""
        i = self._lookup("adset", adset_id)
        new_status = (
            None if status is None else self._check_status(status, int(self._adset_status[i]))
        )
        if daily_budget is not None:
            if isinstance(daily_budget, bool) or int(daily_budget) != daily_budget:
                raise WorldError(100, None, "(#100) Param daily_budget must be an integer")
            minimum = self.config.min_daily_budget
            if int(daily_budget) < minimum:
                raise WorldError(
                    100,
                    1885272,
                    f"Your budget is too low. The minimum daily budget is {minimum}.",
                )
            now = self._now_ms
            edits = self._budget_edits.setdefault(i, deque())
            while edits and edits[0] <= now - HOUR_MS:
                edits.popleft()
            if now < self._budget_blocked_until.get(i, -1) or len(edits) >= BUDGET_EDITS_PER_HOUR:
                if now >= self._budget_blocked_until.get(i, -1):
                    self._budget_blocked_until[i] = now + HOUR_MS
                raise WorldError(
                    613,
                    1487632,
                    "(#613) There have been too many budget changes to this ad set. "
                    "Please wait an hour and try again.",
                )
            edits.append(now)
            if abs(int(daily_budget) / self._budget[i] - 1.0) > self.config.learning_reset_change:
                self._learning_until[i] = now + round(self.config.learning_hours * HOUR_MS)
            self._budget[i] = int(daily_budget)
        if new_status is not None:
            self._adset_status[i] = new_status
        self._adset_updated[i] = self._now_ms
        self._catalog_cache.clear()

    def update_ad(self, ad_id: str, *, status: str) -> None:
        """Change an ad's status; effective from the next simulated hour."""
        i = self._lookup("ad", ad_id)
        self._ad_status[i] = self._check_status(status, int(self._ad_status[i]))
        self._ad_updated[i] = self._now_ms
        self._catalog_cache.clear()

    def update_campaign(self, campaign_id: str, *, status: str) -> None:
        """Change a campaign's status; effective from the next simulated hour."""
        i = self._lookup("campaign", campaign_id)
        self._campaign_status[i] = self._check_status(status, int(self._campaign_status[i]))
        self._catalog_cache.clear()

    def minimum_budgets(self, account_id: str) -> list[dict]:
        """Graph `act_{id}/minimum_budgets` rows (minor units); the world enforces these."""
        self._lookup("account", account_id)
        m = self.config.min_daily_budget
        return [
            {
                "currency": CURRENCY,
                "min_daily_budget_imp": m,
                "min_daily_budget_video_views": m,
                "min_daily_budget_high_freq": m,
                "min_daily_budget_low_freq": m,
            }
        ]

    # ------------------------------------------------------------------ Conversions API
    def receive_capi(self, pixel_id: str, events: list[dict]) -> int:
        """Store validated CAPI events; returns events_received (all events in the request).

        Events repeating (pixel, event_name, event_id) within 48 simulated hours of the first
        one are stored with ``duplicate=True`` (Meta drops them); events without event_id are
        never deduplicated.
        """
        self._lookup("pixel", pixel_id)
        self._cache.pop("capi_events", None)
        return self._capi.receive(str(pixel_id), events, self._now_ms)

    def capi_events(self) -> pl.DataFrame:
        """Received CAPI events with the true person their identifiers resolve to: pixel_id,
        event_name, event_id, event_time, received_at, duplicate, matched_person_id (null when
        nothing resolves), match_key, conflict, person_has_deal, true_ad_id."""
        p = self._people()

        def person_info(pid: int) -> tuple[bool, str]:
            return bool(p["has_deal"][pid]), str(self._ad_ids[p["ad"][pid]])

        def index_for_pixel(pixel_id: str) -> IdentityIndex:
            return self._identity_index(self._id_index[pixel_id][1])

        return self._cached(
            "capi_events",
            lambda: self._capi.resolve(self.config.start, index_for_pixel, person_info),
        )

    def capi_match(self) -> dict:
        """Per pixel: events received, duplicates, and the match rate against the truth.

        An event *matches* when its identifiers (hashed ``em``/``ph``, ``lead_id``, or the
        fbclid inside ``fbc``) resolve to exactly one true person of the pixel's account and
        that person has a deal (CRM events are about deals). ``match_rate`` = matched unique
        (non-duplicate) events / unique events; ``conflicts`` counts events whose identifiers
        point at different people; ``by_key`` counts matched events by their first
        resolving identifier (lead_id, em, ph, fbc).
        """
        pixels = [
            (str(px), str(acc)) for px, acc in zip(self._pixel_ids, self._account_ids, strict=True)
        ]
        return match_summary(self.capi_events(), pixels)

    def _identity_index(self, account: int) -> IdentityIndex:
        """Hash/lead-id/fbclid -> person id for one account's people clicked by now (cached)."""
        key = ("identity", account)
        if key in self._cache:
            return self._cache[key]
        p = self._people()
        sel = np.flatnonzero(
            (self._ad_account[p["ad"]] == account) & (p["click_ms"] <= self._now_ms)
        )

        def col(name: str) -> np.ndarray:
            return p[name][sel]

        pid = col("pid")
        emails = pp.canonical_emails(
            col("p_first"), col("p_last"), col("p_email_style"), col("p_email_num"), col("p_domain")
        )
        alt = pp.canonical_emails(
            col("p_first"),
            col("p_last"),
            col("p_alt_email_style"),
            col("p_alt_email_num"),
            col("p_alt_domain"),
        )
        uses_alt = col("cross") & col("cross_by_phone")
        lead_form = col("lead_form")
        index = build_identity_index(
            person_ids=pid.tolist(),
            emails=emails.to_list(),
            phones=pp.canonical_phones(col("p_area"), col("p_exchange"), col("p_line")).to_list(),
            extra_emails=zip(alt.filter(uses_alt).to_list(), pid[uses_alt].tolist(), strict=True),
            lead_ids=zip(
                self._lead_ids(pid[lead_form]).to_list(), pid[lead_form].tolist(), strict=True
            ),
            fbclids=pp.fbclid_strings(col("fbclid")).to_list(),
        )
        self._cache[key] = index
        return index

    # ------------------------------------------------------------------ summary
    def counts(self) -> dict[str, Any]:
        """Sizes of the world at ``now`` (cheap: no frame is built)."""
        p = self._people()
        now = self._now_ms
        contacts = int((p["c1_ms"] <= now).sum() + (p["cross"] & (p["cross_ms"] <= now)).sum())
        return {
            "now": self.now.isoformat().replace("+00:00", "Z"),
            "hours_simulated": self._hours_done,
            "accounts": self.n_accounts,
            "campaigns": self.n_campaigns,
            "adsets": self.n_adsets,
            "ads": self.n_ads,
            "people": self._n_people,
            "leads": int((p["lead_form"] & (p["lead_ms"] <= now)).sum()),
            "contacts": contacts,
            "deals": int((p["deal_times"][:, 0].astype(np.int64) * 1000 <= now).sum()),
            "capi_events": len(self._capi),
        }


def _lognoise(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """Multiplicative noise with median 1 (cheaper than rng.lognormal)."""
    return np.exp(sigma * rng.standard_normal(n))


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson draws; means above 30 use the normal approximation (numpy's sampler is slow
    there and the difference is invisible in impression counts)."""
    lam = np.asarray(lam, dtype=np.float64)
    big = lam > 30.0
    if not big.any():
        return rng.poisson(lam)
    out = np.empty(lam.shape[0], dtype=np.int64)
    small = ~big
    out[small] = rng.poisson(lam[small])
    lb = lam[big]
    out[big] = np.floor(lb + np.sqrt(lb) * rng.standard_normal(lb.shape[0]) + 0.5).astype(np.int64)
    return out


def _empty_people() -> dict[str, np.ndarray]:
    """Zero-length people arrays with the same keys/dtypes as a drawn chunk."""
    world_keys_int64 = ("pid", "click_ms", "lead_ms", "c1_ms", "cross_ms", "deal_pid")
    out: dict[str, np.ndarray] = {k: np.zeros(0, dtype=np.int64) for k in world_keys_int64}
    out.update(
        {
            "ad": np.zeros(0, dtype=np.int32),
            "lead_form": np.zeros(0, dtype=bool),
            "reported": np.zeros(0, dtype=bool),
            "cross": np.zeros(0, dtype=bool),
            "cross_by_phone": np.zeros(0, dtype=bool),
            "has_deal": np.zeros(0, dtype=bool),
            "variant": np.zeros(0, dtype=np.int8),
            "c1_phone_style": np.zeros(0, dtype=np.int8),
            "c1_email_case": np.zeros(0, dtype=np.int8),
            "cross_phone_style": np.zeros(0, dtype=np.int8),
            "cross_email_case": np.zeros(0, dtype=np.int8),
            "cross_variant": np.zeros(0, dtype=np.int8),
            "fbclid": np.zeros((0, pp.FBCLID_WORDS), dtype=np.uint64),
            "deal_stages": np.zeros((0, SLOTS), dtype=np.int8),
            "deal_times": np.zeros((0, SLOTS), dtype=np.int32),
            "deal_value": np.zeros(0),
        }
    )
    for k, v in pp.draw_people(np.random.default_rng(0), 0).items():
        out[f"p_{k}"] = v
    return out
