"""Benchmark: winner-index search (exact vs HNSW), drift detection, instant-learner throughput.

Everything runs on seeded synthetic data in the same process:

- Winner index: top-5 single-query latency of exact ``IndexFlatIP`` and ``IndexHNSWFlat`` (the
  domain's default knobs) at 1k / 100k / 1M winners (quick: 1k / 10k), recall@5 of HNSW against
  exact (tie-aware), and the end-to-end ``similar_winners`` / ``priors_from_winners`` cost.
  Baseline: exact search on the same vectors and queries.
- Drift on the sandbox truth: ``World(WorldConfig(seed))`` for 30 days (its drift: CTR by hook
  type at hour 360), each day's insights fed to ``detect_drifts`` as the asset does; seeds 11-20
  reported (1-5, where the defaults were tuned, shown too), each also without the drift for false
  alarms; against the previous (level-only) detector and the media buyer's rule below.
- Drift on synthetic streams: the instant learner on daily ad rows with a known shift in one
  account (CTR x (1 - s), click-to-lead x (1 - s/2)) and on stationary streams: detection delay
  in simulated hours and events, misses, false alarms per simulated account-month. Baseline: a
  media buyer's rule on the same rows (alarm when an account's daily CTR moves > 30% from its
  trailing 7-day mean).
- Learner throughput: ``learn_many`` events/s against river's ``learn_one`` loop (one target, no
  drift detection) on the same events.

Regret with and without each learner (drift discounting, forgetting, cross-account boost, winner
priors) is measured on the sandbox by ``bench/learning_regret.py``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import faiss
import numpy as np
import polars as pl

from optimizer_assets.domain.instant_learner import (
    InstantLearner,
    LearnerConfig,
    detect_drifts,
    events_from_insights,
)
from optimizer_assets.domain.winner_index import (
    EmbeddingConfig,
    IndexParams,
    build,
    embed,
    make_faiss_index,
    priors_from_winners,
)
from optimizer_assets.sandbox.world import SIM_START, World, WorldConfig

START = datetime(2026, 11, 1, tzinfo=UTC)
VOCAB = {
    "hook_type": ["question", "stat", "story", "offer", "testimonial", "pain", "curiosity"],
    "format": ["image", "video", "carousel"],
    "cta": ["learn_more", "book_now", "get_quote", "sign_up", "call_now"],
    "emotion": ["trust", "urgency", "curiosity", "joy", "fear"],
}
_WORDS = np.array([f"w{i}" for i in range(5000)])


# ---------------------------------------------------------------------- winner index


def _creatives(n: int, rng: np.random.Generator, texts: int | None = None) -> pl.DataFrame:
    """Synthetic creatives; copy is drawn from a pool of ``texts`` distinct texts (reuse)."""
    pool_size = min(n, texts or n)
    words = rng.choice(_WORDS, (pool_size, 12))
    pool = np.array([" ".join(w) for w in words])
    spend = rng.uniform(100, 3000, n)
    return pl.DataFrame(
        {
            "ad_id": np.char.add("ad", np.arange(n).astype(str)),
            "account_id": np.char.add("acct", rng.integers(0, 100, n).astype(str)),
            **{k: rng.choice(v, n) for k, v in VOCAB.items()},
            "title": pool[rng.integers(0, pool_size, n)],
            "spend": spend,
            "pipeline_value": spend * rng.uniform(2.0, 6.0, n),
            "clicks": rng.integers(40, 200, n),
            "impressions": np.full(n, 2000),
        }
    )


def _latencies(index: faiss.Index, queries: np.ndarray, k: int = 5) -> np.ndarray:
    """Milliseconds per single-query search, one query per call."""
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[i : i + 1], k)
        out[i] = (time.perf_counter() - t) * 1e3
    return out


def _recall(exact_sims: np.ndarray, approx_sims: np.ndarray) -> float:
    """Tie-aware recall@k: share of approximate hits at least as similar as exact's k-th."""
    kth = exact_sims[:, -1:]
    return float(np.mean(approx_sims >= kth - 1e-5))


