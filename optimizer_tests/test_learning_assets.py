"""Learning assets on a small sandbox: patterns, winner index, online learner, persistence."""

from __future__ import annotations

import datetime as dt
import shutil

import dagster as dg
import polars as pl
import pytest

from optimizer_assets import definitions
from optimizer_assets.defs import learning
from optimizer_assets.defs.resources import WarehouseResource, build_resources
from optimizer_assets.domain.instant_learner import DRIFT_SCHEMA
from optimizer_assets.domain.winner_index import WinnerIndex
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.settings_file import settings_yaml
from optimizer_assets.sandbox.world import WorldConfig
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fixtures_sandbox import sandbox_world

# 3 accounts so cross-account patterns can exist; 8 days simulated before the loop runs
CONFIG = WorldConfig(seed=5, accounts=3, ads_per_account=12)
LOOP_DAYS = 1
LEARNING = [learning.cross_account_patterns, learning.winner_index, learning.online_learner]
# the loop assets the learning group reads from, and the learning group itself (the rest of the
# loop, CAPI uploads and budget changes, doubles the run time and feeds nothing here)
LEARNING_AND_UPSTREAM = dg.AssetSelection.assets(*LEARNING).upstream()
# per-account winner thresholds (settings `winners:`), loose so a 10-day world has winners
LOOSE_WINNERS = "  winners: {min_roas: 0.0, min_ctr: 0.0, min_spend: 1.0, min_age_hours: 0.0}\n"


