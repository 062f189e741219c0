"""Instant learner: online (river) models of an ad's rates from creative traits and context.

Three river ``LinearRegression`` models with Poisson loss (log link) over a one-hot encoding of
the context (account, hook_type, format, cta, emotion, day of week) predict:

- ``ctr``           clicks per impression,
- ``click_to_lead`` leads per click,
- ``lead_value``    pipeline value per lead (currency units).

Each target is learned on ``rate / scale`` (``scale`` = the pooled rate of the first call that
saw the target), so one learning rate fits all three. Updates are river's own online step,
``learn_one`` per event and target: on this workload it measured ~5x faster than ``learn_many``
on polars mini-batches (whose per-call frame conversion dominates; river's ``OneHotEncoder``
on polars costs ~10 ms per mini-batch on top). The one-hot encoding, the predictions (river's
``mean_func(x . w + intercept)`` on numpy) and the drift residuals are vectorized per chunk.

Drift: river ``ADWIN`` detectors per account watch how *surprising* each ad-day's clicks are
against the ad's own recent CTR (an exponentially weighted baseline, half-life 14 days, kept
per ad): ``z^2 = (clicks - expected)^2 / (expected + expected^2 / baseline clicks + 1)``, whose mean
is ~1 while nothing changes. Two streams per account: ``ad_surprise`` (one z^2 per ad-day) and
``trait_surprise`` (clicks pooled per creative trait value and day, after dividing out the
account-day's common ratio, so a shift shared by the ads of one hook type adds up while fatigue
common to all ads does not). A CTR shift of some traits only - up for some hook types, down for
others, no account-level change, as the sandbox's drift - raises both, where a signed error
stream stays flat. A detection counts when the mean z^2 rises by ``surprise_min_rise`` with a
t-like ratio of at least ``surprise_min_t``; it becomes a drift record (``shift`` = pooled log
rate ratio after / before the estimated change point), raises that account's learning rate
(per-event sample weights) for a while, and lets the allocator discount evidence from before
the change through :func:`evidence_decay` and :func:`decay_counts`. The earlier signed ``level``
stream (log residual vs the shared trait part) is still available (``LearnerConfig(level=
True)``) but off: on the sandbox it missed the hook-type drift and fired on ad fatigue.
:func:`detect_drifts` runs the learner over daily insights rows as the asset does.

Events frame (input of :meth:`InstantLearner.learn_many`), one row per observation window of an
ad (typically one ``meta_ad_insights`` row, or a matured lead cohort carrying value):

=================  ==========================  ==============================================
column             dtype                       meaning
=================  ==========================  ==============================================
event_key          Utf8                        unique id of the observation (cursor key)
occurred_at        Datetime(us, UTC)           when it was observed (cursor watermark)
account_id, ad_id  Utf8
hook_type, format,
cta, emotion       Utf8 (nullable)             creative traits (``meta_ads``)
impressions        Int64, optional             teaches ``ctr`` when > 0
clicks             Int64                       teaches ``click_to_lead`` when > 0
leads              Int64                       successes of ``click_to_lead``
pipeline_value     Float64, optional           value of the leads in ``value_leads``
value_leads        Int64, optional             leads behind ``pipeline_value`` (default
                                               ``leads`` when pipeline_value is given);
                                               teaches ``lead_value`` when > 0
date               Date, optional              day of week comes from it (else occurred_at)
=================  ==========================  ==============================================

Pipeline value arrives days after the leads, so feed ``lead_value`` from matured cohorts
(``clicks = 0``, ``value_leads = n``) rather than from same-day insight rows.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from river import drift, linear_model

# river is imported where a model or detector is built, not at module import: loading the
# Dagster code location (every run) would otherwise spend ~0.3 s CPU on it. Unpickling a stored
# learner imports the river classes it needs by itself.

TRAITS: tuple[str, ...] = ("hook_type", "format", "cta", "emotion")
FEATURES: tuple[str, ...] = ("account_id", *TRAITS, "dow")
TARGETS: tuple[str, ...] = ("ctr", "click_to_lead", "lead_value")
SURPRISE_TARGETS: tuple[str, ...] = ("ctr", "click_to_lead")  # count targets (Poisson z)
PRED_COLUMNS: dict[str, str] = {
    "ctr": "pred_ctr",
    "click_to_lead": "pred_click_to_lead",
    "lead_value": "pred_lead_value",
}
DRIFT_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.Utf8(),
    "target": pl.Utf8(),
    "detected_at": pl.Datetime("us", "UTC"),
    "changed_at": pl.Datetime("us", "UTC"),
    "events_seen": pl.Int64(),
    "shift": pl.Float64(),
}
# DRIFT_SCHEMA plus the stream that raised the alarm: "ad_surprise", "trait_surprise" or "level"
DRIFT_DETAIL_SCHEMA: dict[str, pl.DataType] = {**DRIFT_SCHEMA, "signal": pl.Utf8()}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATE_VERSION = 2
_TAIL = 2048  # recent residuals kept per stream to locate the change point after a detection


@dataclass(frozen=True)
class LearnerConfig:
    """Knobs of the instant learner. Drift defaults were tuned on the sandbox (``World`` seeds
    1-5, 30 days, with and without its drift) and checked against bench/learning.py's synthetic
    streams; ``python -m optimizer_assets.bench learning`` reports seeds 11-20."""

    lr: float = 0.01  # SGD step per event (rates are normalized to ~1)
    l2: float = 1e-4
    intercept_lr: float = 0.0  # global level lives in the account offsets (see InstantLearner)
    account_scale: float = 3.0  # one-hot value of the account feature (see InstantLearner)
    # an account offset moves by lr * account_scale**2 * weight * drift_lr_boost per unit error
    # (0.27 here): small enough that one noisy event cannot swing an account
    ad_scale: float = 0.0  # one-hot value of an ad_id feature (0 = none; a fast per-ad offset
    # absorbed the sandbox drift within a day, so drift is watched against ad baselines instead)
    batch_size: int = 64  # events whose drift residuals come from one model snapshot
    weight_half: float = 1.0  # expected successes at which an event reaches half weight
    # level stream (off by default): residual shrinkage, clip and size gate
    prior_events: float = 2.0  # pseudo-successes that shrink the residual of thin events to 0
    residual_clip: float = 2.0  # |log(observed / expected)| cap fed to ADWIN
    adwin_delta: float = 0.02  # ad_surprise and level streams (z^2 is calibrated, mean ~1)
    adwin_clock: int = 8
    adwin_grace: int = 30  # events per stream before ADWIN may fire
    min_shift: float = 0.15  # |log rate ratio| a detection needs to count (ADWIN alone flags
    # tiny but significant wobbles on high-volume accounts)
    surprise: bool = True  # watch z^2 of each ad-day's count vs the ad's own recent rate
    surprise_clip: float = 9.0  # cap of z^2 fed to ADWIN
    # of SURPRISE_TARGETS; click_to_lead (few leads per ad-day) raised false alarms
    surprise_targets: tuple[str, ...] = ("ctr",)
    surprise_by: tuple[str, ...] = ("ad", "trait")  # which surprise streams to watch
    trait_adwin_delta: float = 0.0005  # ADWIN delta of the trait_surprise streams
    trait_surprise_clip: float = 9.0
    surprise_min_base: float = 5.0  # successes behind an ad's baseline before it is scored
    baseline_half_life_h: float = 336.0  # 168 h detected fewer sandbox drifts (10 vs 13 of 15)
    surprise_min_t: float = 4.0  # rise / its standard error a surprise detection needs
    surprise_min_rise: float = 0.3  # mean z^2 rise a surprise detection needs to count
    level: bool = False  # watch the signed log residual vs the shared (trait) part
    drift_lr_boost: float = 3.0  # sample-weight multiplier after a drift (raised learning rate)
    drift_boost_hours: float = 72.0
    drift_cooldown_hours: float = 72.0  # one record per account per burst of detections
    overlap_hours: float = 48.0  # late events within this window are still learned, once


def _change_point(values: np.ndarray) -> int:
    """Index of the first element after the most likely mean shift (max two-sample t-like stat)."""
    n = len(values)
    if n < 4:
        return 0
    csum = np.cumsum(values)
    k = np.arange(1, n)
    left = csum[:-1] / k
    right = (csum[-1] - csum[:-1]) / (n - k)
    stat = np.abs(left - right) * np.sqrt(k * (n - k) / n)
    return int(np.argmax(stat)) + 1


@dataclass
class _Stream:
    """ADWIN detector plus a short tail of its inputs to locate and size a detected change."""

    detector: drift.ADWIN
    values: np.ndarray = field(default_factory=lambda: np.empty(0))
    observed: np.ndarray = field(default_factory=lambda: np.empty(0))
    expected: np.ndarray = field(default_factory=lambda: np.empty(0))
    times: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def extend(self, v: np.ndarray, o: np.ndarray, e: np.ndarray, t: np.ndarray) -> None:
        self.values = np.concatenate([self.values, v])
        self.observed = np.concatenate([self.observed, o])
        self.expected = np.concatenate([self.expected, e])
        self.times = np.concatenate([self.times, t])

    def trim(self, start: int) -> None:
        self.values = self.values[start:]
        self.observed = self.observed[start:]
        self.expected = self.expected[start:]
        self.times = self.times[start:]

    def locate(self, begin: int, end: int) -> tuple[int, float]:
        """Change point in [begin, end) and the log rate ratio after/before it (pooled)."""
        cp = begin + _change_point(self.values[begin:end])
        before = slice(begin, cp)
        after = slice(cp, end)
        o1, e1 = self.observed[before].sum() + 1.0, self.expected[before].sum() + 1.0
        o2, e2 = self.observed[after].sum() + 1.0, self.expected[after].sum() + 1.0
        return cp, float(np.log(o2 / e2) - np.log(o1 / e1))


class InstantLearner:
    """Online model of ctr, click->lead and lead->value rates with per-account drift detection.

    The account one-hot carries ``account_scale`` instead of 1 and the intercept is frozen, so an
    account's level lives in its own offset, which adapts ~scale^2 faster than the trait effects
    shared across accounts: one account's drift then moves its offset, not the other accounts'
    predictions (with scale 1 the benchmark saw knock-on false alarms in untouched accounts).
    """

    def __init__(self, config: LearnerConfig | None = None) -> None:
        self.config = config or LearnerConfig()
        cfg = self.config
        from river import linear_model, optim

        self.regressors = {
            t: linear_model.LinearRegression(
                optimizer=optim.SGD(cfg.lr),
                loss=optim.losses.Poisson(),
                l2=cfg.l2,
                intercept_lr=cfg.intercept_lr,
                clip_gradient=10.0,
            )
            for t in TARGETS
        }
        # account columns carry a larger value so account offsets adapt ~scale^2 faster than the
        # shared trait effects: one account's drift then moves its own offset, not the others'
        self.features: tuple[str, ...] = FEATURES + (("ad_id",) if cfg.ad_scale > 0 else ())
        values = [cfg.account_scale] + [1.0] * (len(FEATURES) - 1)
        self._feature_value = np.array(values + ([cfg.ad_scale] if cfg.ad_scale > 0 else []))
        # one-hot registry: "feature=value" column names, in order of first sight
        self.columns: list[str] = []
        self._column_index: dict[str, int] = {}
        self.scales: dict[str, float | None] = dict.fromkeys(TARGETS)
        self.watermark: datetime | None = None
        self.recent_keys = pl.DataFrame(
            schema={"event_key": pl.Utf8(), "occurred_at": pl.Datetime("us", "UTC")}
        )
        self.events_learned = 0
        self.events_seen: dict[str, int] = {}
        self.last_skipped_late = 0
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._drifts: list[dict] = []
        # per target: ad_id -> (decayed successes, decayed denominator, last update in us)
        self._baselines: dict[str, dict[str, tuple[float, float, int]]] = {}

    # ------------------------------------------------------------------ public API

    @property
    def cursor(self) -> dict:
        """Watermark and number of events learned, for asset metadata."""
        return {
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "events_learned": self.events_learned,
            "recent_keys": self.recent_keys.height,
        }

    @property
    def drifts(self) -> pl.DataFrame:
        """Every drift detected so far: account_id, target, detected_at, changed_at, events_seen,
        shift (pooled log rate ratio after / before the estimated change point)."""
        return self.drift_details.select(list(DRIFT_SCHEMA))

    @property
    def drift_details(self) -> pl.DataFrame:
        """:attr:`drifts` plus the ``signal`` (stream) that raised each alarm."""
        return pl.DataFrame(self._drifts, schema=DRIFT_DETAIL_SCHEMA)

    def learn_one(self, event: dict) -> pl.DataFrame:
        """River-style single-event update (same columns as a row of the events frame)."""
        return self.learn_many(pl.DataFrame([event]))

    def learn_many(self, events: pl.DataFrame) -> pl.DataFrame:
        """Learn every event not learned before (cursor); return drifts detected in this call."""
        cfg = self.config
        n_drifts_before = len(self._drifts)
        new = self._unseen(events)
        if new.height == 0:
            return self.drifts.slice(n_drifts_before)
        frame = _prepare(new)
        self._init_scales(frame)
        codes = self._encode(frame, grow=True)
        acc = frame["account_id"].to_numpy()
        times = frame["occurred_at"].dt.epoch("us").to_numpy()
        # cumulative per-account event count, so a drift record says how much data preceded it
        seen = frame.select(
            pl.col("account_id").replace_strict(self.events_seen, default=0, return_dtype=pl.Int64)
            + pl.int_range(1, pl.len() + 1).over("account_id")
        ).to_series()
        acc_seen = seen.to_numpy()
        obs = {t: _observations(frame, t, self.scales[t], cfg) for t in TARGETS}
        # chunks share one model snapshot for the (vectorized) residuals; learning is per event
        if cfg.surprise:
            for t in cfg.surprise_targets:
                self._watch_surprise(t, frame, acc_seen)
        for start in range(0, frame.height, cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            X, names, pos = self._design(codes[sl])
            acc_col = pos[:, 0]  # every learned event has an account
            ad_col = pos[:, -1] if cfg.ad_scale > 0 else None
            xs = None
            boost, n_drifts = None, -1
            for t in TARGETS:
                y, units, weight = (a[sl] for a in obs[t])
                mask = weight > 0
                if not mask.any():
                    continue
                reg = self.regressors[t]
                w = self._weight_vector(reg, names)
                eta = X @ w + reg.intercept
                m = mask
                where = (acc[sl][m], times[sl][m], acc_seen[sl][m])
                observed = (y * units)[m]
                if cfg.level:
                    # level drift is watched against the shared (trait) part of the prediction:
                    # the fast account and ad offsets would otherwise absorb a shift before ADWIN
                    # has enough evidence
                    shared = eta - w[acc_col] * cfg.account_scale
                    if ad_col is not None:
                        shared = shared - np.where(ad_col >= 0, w[ad_col], 0.0) * cfg.ad_scale
                    reference = np.exp(shared)
                    resid = _residual(y, units, reference, cfg)
                    expected = (reference * units)[m]
                    self._watch(t, "level", *where, resid[m], observed, expected)
                if len(self._drifts) != n_drifts:  # a detection in this batch boosts its rest
                    boost, n_drifts = self._boost(acc[sl], times[sl]), len(self._drifts)
                if xs is None:
                    xs = self._dicts(codes[sl])
                wts, yl = (weight * boost).tolist(), y.tolist()
                for i in np.nonzero(mask)[0].tolist():  # river's online update, one event each
                    reg.learn_one(xs[i], yl[i], wts[i])
        for a, n in frame.group_by("account_id").len().iter_rows():
            self.events_seen[a] = self.events_seen.get(a, 0) + n
        self.events_learned += frame.height
        self._advance_cursor(new)
        return self.drifts.slice(n_drifts_before)

    def predict_many(self, ads: pl.DataFrame, *, now: datetime) -> pl.DataFrame:
        """Return ``ads`` with pred_ctr, pred_click_to_lead, pred_lead_value, pred_value_per_click.

        ``ads`` needs account_id and the trait columns (missing traits count as unknown); with
        ad_id, a known ad's own offset is included. The day of week comes from ``now``. A target
        never learned yet predicts null.
        """
        X = ads.select(
            [
                (pl.col(c) if c in ads.columns else pl.lit(None)).cast(pl.Utf8).alias(c)
                for c in ("account_id", *TRAITS, "ad_id")
            ]
        ).with_columns(pl.lit(str(now.weekday())).alias("dow"))
        preds = self._predict(X)
        out = ads.with_columns(
            [pl.Series(PRED_COLUMNS[t], preds[t], dtype=pl.Float64).fill_nan(None) for t in TARGETS]
        )
        return out.with_columns(
            (pl.col("pred_click_to_lead") * pl.col("pred_lead_value")).alias("pred_value_per_click")
        )

    def predict_one(self, x: dict) -> dict[str, float | None]:
        """River-style prediction for one context dict (account_id, traits, dow 0=Monday, and
        optionally ad_id)."""
        cols = (*FEATURES, "ad_id")
        row = {c: None if x.get(c) is None else str(x[c]) for c in cols}
        preds = self._predict(pl.DataFrame([row], schema=dict.fromkeys(cols, pl.Utf8)))
        return {t: None if np.isnan(preds[t][0]) else float(preds[t][0]) for t in TARGETS}

    def to_bytes(self) -> bytes:
        """Serialize the whole learner (models, detectors, cursor, drifts) for the warehouse."""
        return pickle.dumps({"version": _STATE_VERSION, "learner": self}, protocol=5)

    @classmethod
    def from_bytes(cls, data: bytes) -> InstantLearner:
        """Restore a learner written by :meth:`to_bytes` (trusted warehouse state only)."""
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("unsupported instant learner state version")
        learner = state["learner"]
        if not isinstance(learner, cls):
            raise ValueError("state does not hold an InstantLearner")
        return learner

    # ------------------------------------------------------------------ internals

    def _encode(self, X: pl.DataFrame, *, grow: bool) -> np.ndarray:
        """(n, len(features)) global one-hot column index per feature; -1 = null or unseen."""
        out = np.full((X.height, len(self.features)), -1, dtype=np.int64)
        for j, f in enumerate(self.features):
            if f not in X.columns:  # e.g. no ad_id: the ad offset counts as unknown
                continue
            names = (pl.lit(f + "=") + X[f].cast(pl.Utf8)).alias("n")
            col = X.select(names).to_series()
            if grow:
                for name in col.drop_nulls().unique(maintain_order=True).to_list():
                    if name not in self._column_index:
                        self._column_index[name] = len(self.columns)
                        self.columns.append(name)
            out[:, j] = col.replace_strict(
                self._column_index, default=-1, return_dtype=pl.Int64
            ).to_numpy()
        return out

    def _design(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense design matrix over the columns present in these rows, their names, and each
        (row, feature)'s column position (-1 = null or unseen).

        river's ``learn_many`` updates only the columns it is given, so absent one-hot columns
        are left out rather than passed as zeros.
        """
        present = np.unique(codes[codes >= 0])
        names = np.array([self.columns[i] for i in present.tolist()], dtype=object)
        pos = np.where(codes >= 0, np.searchsorted(present, codes), -1)
        X = np.zeros((codes.shape[0], len(present)))
        rows, feats = np.nonzero(pos >= 0)
        X[rows, pos[rows, feats]] = self._feature_value[feats]
        return X, names, pos

    def _dicts(self, codes: np.ndarray) -> list[dict[str, float]]:
        cols, fv = self.columns, self._feature_value.tolist()
        return [{cols[c]: fv[j] for j, c in enumerate(row) if c >= 0} for row in codes.tolist()]

    @staticmethod
    def _weight_vector(reg: linear_model.LinearRegression, names: np.ndarray) -> np.ndarray:
        """The regressor's weights for these columns (0 for never-learned ones)."""
        weights = reg.weights
        return np.array([weights.get(n, 0.0) for n in names.tolist()], dtype=np.float64)

    def _predict(self, X: pl.DataFrame) -> dict[str, np.ndarray]:
        """Predictions in natural units per target (NaN where the target was never learned).

        Same math as river's ``predict_many`` (mean_func(X @ w + intercept)) on numpy, without
        building a frame per chunk.
        """
        codes = self._encode(X, grow=False)
        out = {t: np.full(X.height, np.nan) for t in TARGETS}
        for start in range(0, X.height, _PREDICT_CHUNK):
            chunk = slice(start, start + _PREDICT_CHUNK)
            Xc, names, _ = self._design(codes[chunk])
            for t in TARGETS:
                scale = self.scales[t]
                if scale is not None:
                    reg = self.regressors[t]
                    eta = Xc @ self._weight_vector(reg, names) + reg.intercept
                    out[t][chunk] = reg.loss.mean_func(eta) * scale
        return out

    def _unseen(self, events: pl.DataFrame) -> pl.DataFrame:
        """Rows newer than watermark - overlap whose key was not learned yet."""
        ev = events.with_columns(
            pl.col("occurred_at").dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        )
        self.last_skipped_late = 0
        if self.watermark is not None:
            floor = self.watermark - timedelta(hours=self.config.overlap_hours)
            late = ev["occurred_at"] < floor
            self.last_skipped_late = int(late.sum())
            ev = ev.filter(~late).join(self.recent_keys, on="event_key", how="anti")
        ev = ev.unique("event_key", keep="first", maintain_order=True)
        return ev.sort("occurred_at", "event_key")

    def _advance_cursor(self, new: pl.DataFrame) -> None:
        last = new["occurred_at"].max()
        if self.watermark is None or last > self.watermark:
            self.watermark = last
        floor = self.watermark - timedelta(hours=self.config.overlap_hours)
        self.recent_keys = (
            pl.concat([self.recent_keys, new.select("event_key", "occurred_at")])
            .filter(pl.col("occurred_at") >= floor)
            .unique("event_key", keep="last")
            .sort("occurred_at", "event_key")
        )

    def _init_scales(self, frame: pl.DataFrame) -> None:
        """Freeze each target's normalizer at the pooled rate of the first data that has it."""
        for t, (num, den) in _RATIO.items():
            if self.scales[t] is not None:
                continue
            n = float(frame[den].sum())
            k = float(frame[num].sum())
            if n > 0 and k > 0:
                self.scales[t] = k / n

    def _watch(
        self,
        target: str,
        signal: str,
        acc: np.ndarray,
        times: np.ndarray,
        seen: np.ndarray,
        resid: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
    ) -> None:
        """Feed residuals to each account's ADWIN; record drifts that matter (size, cooldown).

        ``level`` streams count a detection whose pooled log rate ratio moves by ``min_shift``;
        ``surprise`` streams one whose mean |z| rises by ``surprise_min_rise`` (a fall is the
        model catching up, not a drift).
        """
        cfg = self.config
        order = np.argsort(acc, kind="stable")
        accounts, starts = np.unique(acc[order], return_index=True)
        bounds = np.append(starts, len(order))
        for a, lo, hi in zip(accounts.tolist(), bounds[:-1], bounds[1:], strict=True):
            idx = order[lo:hi]
            stream = self._streams.get((a, target, signal))
            if stream is None:
                from river import drift

                stream = _Stream(
                    drift.ADWIN(
                        delta=cfg.trait_adwin_delta
                        if signal == "trait_surprise"
                        else cfg.adwin_delta,
                        clock=cfg.adwin_clock,
                        grace_period=cfg.adwin_grace,
                    )
                )
                self._streams[(a, target, signal)] = stream
            offset = len(stream.values)
            stream.extend(resid[idx], observed[idx], expected[idx], times[idx])
            cut = 0  # history before the last detection is not reused for the next change point
            det = stream.detector
            for i, v in enumerate(resid[idx].tolist()):  # ADWIN is sequential (Rust core)
                det.update(v)
                if det.drift_detected:
                    end = offset + i + 1
                    begin = max(cut, end - _TAIL)
                    cp, shift = stream.locate(begin, end)
                    cut = end
                    if signal.endswith("surprise"):
                        v = stream.values
                        rise = float(v[cp:end].mean() - v[begin:cp].mean())
                        n1, n2 = max(cp - begin, 1), max(end - cp, 1)
                        t_stat = rise / (
                            (float(v[begin:end].std()) + 1e-9) * np.sqrt(1 / n1 + 1 / n2)
                        )
                        matters = rise >= cfg.surprise_min_rise and t_stat >= cfg.surprise_min_t
                    else:
                        matters = abs(shift) >= cfg.min_shift
                    if matters:
                        t_us = int(stream.times[end - 1])
                        cp_us = int(stream.times[cp])
                        self._record(a, target, signal, t_us, cp_us, int(seen[idx][i]), shift)
            stream.trim(max(cut, len(stream.values) - _TAIL))

    def _record(
        self,
        account: str,
        target: str,
        signal: str,
        t_us: int,
        cp_us: int,
        seen: int,
        shift: float,
    ) -> None:
        cooldown = int(self.config.drift_cooldown_hours * 3.6e9)
        for d in reversed(self._drifts):
            if d["account_id"] == account:
                if t_us - _us(d["detected_at"]) < cooldown:
                    return
                break
        self._drifts.append(
            {
                "account_id": account,
                "target": target,
                "detected_at": _from_us(t_us),
                "changed_at": _from_us(min(cp_us, t_us)),
                "events_seen": seen,
                "shift": shift,
                "signal": signal,
            }
        )

    def _ad_residuals(
        self, target: str, ads: np.ndarray, times: np.ndarray, num: np.ndarray, den: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected count and its variance per event from its ad's own recent rate; then update.

        The baseline is the ad's exponentially weighted rate (half-life ``baseline_half_life_h``),
        so a change stays visible for days instead of being absorbed by a fast offset; the
        variance (expected + expected^2 / baseline successes + 1) counts Poisson noise and the
        baseline's own uncertainty. Returns (expected, variance, scored): scored marks events with
        a denominator whose ad had ``surprise_min_base`` successes behind its baseline.
        """
        cfg = self.config
        base = self._baselines.setdefault(target, {})
        n = len(ads)
        expected, var, ok = np.zeros(n), np.ones(n), np.zeros(n, dtype=bool)
        half_us = cfg.baseline_half_life_h * 3.6e9
        rows = zip(ads.tolist(), times.tolist(), num.tolist(), den.tolist(), strict=True)
        for i, (ad, t_us, o, d) in enumerate(rows):
            if d <= 0 or ad is None:
                continue
            num0, den0, last = base.get(ad, (0.0, 0.0, t_us))
            decay = 0.5 ** (max(t_us - last, 0) / half_us)
            num0, den0 = num0 * decay, den0 * decay
            if num0 >= cfg.surprise_min_base and den0 > 0:
                e = d * num0 / den0
                expected[i], var[i], ok[i] = e, e + e * e / num0 + 1.0, True
            base[ad] = (num0 + o, den0 + d, max(t_us, last))
        return expected, var, ok

    def _watch_surprise(self, target: str, frame: pl.DataFrame, seen: np.ndarray) -> None:
        """Feed each account's surprise ADWINs with squared standardized residuals against the
        ads' own baselines: ``ad_surprise`` one value per event; ``trait_surprise`` pooled per
        (account, observation time, trait value) after removing the account-day's common ratio,
        so a shift shared by the ads of one trait value adds up while a shift of the whole
        account (or fatigue common to its ads) does not."""
        cfg = self.config
        num_col, den_col = _RATIO[target]
        o = frame[num_col].to_numpy()
        e, var, ok = self._ad_residuals(
            target,
            frame["ad_id"].to_numpy(),
            frame["occurred_at"].dt.epoch("us").to_numpy(),
            o,
            frame[den_col].to_numpy(),
        )
        res = frame.select("account_id", "occurred_at", *TRAITS).with_columns(
            pl.Series("_o", o), pl.Series("_e", e), pl.Series("_v", var), pl.Series("_n", seen)
        )
        res = res.filter(pl.Series(ok))
        if res.height == 0:
            return
        streams: list[tuple[str, pl.DataFrame]] = []
        if "ad" in cfg.surprise_by:
            streams.append(("ad_surprise", res.sort("occurred_at", "account_id")))
        if "trait" in cfg.surprise_by:
            k = (pl.col("_o").sum() + 1.0) / (pl.col("_e").sum() + 1.0)
            pooled = (
                res.with_columns(
                    (pl.col("_e") * k).over("account_id", "occurred_at"),
                    (pl.col("_v") * k).over("account_id", "occurred_at"),
                )
                .unpivot(
                    index=["account_id", "occurred_at", "_o", "_e", "_v", "_n"],
                    on=list(TRAITS),
                    variable_name="_trait",
                    value_name="_value",
                )
                .drop_nulls("_value")
                .group_by("account_id", "occurred_at", "_trait", "_value")
                .agg(pl.col("_o", "_e", "_v").sum(), pl.col("_n").max())
                .sort("occurred_at", "account_id", "_trait", "_value")
            )
            streams.append(("trait_surprise", pooled))
        for signal, rows in streams:
            o, e = rows["_o"].to_numpy(), rows["_e"].to_numpy()
            clip = cfg.trait_surprise_clip if signal == "trait_surprise" else cfg.surprise_clip
            z2 = np.minimum((o - e) ** 2 / rows["_v"].to_numpy(), clip)
            self._watch(
                target,
                signal,
                rows["account_id"].to_numpy(),
                rows["occurred_at"].dt.epoch("us").to_numpy(),
                rows["_n"].to_numpy(),
                z2,
                o,
                e,
            )

    def _boost(self, acc: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Per-event learning-rate multiplier: raised for a while after the account's last drift."""
        out = np.ones(len(acc))
        if not self._drifts:
            return out
        window = self.config.drift_boost_hours * 3.6e9
        last: dict[str, list[int]] = {}
        for d in self._drifts:
            last.setdefault(d["account_id"], []).append(_us(d["detected_at"]))
        for a, det_times in last.items():
            sel = acc == a
            if not sel.any():
                continue
            dt = np.sort(np.asarray(det_times))
            idx = np.searchsorted(dt, times[sel], side="right") - 1
            age = np.where(idx >= 0, times[sel] - dt[np.maximum(idx, 0)], np.inf)
            out[sel] = np.where(age < window, self.config.drift_lr_boost, 1.0)
        return out


_PREDICT_CHUNK = 8192
# numerator / denominator columns of each target's rate
_RATIO: dict[str, tuple[str, str]] = {
    "ctr": ("clicks", "impressions"),
    "click_to_lead": ("leads", "clicks"),
    "lead_value": ("pipeline_value", "value_leads"),
}


def _prepare(events: pl.DataFrame) -> pl.DataFrame:
    """Normalize an events frame: optional columns, dtypes, day of week."""
    cols = events.columns
    has_value = "pipeline_value" in cols
    ev = events.with_columns(
        [pl.lit(None, dtype=pl.Utf8).alias(c) for c in (*TRAITS, "ad_id") if c not in cols]
        + ([] if "impressions" in cols else [pl.lit(0).alias("impressions")])
        + ([] if has_value else [pl.lit(0.0).alias("pipeline_value")])
    )
    if "value_leads" not in cols:
        ev = ev.with_columns(
            (pl.col("leads") if has_value else pl.lit(0)).alias("value_leads"),
        )
    dow_src = pl.col("date") if "date" in cols else pl.col("occurred_at")
    return ev.with_columns(
        [pl.col(c).cast(pl.Utf8) for c in ("account_id", *TRAITS, "ad_id")]
        + [pl.col(c).fill_null(0).cast(pl.Float64) for c in ("impressions", "clicks", "leads")]
        + [
            pl.col("pipeline_value").fill_null(0.0).cast(pl.Float64),
            pl.col("value_leads").fill_null(0).cast(pl.Float64),
            (dow_src.dt.weekday() - 1).cast(pl.Utf8).alias("dow"),
        ]
    )


def _observations(
    frame: pl.DataFrame, target: str, scale: float | None, cfg: LearnerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalized rate, expected-success units per unit rate, sample weight) per event."""
    num_col, den_col = _RATIO[target]
    num = frame[num_col].to_numpy()
    den = frame[den_col].to_numpy()
    n = len(num)
    if scale is None:
        return np.zeros(n), np.zeros(n), np.zeros(n)
    units = den * scale if target != "lead_value" else den  # successes expected at rate == scale
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(den > 0, num / np.where(den > 0, den, 1.0) / scale, 0.0)
    # saturating weight: thin events count little, rich ones ~1, so no event dominates a step
    weight = np.where(den > 0, units / (units + cfg.weight_half), 0.0)
    return y, units, weight


def _residual(y: np.ndarray, units: np.ndarray, pred: np.ndarray, cfg: LearnerConfig) -> np.ndarray:
    """Shrunk log-ratio of observed to predicted successes, clipped; thin events give ~0."""
    m = cfg.prior_events
    observed = y * units
    expected = np.maximum(pred, 1e-9) * units
    r = np.log((observed + m) / (expected + m))
    return np.clip(r, -cfg.residual_clip, cfg.residual_clip)


def _us(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# ---------------------------------------------------------------------- evidence discounting

DECAY_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.Utf8(),
    "changed_at": pl.Datetime("us", "UTC"),
    "detected_at": pl.Datetime("us", "UTC"),
    "factor": pl.Float64(),
}
COUNT_COLUMNS: tuple[str, ...] = ("impressions", "clicks", "spend", "pipeline_value")
# allocator inputs derived from the counts above: their pre-change part is estimated from a source
# column of ``daily`` when they are not in it themselves
DERIVED_COUNTS: dict[str, str] = {"matured_spend": "spend", "conversions": "pipeline_value"}


def evidence_decay(
    drifts: pl.DataFrame,
    now: datetime,
    *,
    initial: float = 0.5,
    floor: float = 0.1,
    half_life_hours: float = 48.0,
) -> pl.DataFrame:
    """Per account with a drift detected by ``now``: the weight left to pre-change evidence.

    Uses each account's latest detection: ``factor = max(floor, initial * 0.5 ** (age /
    half_life))`` with age = now - detected_at, so a fresh (possibly false) alarm halves the old
    evidence and a confirmed-by-time one leaves ``floor`` of it. Returns account_id, changed_at
    (estimated change point; evidence before it is "pre-drift"), detected_at, factor.
    """
    if drifts.height == 0:
        return pl.DataFrame(schema=DECAY_SCHEMA)
    d = drifts
    if "changed_at" not in d.columns:
        d = d.with_columns(pl.col("detected_at").alias("changed_at"))
    age_h = (pl.lit(now).cast(pl.Datetime("us", "UTC")) - pl.col("detected_at")).dt.total_seconds(
        fractional=True
    ) / 3600.0
    return (
        d.with_columns(
            pl.col("detected_at").cast(pl.Datetime("us", "UTC")),
            pl.col("changed_at").cast(pl.Datetime("us", "UTC")),
        )
        .filter(pl.col("detected_at") <= now)
        .sort("detected_at")
        .group_by("account_id", maintain_order=True)
        .last()
        .select(
            pl.col("account_id").cast(pl.Utf8),
            "changed_at",
            "detected_at",
            pl.max_horizontal(pl.lit(floor), initial * 0.5 ** (age_h / half_life_hours)).alias(
                "factor"
            ),
        )
        .sort("account_id")
    )


def decay_counts(
    ads: pl.DataFrame,
    factors: pl.DataFrame,
    *,
    daily: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Return ``ads`` with its evidence counts discounted for the part before a drift.

    Discounted columns (those present): impressions, clicks, spend, pipeline_value, and the
    allocator's matured_spend and conversions. ``ads`` needs ad_id and account_id; ``factors``
    comes from :func:`evidence_decay`. With ``daily`` (ad_id, date and count columns) only the
    part of each total dated before the account's ``changed_at`` day is scaled by ``factor``
    (matured_spend's pre part = pre-change spend, conversions follow pipeline_value's share);
    without it the whole total is scaled, a conservative approximation that also discounts
    post-change evidence. Counts come back as Float64 (Beta and Gamma posteriors take fractional
    counts); an ``evidence_factor`` column (1.0 = untouched) is added for the reason text.
    """
    present = [c for c in (*COUNT_COLUMNS, *DERIVED_COUNTS) if c in ads.columns]
    out = ads.join(
        factors.select(pl.col("account_id").cast(pl.Utf8), "changed_at", "factor"),
        on="account_id",
        how="left",
        maintain_order="left",
    ).with_columns(pl.col("factor").fill_null(1.0))
    if daily is None:
        scaled = [(pl.col(c).cast(pl.Float64) * pl.col("factor")).alias(c) for c in present]
        return out.with_columns(scaled).rename({"factor": "evidence_factor"}).drop("changed_at")
    in_daily = [c for c in (*COUNT_COLUMNS, *DERIVED_COUNTS) if c in daily.columns]
    cut = factors.select(
        pl.col("account_id").cast(pl.Utf8), pl.col("changed_at").dt.date().alias("_cut")
    )
    pre = (
        daily.select("ad_id", "date", *in_daily)
        .join(ads.select("ad_id", "account_id"), on="ad_id", how="inner")
        .join(cut, on="account_id", how="inner")
        .filter(pl.col("date") < pl.col("_cut"))
        .group_by("ad_id")
        .agg([pl.col(c).cast(pl.Float64).sum().alias(f"_pre_{c}") for c in in_daily])
    )
    out = out.join(pre, on="ad_id", how="left", maintain_order="left")

    def pre_part(c: str) -> pl.Expr:
        if c in in_daily:
            return pl.col(f"_pre_{c}").fill_null(0.0)
        src = DERIVED_COUNTS.get(c)
        if src is None or src not in in_daily:
            return pl.lit(0.0)
        if c == "matured_spend":  # pre-change spend is old, so it has matured
            return pl.min_horizontal(pl.col(c).cast(pl.Float64), pl.col(f"_pre_{src}").fill_null(0))
        share = pl.col(f"_pre_{src}").fill_null(0.0) / pl.col(src).cast(pl.Float64)
        return pl.col(c).cast(pl.Float64) * share.fill_nan(0.0).clip(0.0, 1.0)

    scaled = [
        (pl.col(c).cast(pl.Float64) - (1.0 - pl.col("factor")) * pre_part(c))
        .clip(lower_bound=0.0)
        .alias(c)
        for c in present
    ]
    return (
        out.with_columns(scaled)
        .drop([f"_pre_{c}" for c in in_daily] + ["changed_at"])
        .rename({"factor": "evidence_factor"})
    )


