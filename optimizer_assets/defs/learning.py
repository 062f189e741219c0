"""Learning across time and accounts (group `learning`): patterns, winner index, online learner.

``cross_account_patterns`` aggregates creative traits per account, then across accounts
(``domain.cross_account``). ``winner_index`` selects winners per account settings (``winners:``)
and saves a FAISS index next to the warehouse under ``winner_index/<version>/``
(``domain.winner_index``); the builds are listed in the ``winner_index_builds`` table. Each build
then deletes the directories of older versions beyond the newest ``KEEP_INDEX_VERSIONS`` (5) on
disk, never the newest build's (the one ``latest_index`` loads); their rows stay, with
``removed_at`` set.
``online_learner`` feeds every insights row not learned before to the river instant learner
(``domain.instant_learner``); its state lives in the warehouse (``online_learner_state``, one
bytes blob with its cursor) and its drift records in ``detected_drifts``. Drift is watched with
river's ADWIN on how surprising each ad-day's clicks are against the ad's own recent CTR (per ad
and pooled per creative trait value), so a CTR shift of some traits only is seen.

The allocator (``ad_scores``) reads these tables for the accounts whose ``learning:`` flags are
on (by default only drift discounting: the one that lowered regret in
``python -m optimizer_assets.bench learning_regret``; see README).
"""

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from optimizer_assets.defs.attribution import sandbox_truth
from optimizer_assets.defs.resources import OptimizerResource, WarehouseResource
from optimizer_assets.defs.revenue import md_table, read_tables
from optimizer_assets.domain import cross_account
from optimizer_assets.domain import winner_index as winner_domain
from optimizer_assets.domain.instant_learner import (
    DRIFT_SCHEMA,
    TRAITS,
    InstantLearner,
    events_from_insights,
)
from optimizer_assets.settings import Settings
from optimizer_assets.warehouse import Warehouse

STATE_TABLE = "online_learner_state"
DRIFTS_TABLE = "detected_drifts"
BUILDS_TABLE = "winner_index_builds"
# winner index versions kept on disk (newest by build time); older directories are deleted by
# the winner_index asset. The newest build is always kept, and keeping more than one means a
# reader that resolved the previous newest build just before a new one still finds its files.
KEEP_INDEX_VERSIONS = 5
# a true drift not detected this long after it happened counts as missed (check warns)
DETECTION_DEADLINE_HOURS = 168.0
_TS = pl.Datetime("us", "UTC")
_CREATIVE = ("ad_id", *TRAITS, "title", "body")


def creative_performance(wh: Warehouse) -> pl.DataFrame:
    """``ad_performance`` rows with the creative traits and copy of ``meta_ads``."""
    perf, ads = read_tables(wh, "ad_performance", "meta_ads")
    if perf.is_empty() or ads.is_empty():
        return pl.DataFrame()
    return perf.join(ads.select(_CREATIVE), on="ad_id", how="left")


def winner_limits(settings: Settings, account_ids: list[str]) -> pl.DataFrame:
    """Per-account winner thresholds from the ``winners:`` settings (null = domain default)."""
    keys = ("min_roas", "min_ctr", "min_spend", "min_age_hours")
    rows = []
    for a in account_ids:
        w = settings.for_account(a).winners
        rows.append({"account_id": a, **{k: w.get(k) for k in keys}})
    schema = {"account_id": pl.Utf8, **dict.fromkeys(keys, pl.Float64)}
    return pl.DataFrame(rows, schema=schema)


