"""Near-real-time orchestration: stage identity under late deliveries, the HubSpot changes
sensor (cursor, run keys, restarts, fallback poll), insights schedules and their backfills."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from optimizer_assets.defs import orchestration as orch
from optimizer_assets.defs.ingestion import deal_stage_events, hubspot_deals, meta_ad_insights
from optimizer_assets.defs.resources import (
    HubSpotResource,
    MetaResource,
    OptimizerResource,
    WarehouseResource,
)
from optimizer_assets.domain import capi, crm
from optimizer_assets.domain import webhooks as wh
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.settings_file import settings_yaml
from optimizer_assets.sandbox.webhook_sender import deal_change_events
from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, META_TOKEN
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.fixtures_sandbox import SANDBOX_TEST_CONFIG, sandbox_world

T0 = 1_793_000_000_000  # epoch ms (2026-10)
RECEIVED = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _event(event_id: int, deal: int, at: int, name: str | None, value: str | None) -> dict:
    event = {
        "eventId": event_id,
        "subscriptionId": 7,
        "portalId": 62515,
        "appId": 54321,
        "occurredAt": at,
        "subscriptionType": wh.DEAL_CREATION if name is None else wh.DEAL_PROPERTY_CHANGE,
        "attemptNumber": 0,
        "objectId": deal,
    }
    if name is not None:
        event |= {"propertyName": name, "propertyValue": value}
    return event


def _land(warehouse: Warehouse, events: list[dict], received_at: datetime) -> pl.DataFrame:
    """What the receiver stores for one delivery (append_new on event_key)."""
    rows = wh.events_frame(wh.parse_batch(json.dumps(events).encode()), received_at)
    return warehouse.append_new(wh.LANDING_TABLE, rows, ["event_key"])


# ---- a stage event is (deal, to_stage, occurred_at) --------------------------------------------
def _incremental(deliveries: list[list[dict]]) -> tuple[pl.DataFrame, int]:
    """Process deliveries one at a time like the assets do: snapshots appended (first wins),
    stage events stored by key with from_stage corrected. Returns the stored events and how many
    distinct (deal, from, to, at) events an identity WITH from_stage would have emitted."""
    landing = pl.DataFrame(schema=wh.LANDING_SCHEMA)
    snapshots = pl.DataFrame(schema=crm.DEAL_SCHEMA)
    stored = pl.DataFrame(schema=crm.STAGE_EVENT_SCHEMA)
    with_from: set[tuple] = set()
    for batch in deliveries:
        rows = wh.events_frame(wh.parse_batch(json.dumps(batch).encode()), RECEIVED)
        landing = pl.concat([landing, rows]).unique("event_key", keep="first", maintain_order=True)
        states = wh.webhook_snapshots(landing, {"p1": "acc1"})
        snapshots = pl.concat([snapshots, states]).unique(
            orch.SNAPSHOT_KEY, keep="first", maintain_order=True
        )
        events = crm.stage_events(snapshots)
        with_from |= set(events.select("deal_id", "from_stage", "to_stage", "occurred_at").rows())
        stored = pl.concat([events, stored.join(events, on="event_key", how="anti")])
    return stored, len(with_from)


def _world_events(limit_deals: int = 60) -> list[dict]:
    world = sandbox_world()
    events = deal_change_events(
        world.deal_stage_history(), world.deals(), None, world.now, portal_id=1, app_id=2
    )
    deals = sorted({e["objectId"] for e in events})[:limit_deals]
    return [e for e in events if e["objectId"] in set(deals)]


def test_shuffled_and_late_deliveries_enter_each_stage_once() -> None:
    events = _world_events()
    truth = crm.stage_events(wh.webhook_snapshots(_landing_all(events), {}))
    assert truth.height > 100
    inflated = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        order = [events[i] for i in rng.permutation(len(events))]
        late = rng.random(len(order)) < 0.3  # a third arrives after everything else (retries)
        pool = [e for e, x in zip(order, late, strict=True) if not x]
        pool += [e | {"attemptNumber": 3} for e, x in zip(order, late, strict=True) if x]
        pool += [e | {"attemptNumber": 1} for e in order[:40]]  # duplicated deliveries
        deliveries = [pool[i : i + 25] for i in range(0, len(pool), 25)]
        stored, with_from = _incremental(deliveries)
        identity = stored.select("deal_id", "to_stage", "occurred_at")
        assert identity.is_unique().all()  # each entry into a stage is one event
        assert stored["event_key"].sort().equals(truth["event_key"].sort())
        ids = [capi.event_id(*r) for r in stored.select(*capi_cols()).rows()]
        assert sorted(ids) == sorted(truth["event_key"])  # one CAPI event id per entry
        inflated += with_from - truth.height
    # the scenario really has late middle states: keyed with from_stage, they would duplicate
    assert inflated > 0


def _landing_all(events: list[dict]) -> pl.DataFrame:
    return pl.concat(
        wh.events_frame(wh.parse_batch(json.dumps(events[i : i + 90]).encode()), RECEIVED)
        for i in range(0, len(events), 90)
    ).unique("event_key", keep="first", maintain_order=True)


def capi_cols() -> tuple[str, ...]:
    return ("deal_id", "from_stage", "to_stage", "occurred_at")


# ---- the assets, with the landing table in the receiver's own file -----------------------------
@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private sandbox world (no clock), settings file, warehouse and landing file."""
    world = sandbox_world()
    with SandboxServer(world=world) as server:
        accounts = tmp_path / "accounts.yaml"
        accounts.write_text(settings_yaml(world.accounts()))
        landing = tmp_path / "webhooks.duckdb"
        monkeypatch.setenv("OPTIMIZER_WEBHOOK_WAREHOUSE", str(landing))
        resources = {
            "optimizer": OptimizerResource(
                mode="sandbox",
                sandbox_url=server.base_url,
                accounts_file=str(accounts),
                meta_token=META_TOKEN,
            ),
            "hubspot": HubSpotResource(base_url=server.base_url, access_token=HUBSPOT_TOKEN),
            "meta": MetaResource(base_url=server.base_url, access_token=META_TOKEN),
            "warehouse": WarehouseResource(path=str(tmp_path / "warehouse.duckdb")),
        }
        yield server, resources, Warehouse(tmp_path / "warehouse.duckdb"), Warehouse(landing)


