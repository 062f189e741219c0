"""Safe execution assets against the sandbox over loopback HTTP: plan, blocking check, batched
apply with per-item outcomes, retries, 613, approval gating and the demo's oracle."""

from __future__ import annotations

import collections
import contextlib
import math
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from optimizer_assets.clients.graph import GraphClient
from optimizer_assets.defs import execution as ex
from optimizer_assets.defs.resources import (
    build_resources,
)
from optimizer_assets.domain import guardrails
from optimizer_assets.domain.guardrails import GuardrailConfig
from optimizer_assets.sandbox.server import Faults, SandboxServer
from optimizer_assets.sandbox.settings_file import account_entries
from optimizer_assets.sandbox.world import World, WorldConfig
from optimizer_assets.warehouse import Warehouse

# one ad per ad set, so a small world has many ad sets to edit
MANY = WorldConfig(seed=11, accounts=2, ads_per_account=60, ads_per_adset=1)
FEW = WorldConfig(seed=11, accounts=2, ads_per_account=12, ads_per_adset=2)
FAST = {"ad_change_log": ex.ApplyConfig(backoff_base_s=0.01)}


def write_settings(path: Path, world: World, **per_account: dict) -> Path:
    """Settings for the world's accounts; ``per_account[account_id]`` adds keys to its entry."""
    entries = [e | per_account.get(e["account_id"], {}) for e in account_entries(world.accounts())]
    path.write_text(yaml.safe_dump({"defaults": {}, "accounts": entries}, sort_keys=False))
    return path


@contextlib.contextmanager
def sandbox_env(tmp_path, monkeypatch, config: WorldConfig, faults: Faults | None = None):
    """A private sandbox (one simulated day in), settings file, env and resources."""
    world = World(config)
    world.advance(24)
    with SandboxServer(world=world, faults=faults) as server:
        monkeypatch.setenv("OPTIMIZER_MODE", "sandbox")
        monkeypatch.setenv("OPTIMIZER_SANDBOX_URL", server.base_url)
        monkeypatch.setenv(
            "OPTIMIZER_ACCOUNTS_FILE", str(write_settings(tmp_path / "accounts.yaml", world))
        )
        monkeypatch.setenv("OPTIMIZER_WAREHOUSE", str(tmp_path / "warehouse.duckdb"))
        yield server, build_resources(), Warehouse(tmp_path / "warehouse.duckdb")


def count_budget_edits(server: SandboxServer) -> collections.Counter:
    """Count every budget edit the world executes, per ad set (refused ones included)."""
    calls: collections.Counter = collections.Counter()
    original = server.world.update_adset

    def counted(adset_id, *, daily_budget=None, status=None):
        if daily_budget is not None:
            calls[adset_id] += 1
        return original(adset_id, daily_budget=daily_budget, status=status)

    server.world.update_adset = counted
    return calls


def recommend(wh: Warehouse, world: World, factor: float = 1.1, n: int | None = None):
    """``budget_recommendations`` asking ``factor`` x the current budget (first ``n`` ad sets)."""
    adsets = world.adsets().sort("adset_id").head(n or world.adsets().height)
    recs = adsets.select(
        "adset_id",
        "campaign_id",
        "account_id",
        current_budget="daily_budget",
        recommended_budget=(pl.col("daily_budget") * factor).round(0).cast(pl.Int64),
        action=pl.lit("scale"),
    )
    wh.replace("budget_recommendations", recs)
    return recs