def _sim_loss(exact_sims: np.ndarray, approx_sims: np.ndarray) -> float:
    """Mean similarity given up per returned neighbour (what the priors feel of a miss)."""
    return float(np.mean(exact_sims) - np.mean(np.where(np.isfinite(approx_sims), approx_sims, 0)))


@dataclass
class _IndexRow:
    n: int
    embed_s: float
    flat_build_s: float
    hnsw_build_s: float
    exact_p50: float
    exact_p95: float
    hnsw_p50: float
    hnsw_p95: float
    recall: float
    sim_loss: float
    exact_queries: int
    batch_exact_qps: float
    batch_hnsw_qps: float
    sweep: list[tuple[int, float, float, float, float]]  # efSearch, p50, p95, recall, loss


def _bench_size(n: int, rng: np.random.Generator, queries: int, exact_queries: int) -> _IndexRow:
    frame = _creatives(n, rng, texts=200_000)
    t = time.perf_counter()
    x = embed(frame)
    embed_s = time.perf_counter() - t
    q = embed(_creatives(queries, np.random.default_rng(rng.integers(1 << 31))))
    t = time.perf_counter()
    flat, _ = make_faiss_index(x, kind="flat")
    flat_s = time.perf_counter() - t
    t = time.perf_counter()
    hnsw, _ = make_faiss_index(x, IndexParams(), kind="hnsw")
    hnsw_s = time.perf_counter() - t
    del x
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # single-query latency, one core: no OpenMP contention noise
    try:
        sub = q[:exact_queries]
        exact_ms = _latencies(flat, sub)
        hnsw_ms = _latencies(hnsw, q)
    finally:
        faiss.omp_set_num_threads(threads)
    exact_sims, _ = flat.search(sub, 5)
    approx_sims, _ = hnsw.search(sub, 5)
    sweep = []
    if n >= 10_000:  # recall / latency trade-off of the search breadth
        default_ef = hnsw.hnsw.efSearch
        for ef in (32, 64, 128, 256):
            hnsw.hnsw.efSearch = ef
            faiss.omp_set_num_threads(1)
            try:
                ms = _latencies(hnsw, q)
            finally:
                faiss.omp_set_num_threads(threads)
            sims, _ = hnsw.search(sub, 5)
            sweep.append(
                (
                    ef,
                    float(np.median(ms)),
                    float(np.percentile(ms, 95)),
                    _recall(exact_sims, sims),
                    _sim_loss(exact_sims, sims),
                )
            )
        hnsw.hnsw.efSearch = default_ef
    t = time.perf_counter()
    flat.search(sub, 5)
    batch_exact = len(sub) / (time.perf_counter() - t)
    t = time.perf_counter()
    hnsw.search(q, 5)
    batch_hnsw = len(q) / (time.perf_counter() - t)
    return _IndexRow(
        n=n,
        embed_s=embed_s,
        flat_build_s=flat_s,
        hnsw_build_s=hnsw_s,
        exact_p50=float(np.median(exact_ms)),
        exact_p95=float(np.percentile(exact_ms, 95)),
        hnsw_p50=float(np.median(hnsw_ms)),
        hnsw_p95=float(np.percentile(hnsw_ms, 95)),
        recall=_recall(exact_sims, approx_sims),
        sim_loss=_sim_loss(exact_sims, approx_sims),
        exact_queries=len(sub),
        batch_exact_qps=batch_exact,
        batch_hnsw_qps=batch_hnsw,
        sweep=sweep,
    )


