"""Safety of ad_change_log: the process dies between send and record (or just before the send),
a rerun reconciles by reading the ad sets and no change is ever applied twice; in live mode
nothing goes out without auto_apply or a person's approval."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import dagster as dg
import polars as pl
import pytest

from optimizer_assets.defs import execution as ex
from optimizer_assets.defs.resources import MetaResource, OptimizerResource, WarehouseResource
from optimizer_assets.sandbox.server import SandboxServer
from optimizer_assets.sandbox.world import META_TOKEN, World
from optimizer_assets.warehouse import Warehouse
from optimizer_tests.test_execution_assets import (
    ALL,
    FEW,
    MANY,
    count_budget_edits,
    materialize,
    recommend,
    sandbox_env,
    write_settings,
)

CRASH = 17
# Runs ad_change_log in a child process that exits hard around the first batch POST.
CHILD = textwrap.dedent(
    """
    import os, sys
    import dagster as dg
    from optimizer_assets.clients.graph import GraphClient
    from optimizer_assets.defs.execution import ad_change_log
    from optimizer_assets.defs.resources import build_resources

    when = sys.argv[1]
    original = GraphClient.batch

    def dying(self, items, **kwargs):
        posting = any(i["method"] == "POST" for i in items)
        if posting and when == "before_send":
            os._exit({crash})
        answer = original(self, items, **kwargs)
        if posting and when == "after_send":
            os._exit({crash})  # the answer arrived; the ledger never hears of it
        return answer

    GraphClient.batch = dying
    dg.materialize([ad_change_log], resources=build_resources(),
                   instance=dg.DagsterInstance.ephemeral())
    """
).format(crash=CRASH)


@pytest.mark.parametrize("when", ["after_send", "before_send"])
def test_a_crash_around_the_send_never_applies_a_change_twice(tmp_path, monkeypatch, when):
    with sandbox_env(tmp_path, monkeypatch, MANY) as (server, resources, wh):
        recs = recommend(wh, server.world)
        edits = count_budget_edits(server)
        result, _ = materialize([ex.ad_change_plan, ex.ad_change_plan_within_guardrails], resources)
        assert result.success

        child = subprocess.run(
            [sys.executable, "-c", CHILD, when],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == CRASH, child.stderr[-2000:]
        ledger = wh.read("ad_change_log")
        # every row of the round was marked `sending` before its batch left
        assert ledger.height == recs.height and (ledger["status"] == "sending").all()
        landed = set(edits)
        if when == "after_send":
            assert landed and set(edits.values()) == {1}
        else:
            assert not landed

        _, meta = materialize([ex.ad_change_log], resources)
        log = meta["ad_change_log"]
        assert log["reconciled"] == recs.height
        final = wh.read("ad_change_log")
        assert (final["status"] == "applied").all()
        # exactly one budget edit per ad set, whichever side of the crash it landed on
        assert set(edits) == set(recs["adset_id"]) and set(edits.values()) == {1}
        found = final.filter(pl.col("object_id").is_in(sorted(landed)))
        assert (found["error"] == "reconciled: found applied").all()
        assert log["batch_items"] == recs.height - len(landed)


def test_live_mode_applies_only_auto_apply_accounts_until_a_person_approves(tmp_path):
    world = World(FEW)
    world.advance(24)
    auto, manual = sorted(world.accounts()["account_id"].to_list())
    with SandboxServer(world=world) as server:
        settings = write_settings(tmp_path / "accounts.yaml", world, **{auto: {"auto_apply": True}})
        resources = {  # live mode: only URLs and tokens differ; here they point at the sandbox
            "optimizer": OptimizerResource(mode="live", accounts_file=str(settings)),
            "meta": MetaResource(base_url=server.base_url, access_token=META_TOKEN),
            "warehouse": WarehouseResource(path=str(tmp_path / "live.duckdb")),
        }
        wh = Warehouse(tmp_path / "live.duckdb")
        edits = count_budget_edits(server)
        recs = recommend(wh, world)
        manual_sets = set(recs.filter(pl.col("account_id") == manual)["adset_id"])
        _, meta = materialize(ALL, resources)
        log = meta["ad_change_log"]
        assert log["mode"] == "live" and log["awaiting_approval"] == len(manual_sets)
        assert set(edits) == set(recs["adset_id"]) - manual_sets
        waiting = wh.read("ad_change_log").filter(pl.col("account_id") == manual)
        assert (waiting["status"] == "planned").all()

        approve = dg.RunConfig(ops={"ad_change_log": ex.ApplyConfig(approve=True)})
        _, meta = materialize([ex.ad_change_log], resources, run_config=approve)
        assert meta["ad_change_log"]["applied"] == recs.height
        assert set(edits) == set(recs["adset_id"]) and set(edits.values()) == {1}