def materialize(selection, resources, **kwargs):
    if ex.ad_change_log in selection:
        kwargs.setdefault("run_config", dg.RunConfig(ops=FAST))
    result = dg.materialize(
        selection, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kwargs
    )
    meta = {
        e.asset_key.path[0]: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    return result, meta


ALL = [ex.ad_change_plan, ex.ad_change_log, ex.ad_change_plan_within_guardrails]


def test_plan_applies_in_batches_of_at_most_50_with_one_outcome_per_item(tmp_path, monkeypatch):
    with sandbox_env(tmp_path, monkeypatch, MANY) as (server, resources, wh):
        world = server.world
        recs = recommend(wh, world)
        kills = world.ads().sort("ad_id").head(3)
        wh.replace(
            "ad_scores", kills.select("ad_id", "account_id", "campaign_id", action=pl.lit("kill"))
        )
        sent: list[tuple[str, int]] = []
        original = GraphClient.batch

        def recording(self, items, **kwargs):
            sent.append((items[0]["method"], len(items)))
            return original(self, items, **kwargs)

        monkeypatch.setattr(GraphClient, "batch", recording)
        result, meta = materialize(ALL, resources)
        assert result.success
        assert all(e.passed for e in result.get_asset_check_evaluations())

        plan, log = meta["ad_change_plan"], meta["ad_change_log"]
        assert plan["planned"] == recs.height + 3 and plan["skipped"] == 0
        posts = [n for method, n in sent if method == "POST"]
        assert max(posts) <= 50 and sum(posts) == plan["planned"]
        assert log["applied"] == plan["planned"] and log["batch_requests"] == len(posts)

        ledger = wh.read("ad_change_log")
        assert (ledger["status"] == "applied").all() and (ledger["response_code"] == 200).all()
        assert ledger.group_by("batch_id").len()["len"].max() <= 50
        budgets = ledger.filter(pl.col("field") == "daily_budget").join(
            world.adsets().select(object_id="adset_id", now=pl.col("daily_budget").cast(pl.String)),
            on="object_id",
        )
        assert (budgets["new_value"] == budgets["now"]).all()
        paused = world.ads().filter(pl.col("ad_id").is_in(kills["ad_id"].implode()))
        assert (paused["status"] == "PAUSED").all()

        # the same recommendations again: nothing left to change, nothing sent
        sent.clear()
        _, again = materialize(ALL, resources)
        assert again["ad_change_plan"]["planned"] == 0 and not sent


def test_null_items_are_reconciled_and_resent_and_each_change_lands_once(tmp_path, monkeypatch):
    faults = Faults(rate_null_batch_item=0.3, seed=3)
    with sandbox_env(tmp_path, monkeypatch, FEW, faults) as (server, resources, wh):
        edits = count_budget_edits(server)
        recs = recommend(wh, server.world)
        patient = ex.ApplyConfig(backoff_base_s=0.01, max_rounds=10)
        run_config = dg.RunConfig(ops={"ad_change_log": patient})
        result, meta = materialize(ALL, resources, run_config=run_config)
        log = meta["ad_change_log"]
        assert log["null_items"] > 0 and log["retried"] > 0
        assert log["applied"] == recs.height and log["failed"] == 0
        assert set(edits) == set(recs["adset_id"]) and set(edits.values()) == {1}


def test_a_permanent_error_fails_its_item_with_metas_message_and_the_rest_apply(
    tmp_path, monkeypatch
):
    with sandbox_env(tmp_path, monkeypatch, FEW) as (server, resources, wh):
        edits = count_budget_edits(server)
        # Meta reports a lower minimum than it enforces for these ad sets: the plan lets 300
        # through, Meta refuses it (a permanent error), the other items of the batch apply
        monkeypatch.setattr(
            GraphClient,
            "minimum_budgets",
            lambda self, a: [{"currency": "USD", "min_daily_budget_imp": 100}],
        )
        recs = recommend(wh, server.world)
        low = recs["adset_id"][0]
        current = int(recs["current_budget"][0])
        monkeypatch.setenv(
            "OPTIMIZER_ACCOUNTS_FILE",
            str(
                write_settings(
                    tmp_path / "low.yaml",
                    server.world,
                    **{recs["account_id"][0]: {"guardrails": {"velocity_pct": 0.99}}},
                )
            ),
        )
        wh.replace(
            "budget_recommendations",
            recs.with_columns(
                recommended_budget=pl.when(pl.col("adset_id") == low)
                .then(300)
                .otherwise("recommended_budget")
            ),
        )
        assert current > 300
        result, meta = materialize(ALL, build_resources())
        ledger = wh.read("ad_change_log")
        bad = ledger.filter(pl.col("object_id") == low).row(0, named=True)
        assert bad["status"] == "failed" and bad["attempts"] == 1 and bad["response_code"] == 400
        assert "budget is too low" in bad["error"]
        assert edits[low] == 1  # sent once, never retried
        others = ledger.filter(pl.col("object_id") != low)
        assert (others["status"] == "applied").all() and others.height == recs.height - 1
        assert meta["ad_change_log"]["failed"] == 1


def test_613_budget_edit_limit_fails_with_the_rule_and_is_not_retried(tmp_path, monkeypatch):
    with sandbox_env(tmp_path, monkeypatch, FEW) as (server, resources, wh):
        world = server.world
        recs = recommend(wh, world)
        target = recs["adset_id"][0]
        start = int(recs["current_budget"][0])
        with server.lock:  # four edits outside the optimizer, within this hour
            for step in (1, 2, 1, 2):
                world.update_adset(target, daily_budget=start + 50 * step)
            server.state.bump()
        edits = count_budget_edits(server)
        # the plan was made from a fresh read, so it asks to move the target from start + 100
        result, meta = materialize(ALL, resources)
        row = wh.read("ad_change_log").filter(pl.col("object_id") == target).row(0, named=True)
        assert row["status"] == "failed" and row["attempts"] == 1
        assert "budget_edits_per_hour" in row["rule"] and row["error"].startswith("613/1487632")
        assert edits[target] == 1
        assert meta["ad_change_log"]["applied"] == recs.height - 1
        # a later run in the same hour never sends it again
        materialize([ex.ad_change_log], resources)
        assert edits[target] == 1


def test_edits_in_the_ledger_within_the_hour_hold_back_the_fifth(tmp_path, monkeypatch):
    with sandbox_env(tmp_path, monkeypatch, FEW) as (server, resources, wh):
        world = server.world
        recs = recommend(wh, world)
        target = recs.row(0, named=True)
        now = world.now
        history = pl.DataFrame(
            {
                "change_id": [f"h{i}" for i in range(4)],
                "account_id": target["account_id"],
                "campaign_id": target["campaign_id"],
                "object_id": target["adset_id"],
                "field": "daily_budget",
                "old_value": str(target["current_budget"]),
                "new_value": str(target["current_budget"]),
                "status": "applied",
                "attempts": 1,
                "applied_at": [now - timedelta(minutes=10 * i) for i in range(4)],
            }
        )
        schema = ex.ledger_domain.LEDGER_SCHEMA
        missing = [pl.lit(None, dtype=t).alias(c) for c, t in schema.items() if c not in history]
        wh.replace("ad_change_log", history.with_columns(missing).select(list(schema)))
        edits = count_budget_edits(server)
        result, meta = materialize(ALL, resources)
        plan = wh.read("ad_change_plan")
        row = plan.filter(pl.col("object_id") == target["adset_id"]).row(0, named=True)
        assert row["status"] == "skipped" and row["rule"] == guardrails.RULE_BUDGET_EDITS
        assert meta["ad_change_plan"]["rule_budget_edits_per_hour"] == 1
        assert target["adset_id"] not in edits
        assert meta["ad_change_log"]["applied"] == recs.height - 1


def test_blocking_check_stops_the_apply_step(tmp_path, monkeypatch):
    with sandbox_env(tmp_path, monkeypatch, FEW) as (server, resources, wh):
        edits = count_budget_edits(server)
        recommend(wh, server.world, n=5)
        monkeypatch.setenv("OPTIMIZER_MAX_CHANGES_PER_RUN", "3")
        result, meta = materialize(ALL, resources, raise_on_error=False)
        assert not result.success
        (check,) = result.get_asset_check_evaluations()
        assert not check.passed and check.metadata["violations"].value == 1
        assert "ad_change_log" not in meta and not edits
        # materialized alone (no check in the run), the apply step refuses too
        with pytest.raises(dg.Failure, match="at most 3 per run"):
            materialize([ex.ad_change_log], resources)
        assert not edits


def test_check_finds_a_tampered_plan():
    now = WorldConfig().start
    plan = pl.DataFrame(
        {
            "change_id": ["c1"],
            "account_id": ["1"],
            "campaign_id": ["9"],
            "object_id": ["5"],
            "object_type": ["adset"],
            "field": ["daily_budget"],
            "old_value": ["1000"],
            "new_value": ["2000"],  # +100%: far outside the +-20% band
            "requested_value": ["2000"],
            "rule": [None],
            "status": ["planned"],
            "planned_at": [now],
        }
    ).cast(guardrails.PLAN_SCHEMA)
    found = ex.plan_violations(
        plan, ex.ledger_domain.empty_ledger(), now, {"1": GuardrailConfig()}, None, 10
    )
    assert found["rule"].to_list() == [guardrails.RULE_VELOCITY]
    assert ex.plan_violations(
        plan, ex.ledger_domain.empty_ledger(), now, {"1": GuardrailConfig()}, None, 0
    )["rule"].to_list() == [guardrails.RULE_VELOCITY, ex.RULE_TOTAL]


def test_the_stage_loads_and_its_writes_carry_the_meta_writes_tag():
    defs = dg.Definitions(
        assets=ex.assets, asset_checks=ex.asset_checks, jobs=ex.jobs, resources=build_resources()
    )
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"ad_change_plan", "ad_change_log"} <= keys
    job = defs.resolve_job_def("apply_ad_changes")
    assert job.tags[ex.META_WRITES_TAG] == "ad_changes"
    assert ex.ad_change_log.op.tags[ex.META_WRITES_TAG] == "ad_changes"
    (check,) = ex.asset_checks
    assert check.check_specs_by_output_name and all(
        spec.blocking for spec in check.check_specs_by_output_name.values()
    )