def _materialize(assets, resources, **kwargs) -> dict:
    result = dg.materialize(
        assets, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kwargs
    )
    assert result.success
    return {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_late_middle_state_corrects_the_next_event_instead_of_adding_one(env) -> None:
    _, resources, warehouse, landing = env
    pipe, account = next(iter(resources["optimizer"].settings().pipeline_accounts().items()))
    minute = 60_000
    first = [
        _event(1, 900, T0, None, None),
        _event(2, 900, T0, "pipeline", pipe),
        _event(3, 900, T0, "dealstage", "lead"),
        _event(5, 900, T0 + 2 * minute, "dealstage", "showup"),
        _event(6, 900, T0 + 3 * minute, "dealstage", "won"),
    ]
    late = [_event(4, 900, T0 + minute, "dealstage", "appointment")]
    _land(landing, first, RECEIVED)
    assets = [orch.hubspot_webhook_deal_states, deal_stage_events]
    meta = _materialize(assets, resources)
    assert meta["hubspot_webhook_deal_states"]["webhook_events"] == len(first)
    before = warehouse.read("deal_stage_events")
    assert before.sort("occurred_at")["to_stage"].to_list() == ["lead", "showup", "won"]
    assert before["account_id"].to_list() == [account] * 3

    _land(landing, late + first[:2], RECEIVED + timedelta(minutes=5))  # + a redelivery
    meta = _materialize(assets, resources)
    assert meta["hubspot_webhook_deal_states"]["webhook_events"] == 1
    assert meta["deal_stage_events"]["new_events"] == 1
    assert meta["deal_stage_events"]["corrected_events"] == 1
    after = warehouse.read("deal_stage_events").sort("occurred_at")
    assert after["to_stage"].to_list() == ["lead", "appointment", "showup", "won"]
    assert after["from_stage"].to_list() == [None, "lead", "appointment", "showup"]
    # the showup event kept its key (= its CAPI event id): no second upload for it
    assert set(before["event_key"]) < set(after["event_key"])
    again = _materialize(assets, resources)  # nothing new: a re-run adds nothing
    assert again["deal_stage_events"]["new_events"] == 0
    progress = warehouse.read(orch.PROGRESS)
    assert progress.height == 3 and progress["max_received_at"].is_sorted()


# ---- the sensor ----------------------------------------------------------------------------------
def _tick(instance, resources, cursor: str | None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = orch.hubspot_changes_sensor(context)
    if isinstance(result, dg.SkipReason):
        return [], cursor, result
    return list(result.run_requests or []), result.cursor, result


def _deal_batch(first_id: int, deal: int, at: int) -> list[dict]:
    return [
        _event(first_id, deal, at, None, None),
        _event(first_id + 1, deal, at, "dealstage", "lead"),
    ]


def test_sensor_cursor_and_run_keys_across_restarts(env) -> None:
    _, resources, _, landing = env
    with dg.DagsterInstance.ephemeral() as instance:
        for i in range(3):  # three deliveries, one second apart
            _land(landing, _deal_batch(10 * i, 500 + i, T0), RECEIVED + timedelta(seconds=i))
        requests, cursor, _ = _tick(instance, resources, None)
        assert len(requests) == 1
        first = requests[0]
        assert first.tags["optimizer/webhook_events"] == "6"
        assert json.loads(cursor)["received"] is not None and len(cursor) < 1000

        # the daemon restarts: a new evaluation with the stored cursor requests nothing
        requests, cursor_after, _ = _tick(instance, resources, cursor)
        assert requests == [] and json.loads(cursor_after)["seen"] == json.loads(cursor)["seen"]

        # new rows, one committed "late" inside the overlap window, plus a duplicate delivery
        _land(landing, _deal_batch(100, 600, T0), RECEIVED + timedelta(seconds=30))
        _land(landing, _deal_batch(110, 601, T0), RECEIVED + timedelta(seconds=1.5))
        _land(landing, _deal_batch(0, 500, T0), RECEIVED + timedelta(seconds=31))
        requests, cursor2, _ = _tick(instance, resources, cursor)
        assert len(requests) == 1 and requests[0].tags["optimizer/webhook_events"] == "4"
        second = requests[0].run_key
        assert second != first.run_key

        # crash before the cursor was stored: the retried tick asks for the same run key, which
        # Dagster never runs twice; with the stored cursor nothing is asked again
        again, _, _ = _tick(instance, resources, cursor)
        assert [r.run_key for r in again] == [second]
        assert _tick(instance, resources, cursor2)[0] == []


def test_sensor_waits_while_a_loop_run_is_queued(env, monkeypatch) -> None:
    _, resources, _, landing = env
    with dg.DagsterInstance.ephemeral() as instance:
        _land(landing, _deal_batch(1, 700, T0), RECEIVED)
        queued = dg.DagsterRun(
            job_name=orch.LOOP_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED
        )
        instance.add_run(queued)
        requests, cursor, result = _tick(instance, resources, None)
        assert requests == [] and cursor is None and isinstance(result, dg.SkipReason)
        instance.report_run_canceled(queued)
        requests, cursor, _ = _tick(instance, resources, None)
        assert len(requests) == 1  # nothing was lost while waiting

        _land(landing, _deal_batch(3, 701, T0), RECEIVED + timedelta(seconds=5))

        def busy(*_args, **_kwargs):
            raise duckdb.IOException("IO Error: Could not set lock on file")

        monkeypatch.setattr(orch, "landing_since", busy)
        requests, kept, result = _tick(instance, resources, cursor)
        assert requests == [] and kept == cursor and "busy" in str(result.skip_message)


def test_fallback_poll_recovers_changes_webhooks_missed(env) -> None:
    server, resources, warehouse, landing = env
    with dg.DagsterInstance.ephemeral() as instance:
        _materialize([hubspot_deals], resources)  # the warehouse knows the world so far
        requests, cursor, _ = _tick(instance, resources, None)  # starts the search watermark
        assert requests == []
        server.advance(6)  # deals move; no webhook is delivered (a lost delivery)
        changed = server.world.deals().filter(
            pl.col("hs_lastmodifieddate") > server.world.now - timedelta(hours=6)
        )
        assert changed.height > 0
        requests, cursor, _ = _tick(instance, resources, cursor)
        assert requests == []  # found, but a webhook in flight gets one tick
        assert len(json.loads(cursor)["pending"]) >= changed.height
        requests, cursor, _ = _tick(instance, resources, cursor)
        assert len(requests) == 1 and requests[0].tags["optimizer/missed_states"] == str(
            changed.height
        )
        assert json.loads(cursor)["pending"] == []
        run_config = requests[0].run_config
        meta = _materialize(
            [orch.hubspot_webhook_deal_states, deal_stage_events], resources, run_config=run_config
        )
        assert meta["hubspot_webhook_deal_states"]["searched_states"] == changed.height
        latest = warehouse.read("deal_stage_events").sort("occurred_at").group_by("deal_id").last()
        now = latest.join(changed.select("deal_id", "dealstage"), on="deal_id")
        assert now.height == changed.height and (now["to_stage"] == now["dealstage"]).all()
        assert _tick(instance, resources, cursor)[0] == []

        # a change whose webhook arrives before the next tick never becomes a fallback run
        since = server.world.now
        server.advance(3)
        requests, cursor, _ = _tick(instance, resources, cursor)
        pending = json.loads(cursor)["pending"]
        assert requests == [] and pending
        history, deals = server.world.deal_stage_history(), server.world.deals()
        events = deal_change_events(history, deals, since, server.world.now, portal_id=1, app_id=2)
        for start in range(0, len(events), 90):
            _land(landing, events[start : start + 90], RECEIVED + timedelta(minutes=10))
        requests, cursor, _ = _tick(instance, resources, cursor)
        assert len(requests) == 1 and requests[0].tags["optimizer/missed_states"] == "0"
        assert json.loads(cursor)["pending"] == []


def test_plan_tick_is_pure_and_explains_known_states() -> None:
    cursor = orch.ChangesCursor(search_ms=0, pending=("d1|1000|s2", "d2|5000|s1"))
    known = pl.DataFrame(
        {"deal_id": ["d1", "d1", "d2"], "dealstage": ["s1", "s2", "s1"], "at_ms": [0, 1000, 10]},
        schema=orch.KNOWN_SCHEMA,
    )
    searched = pl.DataFrame(
        {"deal_id": ["d3", "d2"], "dealstage": ["s1", "s1"], "at_ms": [7, 9000]},
        schema=orch.KNOWN_SCHEMA,
    )
    landing = pl.DataFrame(
        schema={"event_key": pl.Utf8, "received_at": crm.UTC_US, "subscription_type": pl.Utf8}
    )
    plan = orch.plan_tick(cursor, landing, searched=searched, known=known, search_ms=9000)
    # d1's pending state arrived; d2 at 5000 in s1 is explained by s1 known since 10; d3 is new
    assert plan.missed.is_empty() and not plan.wants_run
    assert plan.cursor.pending == ("d3|7|s1",) and plan.cursor.search_ms == 9000
    assert orch.ChangesCursor.load(plan.cursor.dump()) == plan.cursor


def test_retry_busy_retries_then_gives_up() -> None:
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise duckdb.IOException("locked")
        return "ok"

    assert orch.retry_busy(flaky, first_delay=0.001) == "ok" and len(calls) == 3
    with pytest.raises(duckdb.IOException):
        orch.retry_busy(lambda: (_ for _ in ()).throw(duckdb.IOException("x")), 3, 0.001)


# ---- schedules and backfills ---------------------------------------------------------------------
def test_insights_schedules_follow_the_optimizer_clock(env) -> None:
    server, resources, _, _ = env
    today = server.world.now.date()
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime(2026, 11, 26, 13, 5, tzinfo=UTC),
            resources={"optimizer": resources["optimizer"]},
        )
        hourly = orch.meta_insights_hourly(context)
        repull = orch.meta_insights_repull(context)
    assert hourly.partition_key == today.isoformat()
    assert repull.tags[orch.RANGE_START_TAG] == (today - timedelta(days=2)).isoformat()
    assert repull.tags[orch.RANGE_END_TAG] == today.isoformat()
    assert orch.repull_range(date(2025, 1, 1)) is None  # before the partitions: skipped


def test_thirty_day_backfill_equals_day_by_day(tmp_path, monkeypatch) -> None:
    """The insights job over a 30-day range in one run (what the re-pull schedule and a UI/CLI
    backfill launch) stores what 30 day-by-day runs store."""
    world = sandbox_world(SANDBOX_TEST_CONFIG, 32)
    with SandboxServer(world=world) as server:
        accounts = tmp_path / "accounts.yaml"
        accounts.write_text(settings_yaml(world.accounts()))

        def resources(name: str) -> dict:
            return {
                "optimizer": OptimizerResource(
                    mode="sandbox",
                    sandbox_url=server.base_url,
                    accounts_file=str(accounts),
                    meta_token=META_TOKEN,
                ),
                "meta": MetaResource(base_url=server.base_url, access_token=META_TOKEN),
                "warehouse": WarehouseResource(path=str(tmp_path / f"{name}.duckdb")),
            }

        days = [world.config.start.date() + timedelta(days=i) for i in range(30)]
        daily = resources("daily")
        for day in days:
            _materialize([meta_ad_insights], daily, partition_key=day.isoformat())
        from optimizer_assets.definitions import defs

        job = defs.resolve_job_def(orch.INSIGHTS_JOB)
        tags = {orch.RANGE_START_TAG: days[0].isoformat(), orch.RANGE_END_TAG: days[-1].isoformat()}
        result = job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), tags=tags, resources=resources("range")
        )
        assert result.success
    by_day = Warehouse(tmp_path / "daily.duckdb").read("meta_ad_insights").sort("date", "ad_id")
    ranged = Warehouse(tmp_path / "range.duckdb").read("meta_ad_insights").sort("date", "ad_id")
    assert by_day["date"].n_unique() == 30
    assert ranged.equals(by_day)