# ---------------------------------------------------------------------- insights -> drifts


def events_from_insights(
    insights: pl.DataFrame, ads: pl.DataFrame | None = None, now: datetime | None = None
) -> pl.DataFrame:
    """One learner event per (ad, day) insights row whose day has ended by ``now`` (all if None).

    ``insights`` has ad_id, account_id, ``date`` (or Graph's ``date_start``), impressions,
    clicks, leads; ``ads`` (ad_id + trait columns) adds the creative traits. The event happens
    at the end of its day; its key is ``<ad_id>:<date>``.
    """
    if insights.is_empty():
        return pl.DataFrame()
    if "date" not in insights.columns and "date_start" in insights.columns:
        insights = insights.rename({"date_start": "date"})
    end = (pl.col("date").cast(pl.Datetime("us")) + pl.duration(days=1)).dt.replace_time_zone("UTC")
    events = insights.with_columns(
        pl.concat_str([pl.col("ad_id"), pl.col("date").cast(pl.Utf8)], separator=":").alias(
            "event_key"
        ),
        end.alias("occurred_at"),
    )
    if now is not None:
        events = events.filter(pl.col("occurred_at") <= now)
    if ads is not None and ads.width:
        traits = [c for c in TRAITS if c in ads.columns and c not in events.columns]
        events = events.join(ads.select("ad_id", *traits), on="ad_id", how="left")
    return events.select(
        "event_key", "occurred_at", "date", "account_id", "ad_id",
        *[c for c in TRAITS if c in events.columns], "impressions", "clicks", "leads",
    )  # fmt: skip


def detect_drifts(
    insights: pl.DataFrame,
    ads: pl.DataFrame | None = None,
    *,
    learner: InstantLearner | None = None,
    config: LearnerConfig | None = None,
) -> pl.DataFrame:
    """Drifts a learner detects on a stream of daily insights rows, fed one day at a time.

    This is what the ``online_learner`` asset does run after run (each day's rows arrive once the
    day has ended). Returns :data:`DRIFT_SCHEMA` rows (account_id, target, detected_at,
    changed_at, events_seen, shift, signal); ``detected_at`` is the end of the day whose rows
    raised the alarm, so the delay after a change is at least the rest of that day. Pass
    ``learner`` to continue an existing one (it is updated in place).
    """
    model = learner if learner is not None else InstantLearner(config)
    before = len(model._drifts)
    events = events_from_insights(insights, ads)
    if events.is_empty():
        return model.drifts.slice(before)
    for day in events.sort("date").partition_by("date", maintain_order=True):
        model.learn_many(day)
    return model.drifts.slice(before)
