"""End-to-end latency of the near-real-time loop, measured with the Dagster daemon running.

From a deal-stage change in the sandbox (the moment the simulated clock step that makes it
returns) to the budget change applied in the sandbox (the ``TARGET_ASSET`` materialization of
the first loop run that covered the change). The path: the sandbox plays HubSpot's webhooks ->
the receiver stores them -> ``hubspot_changes_sensor`` (in ``dagster-daemon run``) requests a
run -> the run coordinator launches it -> stage events -> revenue -> attribution -> CAPI ->
scores -> plan -> apply.

Set-up: a seeded sandbox world (3 accounts x 24 ads, 10 days in) served in this process with its
clock stopped, the webhook receiver (its own landing file), a warehouse bootstrapped with every
loop asset, then ``dagster-daemon run`` on a temporary ``DAGSTER_HOME`` with the repository's
``dagster.yaml``. The bench moves the clock in small steps until deals change, one step every
``interval_s`` seconds (a steady stream: runs queue behind each other as they would in
production), and afterwards joins each change to the landing table (``received_at``), the
webhook asset's progress table (which run consumed it) and the Dagster event log (when that
run's apply step finished).

``quick=True`` (seconds, no daemon) only measures what one sensor tick costs in-process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from optimizer_assets.instance import REPO_ROOT, prepare_dagster_home

# The asset whose materialization means "the budget change is applied in the sandbox"; measure to
# another loop asset by changing this line (e.g. "budget_recommendations").
TARGET_ASSET = "ad_change_log"
CHANGES = 24  # clock steps with at least one deal-stage change each
INTERVAL_S = 10.0  # real seconds between two steps
STEP_HOURS = 0.5  # simulated hours per clock step (repeated until a deal changes stage)
DRAIN_S = 240.0  # how long to wait after the last change for its run to finish


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _env(tmp: Path, sandbox_url: str, accounts: Path) -> dict[str, str]:
    return {
        "DAGSTER_HOME": str(prepare_dagster_home(tmp / "dagster_home")),
        "OPTIMIZER_MODE": "sandbox",
        "OPTIMIZER_SANDBOX_URL": sandbox_url,
        "OPTIMIZER_ACCOUNTS_FILE": str(accounts),
        "OPTIMIZER_WAREHOUSE": str(tmp / "warehouse.duckdb"),
        "OPTIMIZER_WEBHOOK_WAREHOUSE": str(tmp / "webhooks.duckdb"),
    }


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bootstrap(world_days: list[str]) -> None:
    """Every loop asset once (insights for the last days), in this process."""
    import dagster as dg

    from optimizer_assets.defs.ingestion import meta_ad_insights
    from optimizer_assets.defs.resources import build_resources

    resources = build_resources()
    from optimizer_assets.definitions import loop_assets

    for day in world_days[:-1]:
        dg.materialize([meta_ad_insights], resources=resources, partition_key=day)
    result = dg.materialize(loop_assets, resources=resources, partition_key=world_days[-1])
    if not result.success:
        raise RuntimeError("bootstrap materialization failed")


def _target_records(instance) -> list:
    import dagster as dg

    return list(instance.fetch_materializations(dg.AssetKey(TARGET_ASSET), limit=10_000).records)


def _finished_after(instance, moment: float) -> bool:
    """A loop run that started after ``moment`` (so it read that change) has finished."""
    import dagster as dg

    done = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
    runs = instance.get_run_records(
        dg.RunsFilter(job_name="hubspot_changes_loop", statuses=done), limit=5
    )
    return any(r.start_time and r.start_time > moment + 1.0 for r in runs)


def _start_daemon(env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "dagster-daemon"), "run"]
    command += ["-m", "optimizer_assets.definitions"]
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _step_until_change(sandbox, seen: int) -> tuple[pl.DataFrame, float]:
    """Advance the clock until new stage changes exist; (those changes, wall time)."""
    while True:
        before = sandbox.world.now
        sandbox.advance(STEP_HOURS)
        with sandbox.lock:
            history = sandbox.world.deal_stage_history()
        if history.height > seen:
            at = time.time()
            new = history.filter(pl.col("occurred_at") > before)
            # webhooks carry occurredAt in milliseconds
            at_ms = pl.col("occurred_at").dt.truncate("1ms")
            return new.select("deal_id", "dealstage", at_ms.alias("occurred_at")), at


def _latencies(changes: pl.DataFrame, tmp: Path, instance) -> tuple[pl.DataFrame, dict]:
    """Per change: received_at, the run that consumed it and when its apply step finished."""
    from optimizer_assets.defs import orchestration as orch
    from optimizer_assets.domain import webhooks as wh
    from optimizer_assets.warehouse import Warehouse

    landing = Warehouse(tmp / "webhooks.duckdb").read(wh.LANDING_TABLE)
    stage_rows = landing.filter(
        (pl.col("subscription_type") == wh.DEAL_PROPERTY_CHANGE)
        & (pl.col("property_name") == wh.STAGE_PROPERTY)
    ).select(
        pl.col("object_id").alias("deal_id"),
        pl.col("property_value").alias("dealstage"),
        pl.col("occurred_at"),
        "received_at",
    )
    progress = Warehouse(tmp / "warehouse.duckdb").read(orch.PROGRESS)
    records = _target_records(instance)
    done = pl.DataFrame(
        {
            "run_id": [r.run_id for r in records],
            "applied_at": [r.timestamp for r in records],
            "applied": [
                int(getattr(r.asset_materialization.metadata.get("applied"), "value", 0) or 0)
                for r in records
            ],
        },
        schema={"run_id": pl.Utf8, "applied_at": pl.Float64, "applied": pl.Int64},
    )
    runs = progress.join(done, on="run_id", how="inner").sort("applied_at")
    rows = []
    joined = changes.join(stage_rows, on=["deal_id", "dealstage", "occurred_at"], how="left")
    for change in joined.iter_rows(named=True):
        received = change["received_at"]
        covering = runs.filter(pl.col("max_received_at") >= received) if received else runs.clear()
        first = covering.head(1)
        with_budget = covering.filter(pl.col("applied") > 0).head(1)
        rows.append(
            {
                **change,
                "webhook_s": received.timestamp() - change["changed_at"] if received else None,
                "latency_s": first["applied_at"][0] - change["changed_at"]
                if first.height
                else None,
                "budget_latency_s": with_budget["applied_at"][0] - change["changed_at"]
                if with_budget.height
                else None,
            }
        )
    per_change = pl.DataFrame(rows)
    stats = {
        "loop_runs": runs.height,
        "runs_applying_changes": int((runs["applied"] > 0).sum()) if runs.height else 0,
    }
    return per_change, stats


def measure(changes: int = CHANGES, interval_s: float = INTERVAL_S) -> str:
    """Run the end-to-end measurement; a markdown report."""
    import dagster as dg

    from optimizer_assets.sandbox.server import SandboxServer
    from optimizer_assets.sandbox.settings_file import settings_yaml
    from optimizer_assets.sandbox.world import World, WorldConfig
    from optimizer_assets.webhooks.receiver import ReceiverServer, ReceiverSettings

    world = World(WorldConfig(seed=7))
    world.advance(24 * 10)
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="e2e-latency-") as name:
        tmp = Path(name)
        accounts = tmp / "accounts.yaml"
        accounts.write_text(settings_yaml(world.accounts()))
        receiver_settings = ReceiverSettings(
            client_secret=secret, warehouse_path=str(tmp / "webhooks.duckdb")
        )
        with (
            ReceiverServer(receiver_settings) as receiver,
            SandboxServer(world=world, webhook_url=receiver.url, webhook_secret=secret) as sandbox,
        ):
            env = _env(tmp, sandbox.base_url, accounts)
            with _environ(env):
                today = world.now.date()
                days = [(today - timedelta(days=n)).isoformat() for n in range(6, -1, -1)]
                started = time.perf_counter()
                _bootstrap(days)
                bootstrap_s = time.perf_counter() - started
                daemon = _start_daemon(env, tmp / "daemon.log")
                instance = dg.DagsterInstance.get()
                try:
                    seen = world.deal_stage_history().height
                    # warm-up: the first change starts the code server, sensor and first run
                    warm, _ = _step_until_change(sandbox, seen)
                    seen += warm.height
                    deadline = time.monotonic() + 300
                    while not _target_records(instance):
                        if time.monotonic() > deadline or daemon.poll() is not None:
                            raise RuntimeError(f"no loop run finished; see {tmp}/daemon.log")
                        time.sleep(0.5)
                    frames = []
                    start = time.monotonic()
                    for i in range(changes):
                        time.sleep(max(0.0, start + i * interval_s - time.monotonic()))
                        new, at = _step_until_change(sandbox, seen)
                        seen += new.height
                        frames.append(new.with_columns(step=pl.lit(i), changed_at=pl.lit(at)))
                    measured = pl.concat(frames)
                    deadline = time.monotonic() + DRAIN_S
                    last_change = float(measured["changed_at"].max())
                    while time.monotonic() < deadline and not _finished_after(
                        instance, last_change
                    ):
                        time.sleep(1.0)
                finally:
                    _stop(daemon)
                per_change, stats = _latencies(measured, tmp, instance)
                run_seconds = [
                    r.end_time - r.start_time
                    for r in instance.get_run_records(
                        dg.RunsFilter(job_name="hubspot_changes_loop")
                    )
                    if r.end_time and r.start_time
                ]
                instance.dispose()
    return _report(per_change, stats, run_seconds, changes, interval_s, bootstrap_s)


def _report(per_change, stats, run_seconds, steps, interval_s, bootstrap_s) -> str:
    lat = [v for v in per_change["latency_s"].to_list() if v is not None]
    budget = [v for v in per_change["budget_latency_s"].to_list() if v is not None]
    hook = [v for v in per_change["webhook_s"].to_list() if v is not None]
    lines = [
        f"Deal-stage change in the sandbox -> `{TARGET_ASSET}` materialized by the loop run that "
        f"covered it (dagster-daemon, sensor every few seconds, one loop run at a time). "
        f"{steps} clock steps, one every {interval_s:g} s; {per_change.height} stage changes.",
        "",
        "| measure | changes | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---:|",
        f"| change -> webhook stored (receiver) | {len(hook)} | {_pct(hook, 50):.2f} | "
        f"{_pct(hook, 95):.2f} | {max(hook, default=float('nan')):.2f} |",
        f"| change -> apply step done (`{TARGET_ASSET}`) | {len(lat)} | {_pct(lat, 50):.1f} | "
        f"{_pct(lat, 95):.1f} | {max(lat, default=float('nan')):.1f} |",
        f"| change -> first run that applied a budget change | {len(budget)} | "
        f"{_pct(budget, 50):.1f} | {_pct(budget, 95):.1f} | "
        f"{max(budget, default=float('nan')):.1f} |",
        f"| loop run duration (start -> end) | {len(run_seconds)} runs | "
        f"{_pct(run_seconds, 50):.1f} | {_pct(run_seconds, 95):.1f} | "
        f"{max(run_seconds, default=float('nan')):.1f} |",
        "",
        f"Loop runs that covered the measured changes: {stats['loop_runs']} "
        f"({stats['runs_applying_changes']} applied at least one budget change; the others' "
        f"plans were held by guardrails or had nothing to change). Changes not covered in time: "
        f"{per_change.height - len(lat)}. Goal p95 < 60 s: "
        f"{'met' if lat and _pct(lat, 95) < 60 else 'NOT met'}. "
        f"(Bootstrap of the warehouse: {bootstrap_s:.0f} s, not part of the latency.)",
    ]
    return "\n".join(lines)


def sensor_tick_cost(ticks: int = 20) -> str:
    """In-process cost of one ``hubspot_changes_sensor`` evaluation (landing + search poll)."""
    import json

    import dagster as dg

    from optimizer_assets.defs import orchestration as orch
    from optimizer_assets.defs.resources import (
        HubSpotResource,
        OptimizerResource,
        WarehouseResource,
    )
    from optimizer_assets.domain import webhooks as wh
    from optimizer_assets.sandbox.server import SandboxServer
    from optimizer_assets.sandbox.world import HUBSPOT_TOKEN, META_TOKEN, World, WorldConfig
    from optimizer_assets.warehouse import Warehouse

    world = World(WorldConfig(seed=11, accounts=2, ads_per_account=12))
    world.advance(24 * 5)
    with tempfile.TemporaryDirectory() as name, SandboxServer(world=world) as sandbox:
        store = Warehouse(Path(name) / "wh.duckdb")
        resources = {
            "optimizer": OptimizerResource(
                mode="sandbox", sandbox_url=sandbox.base_url, meta_token=META_TOKEN
            ),
            "hubspot": HubSpotResource(base_url=sandbox.base_url, access_token=HUBSPOT_TOKEN),
            "warehouse": WarehouseResource(path=str(store.path)),
        }
        cursor, idle, busy = None, [], []
        with _environ({"OPTIMIZER_WEBHOOK_WAREHOUSE": str(store.path)}):
            instance = dg.DagsterInstance.ephemeral()
            for i in range(ticks):
                with_rows = i % 2 == 0
                if with_rows:  # a delivery of 20 events since the last tick
                    batch = [
                        {
                            "eventId": 1000 * i + k,
                            "subscriptionId": 1,
                            "portalId": 1,
                            "appId": 1,
                            "occurredAt": 1_790_000_000_000 + k,
                            "subscriptionType": wh.DEAL_PROPERTY_CHANGE,
                            "attemptNumber": 0,
                            "objectId": 10_000 + k,
                            "propertyName": "dealstage",
                            "propertyValue": "1",
                        }
                        for k in range(20)
                    ]
                    rows = wh.events_frame(
                        wh.parse_batch(json.dumps(batch).encode()), datetime.now(UTC)
                    )
                    store.append_new(wh.LANDING_TABLE, rows, ["event_key"])
                    sandbox.advance(0.5)  # the search poll finds changed deals too
                context = dg.build_sensor_context(
                    instance=instance, cursor=cursor, resources=resources
                )
                started = time.perf_counter()
                result = orch.hubspot_changes_sensor(context)
                (busy if with_rows else idle).append(time.perf_counter() - started)
                cursor = getattr(result, "cursor", None) or cursor
    return "\n".join(
        [
            "One `hubspot_changes_sensor` evaluation in-process (sandbox clock read, landing "
            "read, deal-search poll, planning):",
            "",
            "| tick | ticks | median ms | max ms |",
            "|---|---:|---:|---:|",
            f"| after a delivery of 20 events and a clock step | {len(busy)} | "
            f"{1000 * _pct(busy, 50):.0f} | {1000 * max(busy):.0f} |",
            f"| the tick after (no new events; pending states confirmed) | {len(idle)} | "
            f"{1000 * _pct(idle, 50):.0f} | {1000 * max(idle):.0f} |",
        ]
    )


def main(quick: bool = False) -> str:
    parts = [sensor_tick_cost(10 if quick else 20)]
    if quick:
        parts.append(
            "_quick mode: the end-to-end latency needs the Dagster daemon and a few minutes; "
            "`make e2e` measures it._"
        )
    else:
        parts.append(measure())
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