def test_oracle_budgets_keep_the_total_and_the_guardrails():
    adsets = pl.DataFrame(
        {
            "adset_id": ["a", "b", "c", "d"],
            "account_id": ["1", "1", "1", "2"],
            "daily_budget": [1000, 1000, 600, 800],
            "status": ["ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"],
        }
    )
    vpd = pl.DataFrame({"adset_id": ["a", "b", "c", "d"], "vpd": [3.0, 1.0, 2.0, 1.0]})
    out = ex.oracle_budgets(adsets, vpd, GuardrailConfig(min_budget=500)).join(
        adsets, on="adset_id", suffix="_old"
    )
    new = dict(out.select("adset_id", "daily_budget").iter_rows())
    assert new == {"a": 1200, "c": 600, "b": 800, "d": 800}  # best first to its +20%, then next
    assert sum(new[k] for k in "abc") == 2600
    assert (out["daily_budget"] <= out["daily_budget_old"] * 1.2).all()


def test_demo_report_compares_three_worlds_on_one_yardstick(tmp_path):
    config = WorldConfig(seed=5, accounts=1, ads_per_account=8, ads_per_adset=2)
    world = World(config)
    world.advance(24 * 4)
    (section, *rest) = ex.demo_report(world, Warehouse(tmp_path / "empty.duckdb"))
    table = section[1]
    assert table["arm"].to_list()[0].startswith("static")
    static, optimizer = table.row(0, named=True), table.row(1, named=True)
    assert static["pipeline value $"] == optimizer["pipeline value $"]  # untouched: same world
    assert table.row(2, named=True)["changes"] > 0
    value = ex.realized_value(world)
    assert value["pipeline_value"] <= sum(world.truth_deals()["value_if_won"])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_budget_neutral_plans_keep_each_account_total_within_one_small_change(data):
    n = data.draw(st.integers(2, 12), label="ad sets")
    olds = data.draw(st.lists(st.integers(600, 20_000), min_size=n, max_size=n), label="budgets")
    reqs = data.draw(st.lists(st.integers(1, 30_000), min_size=n - 1, max_size=n - 1))
    last = sum(olds) - sum(reqs)  # a pure reallocation: the requests keep the total
    assume(last >= 1)
    ids = [str(100 + i) for i in range(n)]
    current = pl.DataFrame(
        {
            "adset_id": ids,
            "account_id": "1",
            "campaign_id": [str(i % 3) for i in range(n)],
            "daily_budget": olds,
        }
    )
    recs = current.select(
        "adset_id",
        "account_id",
        "campaign_id",
        current_budget="daily_budget",
        recommended_budget=pl.Series([*reqs, last]),
    )
    now = WorldConfig().start
    config = GuardrailConfig(keep_total=True, min_budget=500)
    plan = guardrails.plan_changes(recs, current, None, now=now, config=config)
    assert guardrails.check_plan(plan, None, now, config, current=current) == []
    planned = plan.filter(pl.col("status") == "planned")
    net = (planned["new_value"].cast(pl.Int64) - planned["old_value"].cast(pl.Int64)).sum()
    # off by at most half of one change's no-churn minimum (the one partly granted change)
    smallest = max(max(config.min_change_abs, math.ceil(o * config.min_change_pct)) for o in olds)
    assert abs(net) <= smallest / 2