# ---- definitions ---------------------------------------------------------------------------
def test_definitions_wire_the_loop() -> None:
    from optimizer_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    loop = defs.resolve_job_def(orch.LOOP_JOB)
    keys = {k.path[0] for k in loop.asset_layer.selected_asset_keys}
    downstream = dg.AssetSelection.assets("deal_stage_events").downstream().resolve(graph)
    downstream = {k.path[0] for k in downstream} - set(orch.CADENCES)
    expected = {
        "hubspot_deals",
        "hubspot_contacts",
        "hubspot_webhook_deal_states",
        "deal_stage_events",
        "synthetic_revenue",
        "attributed_revenue",
        "capi_events",
        "capi_uploads",
    }
    assert expected <= keys and downstream <= keys
    later = {"ad_scores", "budget_recommendations", "ad_change_plan", "ad_change_log"}
    assert later & {k.path[0] for k in graph.get_all_asset_keys()} <= keys
    assert not any(graph.get(dg.AssetKey(k)).partitions_def for k in keys)
    assert (
        dg.AssetKey("hubspot_webhook_deal_states")
        in graph.get(dg.AssetKey("deal_stage_events")).parent_keys
    )
    for name in (orch.LOOP_JOB, orch.INSIGHTS_JOB):
        assert orch.META_WRITES_TAG in defs.resolve_job_def(name).tags
    sensor = defs.resolve_sensor_def("hubspot_changes_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("optimizer_automation").default_status == (
        dg.DefaultSensorStatus.RUNNING
    )
    for name in ("meta_insights_hourly", "meta_insights_repull"):
        assert defs.resolve_schedule_def(name).default_status == dg.DefaultScheduleStatus.RUNNING
    # the periodically rebuilt assets stay out of the loop (their conditions: tests below)
    assert not set(orch.CADENCES) & keys
    assert sensor.minimum_interval_seconds < 5  # ticks on every sensor-daemon loop (5 s)