def learner_events(insights: pl.DataFrame, ads: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """One learner event per (ad, day) insights row whose day has ended by ``now``.

    The event happens at the end of its day; its key is ``<ad_id>:<date>``
    (``domain.instant_learner.events_from_insights``).
    """
    return events_from_insights(insights, ads, now)


def load_learner(wh: Warehouse) -> InstantLearner:
    """The learner saved by the last run (a new one on the first run)."""
    state = wh.read(STATE_TABLE)
    if state.is_empty():
        return InstantLearner()
    try:
        return InstantLearner.from_bytes(state.sort("saved_at")["state"][-1])
    except ValueError:  # state of an older learner version: relearn every row from scratch
        return InstantLearner()


def save_learner(wh: Warehouse, learner: InstantLearner, now: datetime) -> None:
    """Replace the stored state with ``learner`` (one row: the blob and its cursor)."""
    cursor = learner.cursor
    row = {
        "saved_at": now,
        "watermark": learner.watermark,
        "events_learned": cursor["events_learned"],
        "state": learner.to_bytes(),
    }
    schema = {"saved_at": _TS, "watermark": _TS, "events_learned": pl.Int64, "state": pl.Binary}
    wh.replace(STATE_TABLE, pl.DataFrame([row], schema=schema))


def drifts_vs_truth(detected: pl.DataFrame, truth: list[dict], now: datetime) -> pl.DataFrame:
    """Per true drift: its time, the first detection at or after it in that account, the delay
    in hours, and whether it is missed (undetected past ``DETECTION_DEADLINE_HOURS``)."""
    schema = {"account_id": pl.Utf8, "true_at": _TS}
    rows = [(str(d["account_id"]), datetime.fromisoformat(d["at"])) for d in truth]
    true = pl.DataFrame(rows, schema=schema, orient="row")
    found = (
        true.join(detected.select("account_id", "detected_at"), on="account_id", how="left")
        .filter(pl.col("detected_at").is_null() | (pl.col("detected_at") >= pl.col("true_at")))
        .group_by("account_id", "true_at")
        .agg(pl.col("detected_at").min())
    )
    out = true.join(found, on=["account_id", "true_at"], how="left")
    delay = (pl.col("detected_at") - pl.col("true_at")).dt.total_seconds(fractional=True) / 3600
    deadline = pl.col("true_at") + timedelta(hours=DETECTION_DEADLINE_HOURS)
    return out.with_columns(
        delay.alias("delay_hours"),
        (pl.col("detected_at").is_null() & (deadline < pl.lit(now).cast(_TS))).alias("missed"),
    ).sort("account_id", "true_at")


def false_alarms(detected: pl.DataFrame, truth: list[dict]) -> int:
    """Detections in accounts without a true drift, or before that account's first true drift."""
    first = {}
    for d in truth:
        at = datetime.fromisoformat(d["at"])
        first[str(d["account_id"])] = min(at, first.get(str(d["account_id"]), at))
    return sum(
        1
        for account_id, detected_at in detected.select("account_id", "detected_at").iter_rows()
        if account_id not in first or detected_at < first[account_id]
    )


@dg.asset(
    group_name="learning",
    kinds={"duckdb", "polars"},
    deps=["ad_performance", "meta_ads"],
    pool="duckdb",
    # daily, once its inputs are fresh (orchestration.CADENCES; optimizer_automation runs it)
    automation_condition=dg.AutomationCondition.on_cron("30 3 * * *"),
)
def cross_account_patterns(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Creative traits and trait pairs that win in >= 3 accounts, with their 5-20% boost and the
    reason text naming them (aggregated per account first; no ad row crosses accounts)."""
    wh = warehouse.get()
    perf = creative_performance(wh)
    found = (
        cross_account.patterns(perf)
        if perf.height
        else pl.DataFrame(schema=cross_account.PATTERN_SCHEMA)
    )
    wh.replace("cross_account_patterns", found)
    return dg.MaterializeResult(
        metadata={
            "row_count": found.height,
            "accounts": perf["account_id"].n_unique() if perf.height else 0,
            "max_boost": float(found["boost"].max() or 1.0) if found.height else 1.0,
            "patterns": md_table(found.select("pattern", "accounts_won", "boost", "reason")),
        }
    )


@dg.asset(
    group_name="learning",
    kinds={"duckdb", "polars"},
    deps=["ad_performance", "meta_ads"],
    pool="duckdb",
    # every 6 hours, once its inputs are fresh (orchestration.CADENCES)
    automation_condition=dg.AutomationCondition.on_cron("0 */6 * * *"),
)
def winner_index(
    context: dg.AssetExecutionContext, optimizer: OptimizerResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Winners per account settings, embedded and indexed with FAISS; saved (by content
    version) under ``<warehouse dir>/winner_index/<version>/`` and listed in
    ``winner_index_builds``."""
    wh, now = warehouse.get(), optimizer.now()
    perf = creative_performance(wh)
    accounts = sorted(perf["account_id"].unique().to_list()) if perf.height else []
    limits = winner_limits(optimizer.settings(), accounts)
    winners = (
        winner_domain.select_winners(perf, now=now, per_account=limits) if perf.height else perf
    )
    if winners.is_empty():  # FAISS and the embedding need at least one winner
        build = {"version": "empty", "path": None, "built_at": now, "winners": 0}
        metadata = {"winners": 0, "dimension": winner_domain.EmbeddingConfig().dim}
    else:
        index = winner_domain.build(winners)
        path = index_dir(wh, index.version)
        if not (path / winner_domain.MANIFEST_FILE).exists():  # same winners, same files
            index.save(path)
        build = {
            "version": index.version,
            "path": str(path),
            "built_at": now,
            "winners": index.size,
        }
        metadata = {"winners": index.size, "dimension": index.dim, "kind": index.kind}
    schema = {"version": pl.Utf8, "path": pl.Utf8, "built_at": _TS, "winners": pl.Int64}
    wh.upsert(BUILDS_TABLE, pl.DataFrame([build], schema=schema), keys=["version"])
    context.log.info(f"winner index {build['version']}: {build['winners']} winners")
    removed, kept = prune_index_versions(wh, now=now, keep=KEEP_INDEX_VERSIONS)
    if removed:
        context.log.info(f"winner index: removed {len(removed)} old versions: {removed}")
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "build_time": now.isoformat(),
            "version": build["version"],
            "path": build["path"] or "",
            "versions_on_disk": kept,
            "versions_removed": len(removed),
            "removed_versions": ", ".join(removed),
        }
    )