def test_with_a_daily_cap_decreases_go_out_before_increases(tmp_path, monkeypatch):
    with sandbox_env(tmp_path, monkeypatch, FEW) as (server, resources, wh):
        world = server.world
        account = world.adsets()["account_id"].sort()[0]
        adsets = world.adsets().filter(pl.col("account_id") == account).sort("adset_id")
        cap = int(adsets["daily_budget"].sum())
        settings = write_settings(
            tmp_path / "cap.yaml", world, **{account: {"guardrails": {"daily_cap": cap}}}
        )
        monkeypatch.setenv("OPTIMIZER_ACCOUNTS_FILE", str(settings))
        half = adsets.height // 2
        moved = (adsets["daily_budget"].head(half) * 0.1).round(0).cast(pl.Int64)
        factor = pl.Series([0.9] * half + [1.0] * (adsets.height - half))
        recs = adsets.select(
            "adset_id", "campaign_id", "account_id", current_budget="daily_budget"
        ).with_columns(
            recommended_budget=(pl.col("current_budget") * factor).round(0).cast(pl.Int64)
        )
        # the money taken from the first half goes to the last ad set
        last = recs.height - 1
        bumped = recs["recommended_budget"].scatter(
            last, recs["recommended_budget"][last] + int(moved.sum())
        )
        wh.replace("budget_recommendations", recs.with_columns(recommended_budget=bumped))
        order: list[str] = []
        original = world.update_adset

        def watched(adset_id, *, daily_budget=None, status=None):
            order.append("up" if daily_budget > int(adsets_budget[adset_id]) else "down")
            return original(adset_id, daily_budget=daily_budget, status=status)

        adsets_budget = dict(adsets.select("adset_id", "daily_budget").iter_rows())
        world.update_adset = watched
        _, meta = materialize(ALL, build_resources())
        log = meta["ad_change_log"]
        assert log["batch_requests"] == 2 and log["applied"] == len(order) > 1
        assert order[-1] == "up" and set(order[:-1]) == {"down"}
        total = world.adsets().filter(pl.col("account_id") == account)["daily_budget"].sum()
        assert total <= cap