# ---- automation conditions ---------------------------------------------------------------------
AUTOMATED = {*orch.CADENCES, "online_learner"}


def test_learning_assets_declare_automation_conditions_and_nothing_else_runs_them() -> None:
    from optimizer_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    conditions = {
        key.path[0]: graph.get(key).automation_condition for key in graph.get_all_asset_keys()
    }
    assert {k for k, c in conditions.items() if c is not None} == AUTOMATED
    for key, cron in orch.CADENCES.items():  # rebuilt on their own cadence
        assert conditions[key].get_label() == dg.AutomationCondition.on_cron(cron).get_label()
    # the optimizer_automation sensor evaluates every asset that declares a condition ...
    sensor = defs.resolve_sensor_def("optimizer_automation")
    assert {k.path[0] for k in sensor.asset_selection.resolve(graph)} >= AUTOMATED
    # ... and no schedule or sensor-launched job runs them too (no double trigger)
    for name in (orch.LOOP_JOB, orch.INSIGHTS_JOB):
        selected = defs.resolve_job_def(name).asset_layer.selected_asset_keys
        assert not AUTOMATED & {k.path[0] for k in selected}
    for schedule in defs.schedules or []:
        job = defs.resolve_job_def(schedule.job_name)
        assert not AUTOMATED & {k.path[0] for k in job.asset_layer.selected_asset_keys}