def index_dir(wh: Warehouse, version: str) -> Path:
    """Where the index of ``version`` lives: next to the warehouse file."""
    return wh.path.parent / "winner_index" / version


def prune_index_versions(
    wh: Warehouse, *, now: datetime, keep: int = KEEP_INDEX_VERSIONS
) -> tuple[list[str], int]:
    """Delete the directories of the builds older than the newest ``keep`` that have one on disk;
    the newest build (the version in use) is never deleted. Their rows in ``winner_index_builds``
    stay, with ``removed_at``. Only ``<warehouse dir>/winner_index/<version>/`` of a listed
    version is touched (a directory being saved, not yet listed, is left alone). Returns the
    removed versions and how many listed versions are left on disk."""
    builds = wh.read(BUILDS_TABLE)
    if builds.is_empty():
        return [], 0
    if "removed_at" not in builds.columns:
        builds = builds.with_columns(removed_at=pl.lit(None, dtype=_TS))
    newest_first = builds.sort("built_at", "version", descending=True)
    in_use = newest_first["version"][0]
    on_disk = newest_first.filter(pl.col("path").is_not_null() & pl.col("removed_at").is_null())[
        "version"
    ].to_list()
    keep_versions = set(on_disk[: max(keep, 1)]) | {in_use}
    removed = []
    for version in on_disk:
        if version in keep_versions:
            continue
        shutil.rmtree(index_dir(wh, version), ignore_errors=True)
        if not index_dir(wh, version).exists():
            removed.append(version)
    if removed:
        rows = newest_first.filter(pl.col("version").is_in(removed))
        wh.upsert(BUILDS_TABLE, rows.with_columns(removed_at=pl.lit(now).cast(_TS)), ["version"])
    return removed, len(on_disk) - len(removed)


def latest_index(wh: Warehouse) -> winner_domain.WinnerIndex | None:
    """The index of the newest build, loaded by its path (None before the first build)."""
    builds = wh.read(BUILDS_TABLE)
    path = builds.sort("built_at", "version")["path"][-1] if builds.height else None
    return winner_domain.WinnerIndex.load(path) if path else None