def materialize(assets, resources, instance, **kwargs) -> tuple[dict, dict]:
    """Run and return (asset metadata, check results) keyed by asset / check name."""
    result = dg.materialize(assets, resources=resources, instance=instance, **kwargs)
    assert result.success
    meta = {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    return meta, {c.check_name: c for c in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The loop (learning and what it reads) run for the last ``LOOP_DAYS`` days of a private
    sandbox; yields (server, resources, warehouse, instance, metadata, checks) of the last day."""
    tmp = tmp_path_factory.mktemp("learning")
    world = sandbox_world(CONFIG, days=8)
    with (
        SandboxServer(world=world) as server,
        pytest.MonkeyPatch.context() as mp,
        dg.instance_for_test() as instance,
    ):
        accounts_file = tmp / "accounts.yaml"
        yaml_text = settings_yaml(world.accounts())
        accounts_file.write_text(
            yaml_text.replace("  timezone: UTC\n", "  timezone: UTC\n" + LOOSE_WINNERS)
        )
        mp.setenv("OPTIMIZER_MODE", "sandbox")
        mp.setenv("OPTIMIZER_SANDBOX_URL", server.base_url)
        mp.setenv("OPTIMIZER_ACCOUNTS_FILE", str(accounts_file))
        mp.setenv("OPTIMIZER_WAREHOUSE", str(tmp / "warehouse.duckdb"))
        resources = build_resources()
        loop = [*definitions.loop_assets, *definitions.loop_checks]
        today = world.now.date()
        for i in range(LOOP_DAYS, 0, -1):
            day = (today - dt.timedelta(days=i)).isoformat()
            meta, checks = materialize(
                loop, resources, instance, partition_key=day, selection=LEARNING_AND_UPSTREAM
            )
        wh = Warehouse(tmp / "warehouse.duckdb")
        yield server, resources, wh, instance, meta, checks


def test_learning_assets_after_the_loop(learned):
    server, _, wh, _, meta, checks = learned
    assert {"cross_account_patterns", "winner_index", "online_learner"} <= set(meta)
    learner = meta["online_learner"]
    # every ingested (ad, day) insights row of a day that has ended, learned once
    assert learner["events_learned"] == wh.read("meta_ad_insights").height > 0
    state = wh.read(learning.STATE_TABLE)
    assert state.height == 1 and state["state"][0]
    assert wh.read(learning.DRIFTS_TABLE).columns == list(DRIFT_SCHEMA)
    # the drift check compared with the sandbox truth (no drift yet at day 8 of this world)
    drift_check = checks["drifts_match_truth"]
    assert drift_check.passed
    assert drift_check.metadata["true_drifts"].value == len(server.world.truth_drifts())
    # winners: selected per settings, saved next to the warehouse, each finds itself first
    builds = wh.read(learning.BUILDS_TABLE)
    assert meta["winner_index"]["version"] in builds["version"].to_list()
    assert meta["winner_index"]["winners"] > 0 and meta["winner_index"]["dimension"] > 0
    assert checks["winners_find_themselves"].passed
    patterns = wh.read("cross_account_patterns")
    assert set(patterns.columns) >= {"pattern", "accounts_won", "boost", "reason"}
    assert (patterns["accounts_won"] >= 3).all()
    assert patterns["boost"].is_between(1.05, 1.20).all()


def test_rerun_learns_nothing_twice_and_index_reloads(learned):
    server, resources, wh, instance, _, _ = learned
    first, _ = materialize(LEARNING, resources, instance)
    again, checks = materialize([*LEARNING, *learning.asset_checks], resources, instance)
    assert first["online_learner"]["events_learned"] > 0
    assert again["online_learner"]["events_new"] == 0
    assert again["online_learner"]["events_learned"] == first["online_learner"]["events_learned"]
    assert checks["winners_find_themselves"].passed
    # the index reloads by path and answers like the one just built
    index = learning.latest_index(wh)
    assert index is not None and index.size == again["winner_index"]["winners"] > 0
    reloaded = WinnerIndex.load(learning.index_dir(wh, again["winner_index"]["version"]))
    assert reloaded.version == index.version == again["winner_index"]["version"]
    probe = index.winners.head(5)
    assert index.search(probe, k=3).equals(reloaded.search(probe, k=3))
    assert (reloaded.search(probe, k=1, exclude_self=False)["ad_id"] == probe["ad_id"]).all()
    # a new day of data is learned, and only that day
    server.world.advance(24)
    day = server.world.now.date() - dt.timedelta(days=1)
    insights = [a for a in definitions.loop_assets if a.key.path[0] == "meta_ad_insights"]
    materialize(insights, resources, instance, partition_key=day.isoformat())
    later, _ = materialize([learning.online_learner], resources, instance)
    day_rows = wh.read("meta_ad_insights").filter(pl.col("date") == day)
    assert later["online_learner"]["events_new"] == day_rows.height > 0


BUILD_SCHEMA = {"version": pl.Utf8, "path": pl.Utf8, "built_at": pl.Datetime("us", "UTC")}


def _fake_builds(wh: Warehouse, versions: list[str], start: dt.datetime) -> None:
    """List ``versions`` as builds one hour apart from ``start``, each with a directory."""
    rows = []
    for i, version in enumerate(versions):
        d = learning.index_dir(wh, version)
        d.mkdir(parents=True)
        (d / "winners.faiss").write_bytes(b"x")
        rows.append({"version": version, "path": str(d), "built_at": start + dt.timedelta(hours=i)})
    frame = pl.DataFrame(rows, schema=BUILD_SCHEMA).with_columns(winners=pl.lit(1, pl.Int64))
    wh.upsert(learning.BUILDS_TABLE, frame, keys=["version"])


def test_index_retention_keeps_the_newest_versions_and_the_one_in_use(tmp_path):
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    now = start + dt.timedelta(days=1)
    versions = [f"v{i}" for i in range(8)]
    _fake_builds(wh, versions, start)
    unlisted = learning.index_dir(wh, "being_saved")  # saved, not listed yet: never touched
    unlisted.mkdir()
    removed, kept = learning.prune_index_versions(wh, now=now, keep=3)
    assert removed == ["v4", "v3", "v2", "v1", "v0"] and kept == 3
    on_disk = sorted(p.name for p in (tmp_path / "winner_index").iterdir())
    assert on_disk == ["being_saved", "v5", "v6", "v7"]
    builds = wh.read(learning.BUILDS_TABLE).sort("version")
    assert builds["version"].to_list() == versions  # the rows stay, marked
    assert builds["removed_at"].is_not_null().to_list() == [True] * 5 + [False] * 3
    assert learning.prune_index_versions(wh, now=now, keep=3) == ([], 3)
    # an old version built again is the one in use: kept even with keep=0, and listed again
    shutil.rmtree(learning.index_dir(wh, "v1"), ignore_errors=True)
    _fake_builds(wh, ["v1"], now)
    removed, kept = learning.prune_index_versions(wh, now=now, keep=0)
    assert removed == ["v7", "v6", "v5"] and kept == 1
    assert learning.index_dir(wh, "v1").exists()
    assert wh.read(learning.BUILDS_TABLE).filter(pl.col("removed_at").is_null())[
        "version"
    ].to_list() == ["v1"]


def test_winner_index_asset_removes_old_versions_and_reports_them(learned, tmp_path):
    """On a copy of the loop's warehouse with 6 older listed builds: a build leaves the newest
    KEEP_INDEX_VERSIONS on disk (its own included), says what it removed, and still loads."""
    _, resources, wh, instance, _, _ = learned
    resources = dict(resources)
    copy = Warehouse(tmp_path / "warehouse.duckdb")
    shutil.copy(wh.path, copy.path)
    shutil.copytree(wh.path.parent / "winner_index", tmp_path / "winner_index")
    old = [f"old{i}" for i in range(6)]
    _fake_builds(copy, old, dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    resources["warehouse"] = WarehouseResource(path=str(copy.path))
    meta, _ = materialize([learning.winner_index], resources, instance)
    built = meta["winner_index"]
    on_disk = copy.read(learning.BUILDS_TABLE).filter(pl.col("removed_at").is_null())
    assert built["versions_on_disk"] == on_disk.height == learning.KEEP_INDEX_VERSIONS
    removed = built["removed_versions"].split(", ")
    assert built["versions_removed"] == len(removed) >= 2
    assert set(removed) <= set(old) and {"old0", "old1"} <= set(removed)
    assert not any(learning.index_dir(copy, v).exists() for v in removed)
    assert learning.index_dir(copy, built["version"]).exists()
    assert learning.latest_index(copy).version == built["version"]


def test_drifts_vs_truth_reports_delay_and_misses():
    at = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
    truth = [
        {"at": "2026-11-16T00:00:00Z", "account_id": "1"},
        {"at": "2026-11-16T00:00:00Z", "account_id": "2"},
    ]
    detected = pl.DataFrame(
        [
            ("1", at - dt.timedelta(hours=100)),  # before the drift: a false alarm
            ("1", at + dt.timedelta(hours=30)),
            ("1", at + dt.timedelta(hours=60)),
            ("3", at),  # an account without a drift: a false alarm
        ],
        schema={"account_id": pl.Utf8, "detected_at": pl.Datetime("us", "UTC")},
        orient="row",
    )
    table = learning.drifts_vs_truth(detected, truth, now=at + dt.timedelta(days=10))
    assert table["account_id"].to_list() == ["1", "2"]
    assert table["delay_hours"].to_list() == [30.0, None]
    assert table["missed"].to_list() == [False, True]
    assert learning.false_alarms(detected, truth) == 2
    early = learning.drifts_vs_truth(detected, truth, now=at + dt.timedelta(days=2))
    assert not early["missed"].any()  # account 2 still has time to detect it