def test_automation_conditions_request_the_learning_assets_on_cadence() -> None:
    """What ``optimizer_automation`` evaluates each tick, on the real definitions: nothing until
    the inputs are updated; after a cron tick with fresh inputs, the cadenced assets; after a new
    insights partition, the online learner only; never twice for the same update."""
    from optimizer_assets.definitions import defs

    now = datetime.now(UTC)
    today = now.date().isoformat()

    def tick(instance, at: datetime, cursor=None):
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, evaluation_time=at, cursor=cursor
        )
        requested = {r.key.path[0] for r in result.results if r.true_subset.size}
        return requested, result.cursor

    with dg.DagsterInstance.ephemeral() as instance:
        requested, cursor = tick(instance, now - timedelta(days=1, hours=1))
        assert requested == set()  # first evaluation: nothing requested
        for key in ("meta_ads", "ad_performance"):
            instance.report_runless_asset_event(dg.AssetMaterialization(key))
        instance.report_runless_asset_event(
            dg.AssetMaterialization("meta_ad_insights", partition=today)
        )
        # a day later: both crons ticked, every input updated since -> one request each
        requested, cursor = tick(instance, now, cursor)
        assert requested == AUTOMATED
        requested, cursor = tick(instance, now + timedelta(seconds=30), cursor)
        assert requested == set()  # handled: not requested again
        instance.report_runless_asset_event(
            dg.AssetMaterialization("meta_ad_insights", partition=today)
        )
        requested, cursor = tick(instance, now + timedelta(seconds=60), cursor)
        assert requested == {"online_learner"}  # no cron tick since: the cadenced ones wait