def _index_section(quick: bool) -> str:
    rng = np.random.default_rng(20261101)
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 50_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        exact_q = 50 if n >= 1_000_000 else 200
        rows.append(_bench_size(n, rng, queries=200, exact_queries=exact_q))
    cfg, prm = EmbeddingConfig(), IndexParams()
    lines = [
        f"Vectors: d={cfg.dim} float32 (traits {cfg.trait_buckets}x4 hashed + copy "
        f"{cfg.text_features} signed-hashed 1-2 grams). HNSW: M={prm.hnsw_m}, "
        f"efConstruction={prm.ef_construction}, efSearch={prm.ef_search}. Single-query latency "
        "on 1 OpenMP thread, 200 fresh queries (exact at 1M: 50 sampled); batch = one call, "
        f"{faiss.omp_get_max_threads()} threads. Domain switches to HNSW at "
        f"{prm.hnsw_threshold:,} winners.",
        "",
        "| winners | embed s | build exact s | build HNSW s | exact p50 ms | exact p95 ms "
        "| HNSW p50 ms | HNSW p95 ms | speedup p50 | recall@5 | sim loss | batch exact q/s "
        "| batch HNSW q/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.n:,} | {r.embed_s:.2f} | {r.flat_build_s:.3f} | {r.hnsw_build_s:.2f} "
            f"| {r.exact_p50:.3f} | {r.exact_p95:.3f} | {r.hnsw_p50:.3f} | {r.hnsw_p95:.3f} "
            f"| {r.exact_p50 / r.hnsw_p50:.1f}x | {r.recall:.3f} | {r.sim_loss:.4f} "
            f"| {r.batch_exact_qps:,.0f} | {r.batch_hnsw_qps:,.0f} |"
        )
    lines += [
        "",
        "HNSW search breadth (efSearch) against exact on the same queries (sim loss = mean "
        "top-5 similarity given up):",
        "",
        "| winners | efSearch | p50 ms | p95 ms | recall@5 | sim loss |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for ef, p50, p95, rec, loss in r.sweep:
            lines.append(f"| {r.n:,} | {ef} | {p50:.3f} | {p95:.3f} | {rec:.3f} | {loss:.4f} |")
    lines += ["", _end_to_end(rng, 5_000 if quick else 10_000)]
    return "\n".join(lines)


def _end_to_end(rng: np.random.Generator, n: int) -> str:
    """Domain-level costs on a small index: build, similar_winners, priors for 1k new ads."""
    winners = _creatives(n, rng)
    t = time.perf_counter()
    index = build(winners)
    build_s = time.perf_counter() - t
    creatives = _creatives(200, np.random.default_rng(5)).with_columns(
        pl.concat_str(pl.lit("new"), "ad_id").alias("ad_id")
    )
    one = [creatives.row(i, named=True) for i in range(50)]
    ms = np.empty(len(one))
    for i, c in enumerate(one):
        t = time.perf_counter()
        index.similar_winners(c, k=5)
        ms[i] = (time.perf_counter() - t) * 1e3
    new_ads = _creatives(1_000, np.random.default_rng(6)).with_columns(
        pl.concat_str(pl.lit("new"), "ad_id").alias("ad_id")
    )
    t = time.perf_counter()
    pri = priors_from_winners(new_ads, index, k=5)
    prior_s = time.perf_counter() - t
    t = time.perf_counter()
    self_rate = index.self_match_rate()
    check_s = time.perf_counter() - t
    return (
        f"End to end on {n:,} winners ({index.kind}): build (embed + index) {build_s:.2f} s; "
        f"`similar_winners` p50 {np.median(ms):.2f} ms (embedding + search + frame); "
        f"`priors_from_winners` for 1,000 new ads {prior_s * 1e3:.0f} ms "
        f"({pri['prior_alpha'].is_not_null().mean():.0%} got a prior); "
        f"self-match check {self_rate:.3f} in {check_s:.2f} s."
    )


# ---------------------------------------------------------------------- drift


def _stream(
    seed: int,
    *,
    accounts: int,
    ads: int,
    days: int,
    shift_day: int | None,
    strength: float,
) -> pl.DataFrame:
    """Daily ad rows (observed at day end) with trait-driven rates; account a0 shifts."""
    rng = np.random.default_rng(seed)
    n = accounts * ads
    traits = {k: rng.choice(v, n) for k, v in VOCAB.items()}
    effect = {k: dict(zip(v, rng.normal(0, 0.3, len(v)), strict=True)) for k, v in VOCAB.items()}
    lift = sum(np.array([effect[k][x] for x in traits[k]]) for k in VOCAB)
    ctr0 = 0.02 * np.exp(lift + rng.normal(0, 0.15, n))
    c2l0 = 0.08 * np.exp(0.5 * lift + rng.normal(0, 0.15, n))
    account = np.array([f"a{i // ads}" for i in range(n)])
    day = np.repeat(np.arange(days), n)
    ctr, c2l = np.tile(ctr0, days), np.tile(c2l0, days)
    if shift_day is not None:
        hit = (day >= shift_day) & (np.tile(account, days) == "a0")
        ctr = np.where(hit, ctr * (1 - strength), ctr)
        c2l = np.where(hit, c2l * (1 - strength / 2), c2l)
    impressions = rng.poisson(2000, len(day))
    clicks = rng.binomial(impressions, np.minimum(ctr, 1.0))
    leads = rng.binomial(clicks, np.minimum(c2l, 1.0))
    ad_ids = np.char.add("ad", np.arange(n).astype(str))
    frame = pl.DataFrame(
        {
            "day": day,
            "ad_id": np.tile(ad_ids, days),
            "account_id": np.tile(account, days),
            **{k: np.tile(v, days) for k, v in traits.items()},
            "impressions": impressions,
            "clicks": clicks,
            "leads": leads,
        }
    )
    return frame.with_columns(
        (pl.lit(START) + pl.duration(days=pl.col("day") + 1))
        .dt.cast_time_unit("us")
        .alias("occurred_at"),
        pl.concat_str("ad_id", pl.lit(":"), "day").alias("event_key"),
    ).sort("occurred_at", "event_key")


def _rule_alarms(events: pl.DataFrame, threshold: float = 0.3, cooldown: int = 3) -> pl.DataFrame:
    """Baseline: account-day CTR vs its trailing 7-day mean; alarm on a > threshold move."""
    daily = (
        events.group_by("account_id", "day")
        .agg(pl.col("clicks").sum(), pl.col("impressions").sum())
        .sort("account_id", "day")
        .with_columns((pl.col("clicks") / pl.col("impressions")).alias("ctr"))
        .with_columns(
            pl.col("ctr").shift(1).rolling_mean(7).over("account_id").alias("trailing"),
        )
    )
    limit = float(np.log(1.0 / (1.0 - threshold)))
    alarms = daily.filter((pl.col("ctr") / pl.col("trailing")).log().abs() > limit)
    kept: list[tuple[str, int]] = []
    last: dict[str, int] = {}
    for a, d in alarms.select("account_id", "day").iter_rows():  # only alarm rows, a handful
        if d - last.get(a, -(10**9)) >= cooldown:
            kept.append((a, d))
            last[a] = d
    return pl.DataFrame(kept, schema={"account_id": pl.Utf8, "day": pl.Int64}, orient="row")


@dataclass
class _DriftScore:
    delays_h: list[float]
    delays_events: list[float]
    cut_errors_h: list[float]
    misses: int
    false_alarms: int
    account_months: float


def _score_learner(runs: list[tuple[pl.DataFrame, int | None, int, int]]) -> _DriftScore:
    s = _DriftScore([], [], [], 0, 0, 0.0)
    for events, shift_day, accounts, days in runs:
        drifts = InstantLearner().learn_many(events)
        ads = events.filter(pl.col("day") == 0).height // accounts
        if shift_day is None:
            s.false_alarms += drifts.height
            s.account_months += accounts * days / 30
            continue
        shift_at = START + timedelta(days=shift_day)
        true = (pl.col("account_id") == "a0") & (pl.col("detected_at") > shift_at)
        s.false_alarms += drifts.filter(~true).height
        s.account_months += ((accounts - 1) * days + shift_day) / 30
        hit = drifts.filter(true)
        if hit.height == 0:
            s.misses += 1
            continue
        first = hit.row(0, named=True)
        s.delays_h.append((first["detected_at"] - shift_at).total_seconds() / 3600)
        s.delays_events.append(first["events_seen"] - shift_day * ads)
        s.cut_errors_h.append(abs((first["changed_at"] - shift_at).total_seconds()) / 3600)
    return s


def _score_rule(runs: list[tuple[pl.DataFrame, int | None, int, int]]) -> _DriftScore:
    s = _DriftScore([], [], [], 0, 0, 0.0)
    for events, shift_day, accounts, days in runs:
        alarms = _rule_alarms(events)
        ads = events.filter(pl.col("day") == 0).height // accounts
        if shift_day is None:
            s.false_alarms += alarms.height
            s.account_months += accounts * days / 30
            continue
        true = (pl.col("account_id") == "a0") & (pl.col("day") >= shift_day)
        s.false_alarms += alarms.filter(~true).height
        s.account_months += ((accounts - 1) * days + shift_day) / 30
        hit = alarms.filter(true)
        if hit.height == 0:
            s.misses += 1
            continue
        d = int(hit["day"][0])
        s.delays_h.append((d + 1 - shift_day) * 24.0)  # day d is observed at its end
        s.delays_events.append((d + 1 - shift_day) * ads)
    return s


def _fmt(values: list[float], q: float = 50) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "-"


def _drift_section(quick: bool) -> str:
    seeds = range(2) if quick else range(10)
    days, shift_day = (40, 20) if quick else (60, 30)
    scenarios = [("24 ads/account", 24, 0.5), ("24 ads/account", 24, 0.3)]
    if not quick:
        scenarios += [("24 ads/account", 24, 0.2), ("200 ads/account", 200, 0.5)]
    lines = [
        f"3 accounts, daily rows per ad observed at day end, {days} simulated days, shift in "
        f"account a0 at day {shift_day} (CTR x (1 - s), click-to-lead x (1 - s/2)); "
        f"{len(seeds)} seeds per row; the same number of stationary worlds feed the false-alarm "
        "rate with the untouched accounts. Delay floor is 24 h (first post-shift row).",
        "",
        "| stream | shift s | detector | delay h p50 | delay h p90 | delay events p50 "
        "| change-point error h p50 | misses | false alarms / account-month |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ads, strength in scenarios:
        runs = []
        for seed in seeds:
            kw = {"accounts": 3, "ads": ads, "days": days, "strength": strength}
            runs.append((_stream(seed, shift_day=shift_day, **kw), shift_day, 3, days))
            runs.append((_stream(seed + 1000, shift_day=None, **kw), None, 3, days))
        for name, score in (
            ("instant learner (ADWIN)", _score_learner(runs)),
            ("baseline: 30% vs 7-day CTR", _score_rule(runs)),
        ):
            fa = score.false_alarms / score.account_months
            lines.append(
                f"| {label} | {strength} | {name} | {_fmt(score.delays_h)} "
                f"| {_fmt(score.delays_h, 90)} | {_fmt(score.delays_events)} "
                f"| {_fmt(score.cut_errors_h)} | {score.misses}/{len(seeds)} | {fa:.3f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------- drift on the sandbox

SANDBOX_DAYS = 30
TUNE_SEEDS = (1, 2, 3, 4, 5)  # the detector's defaults were chosen on these
REPORT_SEEDS = tuple(range(11, 21))


def _sandbox_run(seed: int, drift: bool) -> tuple[pl.DataFrame, pl.DataFrame, list[dict]]:
    """30 simulated days of ``World(WorldConfig(seed))`` (3 accounts x 24 ads, drift at hour 360
    unless ``drift`` is False): all accounts' daily insights, the ads, the true drifts."""
    cfg = WorldConfig(seed=seed) if drift else WorldConfig(seed=seed, drift_at_hours=None)
    world = World(cfg)
    world.advance(SANDBOX_DAYS * 24)
    start = cfg.start.date()
    until = start + timedelta(days=SANDBOX_DAYS)
    insights = pl.concat(world.insights(a, start, until) for a in world.accounts()["account_id"])
    return insights, world.ads(), world.truth_drifts()


@dataclass
class _SandboxScore:
    delays_h: list[float]
    delays_events: list[float]
    true_drifts: int = 0
    misses: int = 0
    false_alarms: int = 0
    repeats: int = 0  # further detections after an account's first post-drift one
    account_months: float = 0.0


def _rule_drifts(insights: pl.DataFrame) -> pl.DataFrame:
    """The media buyer's rule on sandbox rows, as drift records (detected at the day's end)."""
    days = insights.with_columns(
        ((pl.col("date_start") - pl.col("date_start").min()).dt.total_days()).alias("day")
    )
    alarms = _rule_alarms(days)
    return alarms.select(
        "account_id",
        (pl.lit(SIM_START) + pl.duration(days=pl.col("day") + 1)).alias("detected_at"),
        pl.lit(None, dtype=pl.Int64).alias("events_seen"),
    )


def _score_sandbox(runs: list[tuple], detector) -> _SandboxScore:
    s = _SandboxScore([], [])
    for insights, ads, truth, n_accounts in runs:
        drifts = detector(insights, ads)
        if not truth:
            s.false_alarms += drifts.height
            s.account_months += n_accounts * SANDBOX_DAYS / 30
            continue
        events = events_from_insights(insights, ads)
        for d in truth:
            at = datetime.fromisoformat(d["at"])
            s.true_drifts += 1
            s.account_months += (at - SIM_START).total_seconds() / 86400 / 30
            mine = drifts.filter(pl.col("account_id") == d["account_id"]).sort("detected_at")
            s.false_alarms += mine.filter(pl.col("detected_at") < at).height
            after = mine.filter(pl.col("detected_at") >= at)
            if after.height == 0:
                s.misses += 1
                continue
            s.repeats += after.height - 1
            first = after.row(0, named=True)
            s.delays_h.append((first["detected_at"] - at).total_seconds() / 3600)
            if first["events_seen"] is not None:
                before = events.filter(
                    (pl.col("account_id") == d["account_id"]) & (pl.col("occurred_at") <= at)
                ).height
                s.delays_events.append(first["events_seen"] - before)
    return s


def _sandbox_drift_section(quick: bool) -> str:
    report = REPORT_SEEDS[:2] if quick else REPORT_SEEDS
    sets = [("report", report)] + ([] if quick else [("tune", TUNE_SEEDS)])
    previous = LearnerConfig(  # the detector before issue 7 part 1: signed level residual only
        surprise=False, level=True, adwin_delta=0.002, surprise_clip=4.0
    )
    detectors = [
        ("instant learner (ADWIN on surprise)", lambda i, a: detect_drifts(i, a)),
        ("previous learner (ADWIN on level)", lambda i, a: detect_drifts(i, a, config=previous)),
        ("baseline: 30% vs 7-day CTR", lambda i, a: _rule_drifts(i)),
    ]
    lines = [
        f"`World(WorldConfig(seed=s))` driven in-process for {SANDBOX_DAYS} days (3 accounts x "
        "24 ads, no allocator: budgets stay as seeded); its drift moves CTR by hook type "
        "(x exp(0.5 z), z spread over [-1, 1]) at hour 360 in every account. Each seed also runs "
        "without the drift (`drift_at_hours=None`) for the false-alarm rate. The learner gets "
        "each day's insights rows once the day has ended (`detect_drifts`, as the asset does), "
        "so the delay floor is 24 h. Delay in events = account events learned after the drift "
        "up to the alarm. False alarms = alarms before the drift or in drift-free worlds, per "
        "account-month observed without a drift; repeats = further alarms after the first "
        "post-drift one.",
        "",
        "| seeds | detector | detected | delay h p50 | delay h p90 | delay events p50 "
        "| false alarms / account-month | repeats |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, seeds in sets:
        runs = []
        for seed in seeds:
            for drift in (True, False):
                insights, ads, truth = _sandbox_run(seed, drift)
                runs.append((insights, ads, truth, insights["account_id"].n_unique()))
        for name, detector in detectors:
            sc = _score_sandbox(runs, detector)
            fa = sc.false_alarms / sc.account_months if sc.account_months else 0.0
            lines.append(
                f"| {label} {seeds[0]}-{seeds[-1]} | {name} "
                f"| {sc.true_drifts - sc.misses}/{sc.true_drifts} | {_fmt(sc.delays_h)} "
                f"| {_fmt(sc.delays_h, 90)} | {_fmt(sc.delays_events)} | {fa:.3f} "
                f"| {sc.repeats} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------- learner throughput


def _throughput_section(quick: bool) -> str:
    from river import compose, linear_model, optim, preprocessing

    accounts, ads, days = (10, 100, 10) if quick else (20, 250, 20)
    events = _stream(7, accounts=accounts, ads=ads, days=days, shift_day=None, strength=0.0)
    n_base = 2_000 if quick else 10_000
    rows = events.head(n_base).select("account_id", *VOCAB, "clicks", "impressions").to_dicts()
    ours, base = [], []
    for _ in range(3):  # interleaved repetitions: load on a shared box hits both alike
        learner = InstantLearner()
        t = time.perf_counter()
        learner.learn_many(events)
        ours.append(events.height / (time.perf_counter() - t))
        model = compose.Pipeline(
            preprocessing.OneHotEncoder(),
            linear_model.LinearRegression(optimizer=optim.SGD(0.05), loss=optim.losses.Poisson()),
        )
        t = time.perf_counter()
        for r in rows:  # the baseline is the per-event river loop itself
            x = {k: r[k] for k in ("account_id", *VOCAB)}
            model.learn_one(x, r["clicks"] / max(r["impressions"], 1) / 0.02)
        base.append(n_base / (time.perf_counter() - t))
    t = time.perf_counter()
    blob = learner.to_bytes()
    InstantLearner.from_bytes(blob)
    persist_ms = (time.perf_counter() - t) * 1e3
    o, b = float(np.median(ours)), float(np.median(base))
    return (
        "Median of 3 interleaved runs.\n\n"
        "| learner | events | events/s | vs baseline |\n|---|---:|---:|---:|\n"
        f"| `InstantLearner.learn_many` (3 targets + ADWIN per account) | {events.height:,} "
        f"| {o:,.0f} | {o / b:.2f}x |\n"
        f"| baseline: river `learn_one` loop, OneHotEncoder + LinearRegression, 1 target "
        f"| {n_base:,} | {b:,.0f} | 1.00x |\n\n"
        f"State after {events.height:,} events: {len(blob) / 1024:.0f} KiB pickled; "
        f"to_bytes + from_bytes {persist_ms:.0f} ms."
    )


def main(quick: bool = False) -> str:
    """Markdown report of winner-index search, drift detection and learner throughput."""
    started = time.perf_counter()
    load = os.getloadavg()[0]
    parts = [
        f"_{os.cpu_count()} cores, load average {load:.1f} at start (shared machine: absolute "
        "timings are noisy; ratios are measured in the same process)._",
        "",
        "### Winner index: top-5 search",
        "",
        _index_section(quick),
        "",
        "### Drift detection on the sandbox truth (instant learner)",
        "",
        _sandbox_drift_section(quick),
        "",
        "### Drift detection on synthetic streams (uniform shift of one account)",
        "",
        _drift_section(quick),
        "",
        "### Instant learner throughput",
        "",
        _throughput_section(quick),
        "",
        "### Regret",
        "",
        "Not yet measured: regret with/without drift discounting, the cross-account boost and "
        "winner priors needs the allocator integrated with the sandbox (issue 7 follow-up).",
        "",
        f"_learning bench wall time {time.perf_counter() - started:.1f} s_",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv))