@dg.asset_check(asset=winner_index, description="Every winner finds itself first in the index.")
def winners_find_themselves(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Reloads the newest index by path and searches each winner's own creative."""
    index = latest_index(warehouse.get())
    if index is None:  # no winners yet: nothing to find
        return dg.AssetCheckResult(passed=True, metadata={"self_match_rate": 1.0, "winners": 0})
    rate = index.self_match_rate()
    return dg.AssetCheckResult(
        passed=rate == 1.0, metadata={"self_match_rate": rate, "winners": index.size}
    )


@dg.asset(
    group_name="learning",
    kinds={"duckdb", "polars"},
    deps=["meta_ad_insights", "meta_ads"],
    pool="duckdb",
    # after every insights pull; eager() would also wait for every past insights partition
    automation_condition=dg.AutomationCondition.eager().without(
        ~dg.AutomationCondition.any_deps_missing()
    ),
)
def online_learner(
    optimizer: OptimizerResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The instant learner after every insights row not learned before (cursor in its stored
    state, so a re-run learns nothing twice); drifts it detected go to ``detected_drifts``."""
    wh, now = warehouse.get(), optimizer.now()
    insights, ads = read_tables(wh, "meta_ad_insights", "meta_ads")
    learner = load_learner(wh)
    before = learner.events_learned
    events = learner_events(insights, ads, now)
    new_drifts = learner.learn_many(events) if events.height else pl.DataFrame(schema=DRIFT_SCHEMA)
    save_learner(wh, learner, now)
    wh.replace(DRIFTS_TABLE, learner.drifts)
    return dg.MaterializeResult(
        metadata={
            "events_new": learner.events_learned - before,
            "events_learned": learner.events_learned,
            "late_events_skipped": learner.last_skipped_late,
            "drifts_detected": learner.drifts.height,
            "new_drifts": new_drifts.height,
            "watermark": str(learner.watermark),
            "drifts": md_table(learner.drift_details),
        }
    )


@dg.asset_check(
    asset=online_learner,
    description="Sandbox only: detected drifts vs the sandbox's drift times (delay in hours).",
)
def drifts_match_truth(
    optimizer: OptimizerResource, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    """Warns when a true drift is still undetected a week after it happened."""
    if optimizer.mode != "sandbox":
        return dg.AssetCheckResult(passed=True, metadata={"skipped": "live mode"})
    truth = sandbox_truth(optimizer, "drifts")["data"]
    detected = warehouse.get().read(DRIFTS_TABLE)
    if detected.is_empty():
        detected = pl.DataFrame(schema=DRIFT_SCHEMA)
    table = drifts_vs_truth(detected, truth, optimizer.now())
    delays = table["delay_hours"].drop_nulls()
    return dg.AssetCheckResult(
        passed=not table["missed"].any(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "true_drifts": table.height,
            "detected": detected.height,
            "matched": delays.len(),
            "missed": int(table["missed"].sum()),
            "false_alarms": false_alarms(detected, truth),
            "median_delay_hours": float(delays.median()) if delays.len() else None,
            "drifts": md_table(table),
        },
    )


def demo_report(world, warehouse: Warehouse) -> list[tuple[str, pl.DataFrame]]:
    """Drifts detected vs the sandbox's drift times, boosts available, winner-index size."""
    detected = warehouse.read(DRIFTS_TABLE)
    if detected.is_empty():
        detected = pl.DataFrame(schema=DRIFT_SCHEMA)
    truth = world.truth_drifts()
    drifts = drifts_vs_truth(detected, truth, world.now).with_columns(
        pl.lit(false_alarms(detected, truth)).alias("false_alarms_all_accounts")
    )
    patterns = warehouse.read("cross_account_patterns")
    builds = warehouse.read(BUILDS_TABLE)
    latest_size = int(builds.sort("built_at")["winners"][-1]) if builds.height else 0
    summary = pl.DataFrame(
        {
            "drifts_detected": [detected.height],
            "true_drifts": [len(truth)],
            "boost_patterns_available": [patterns.height],
            "max_boost": [float(patterns["boost"].max()) if patterns.height else None],
            "winner_index_size": [latest_size],
            "regret_difference": ["see the learning_regret lines at the end"],
        }
    )
    return [
        ("Learning: drifts detected vs the sandbox's true drift times", drifts),
        (
            "Learning: what is available to the allocator (`learning:` flags; by default only "
            "drift discounting is on)",
            summary,
        ),
    ]


assets = [cross_account_patterns, winner_index, online_learner]
asset_checks = [winners_find_themselves, drifts_match_truth]