# ---- the warehouse waits briefly for another process's lock ------------------------------------
_HOLD_LOCK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
con.close()
print("released", flush=True)
"""


def test_warehouse_connect_waits_for_another_process_lock(tmp_path) -> None:
    import subprocess
    import sys
    import threading
    import time

    path = tmp_path / "locked.duckdb"
    Warehouse(path).replace("t", pl.DataFrame({"x": [1, 2]}))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.IOException, match="lock"):  # no wait: fails at once
            Warehouse(path, lock_wait_seconds=0).read("t")
        release = threading.Timer(0.3, lambda: (holder.stdin.write("go\n"), holder.stdin.flush()))
        started = time.monotonic()
        release.start()
        assert Warehouse(path, lock_wait_seconds=30).read("t")["x"].to_list() == [1, 2]
        assert time.monotonic() - started >= 0.3  # it did wait for the holder
        release.join()
    finally:
        holder.kill()
        holder.wait()


def test_receiver_and_dagster_agree_on_the_landing_file(tmp_path, monkeypatch) -> None:
    from optimizer_assets.webhooks.receiver import Receiver, ReceiverSettings

    main, own = str(tmp_path / "warehouse.duckdb"), str(tmp_path / "webhooks.duckdb")
    env = {"HUBSPOT_CLIENT_SECRET": "s", "OPTIMIZER_WAREHOUSE": main}
    for landing, expected in ((None, main), (own, own)):
        if landing is None:
            monkeypatch.delenv("OPTIMIZER_WEBHOOK_WAREHOUSE", raising=False)
        else:
            monkeypatch.setenv("OPTIMIZER_WEBHOOK_WAREHOUSE", landing)
            env["OPTIMIZER_WEBHOOK_WAREHOUSE"] = landing
        settings = ReceiverSettings.from_env(env)
        assert settings.warehouse_path == expected
        assert str(orch.landing_warehouse(WarehouseResource(path=main)).path) == expected
    # the receiver retries against its own deadline: its connections never wait for a lock
    assert Receiver(settings).warehouse.lock_wait_seconds == 0


# ---- the end-to-end bench's measuring helpers ----------------------------------------------------
def test_bench_records_only_accepted_sandbox_budget_updates() -> None:
    from optimizer_assets.bench import e2e_latency as e2e
    from optimizer_assets.sandbox.world import WorldError

    world = sandbox_world()
    updates = e2e.record_budget_updates(world)
    adset = world.adsets().row(0, named=True)
    new = int(adset["daily_budget"]) + 100
    world.update_adset(str(adset["adset_id"]), daily_budget=new)
    with pytest.raises(WorldError):  # below Meta's minimum: refused, not a change
        world.update_adset(str(adset["adset_id"]), daily_budget=1)
    world.update_adset(str(adset["adset_id"]), status="PAUSED")  # not a budget change
    assert [u[1:] for u in updates] == [(str(adset["adset_id"]), new)]
    assert int(world.adsets().row(0, named=True)["daily_budget"]) == new


def test_bench_splits_a_run_into_phases_and_steps() -> None:
    from optimizer_assets.bench import e2e_latency as e2e

    @dg.asset
    def first() -> None: ...

    @dg.asset(name=e2e.TARGET_ASSET, deps=[first])
    def target() -> None: ...

    job = dg.define_asset_job("timeline_job", selection=[first, target])
    defs = dg.Definitions(assets=[first, target], jobs=[job])
    with dg.DagsterInstance.ephemeral() as instance:
        assert defs.resolve_job_def("timeline_job").execute_in_process(instance=instance).success
        timelines = e2e.run_timelines(instance, "timeline_job")
    parts = set(timelines["what"])
    assert {"step first", f"step {e2e.TARGET_ASSET}", "between steps"} <= parts
    assert "steps (run start -> apply step done)" in parts
    assert (timelines["seconds"] >= 0).all()
    table = e2e.breakdown_table(timelines)
    assert f"step {e2e.TARGET_ASSET}" in table and "| runs |" in table
