"""Benchmark: ad changes applied per second through the ledger, and HTTP calls per 1,000 changes.

The sandbox runs in its own process (uvicorn; one ad set per ad so there are enough ad sets)
with the world's 4-budget-edits-per-ad-set-per-hour limit and the Graph hourly call budgets
lifted, so the numbers are capacity, not the limits the sandbox imposes (the same choice as
``sandbox_http``). Each trial starts from a fresh DuckDB ledger and a new simulated hour.

- Batched (the product): ``defs.execution.ChangeExecutor.execute`` on a guarded plan of +10%
  budget edits: ledger writes (``sending`` before each round leaves), the pre-send re-check
  (minimum budgets and an ad set listing per account), Graph batch requests of 50 items, three
  in flight. HTTP calls count every request, reads included.
- Baseline, measured in the same run: one ``POST /{adset_id}`` per change with the same three
  threads and no ledger at all (the cheapest one-call-per-change client).
- Batched with 5% of batch items answered ``null``: the extra rounds and reconcile reads.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import requests

from optimizer_assets.bench._server import ChildServer, announce, listening_socket

META = "sandbox-meta-token"


@dataclass(frozen=True)
class Scale:
    accounts: int
    ads_per_account: int
    changes: int
    baseline_changes: int
    trials: int
    threads: int = 3


FULL = Scale(accounts=10, ads_per_account=1000, changes=10_000, baseline_changes=1_000, trials=3)
QUICK = Scale(accounts=2, ads_per_account=300, changes=600, baseline_changes=120, trials=1)


# ---- server process ----------------------------------------------------------------------------
def _serve(accounts: int, ads: int) -> None:
    """Subprocess entry: the sandbox on a free port, limits lifted; prints the port, serves."""
    import uvicorn

    from optimizer_assets.sandbox import world as world_module
    from optimizer_assets.sandbox.server import Limits, create_app

    world_module.BUDGET_EDITS_PER_HOUR = 10**9  # measure the success path of budget edits
    world = world_module.World(
        world_module.WorldConfig(seed=7, accounts=accounts, ads_per_account=ads, ads_per_adset=1)
    )
    limits = Limits(graph_calls_per_hour_account=None, graph_calls_per_hour_app=None)
    app = create_app(world, limits=limits)
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    announce({"port": sock.getsockname()[1]})
    server.run(sockets=[sock])


class _Server(ChildServer):
    def __init__(self, scale: Scale) -> None:
        super().__init__("optimizer_assets.bench.execution", scale.accounts, scale.ads_per_account)
        self.base_url = self.url("port")
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.control("GET", "state")
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        response = requests.request(
            method,
            f"{self.base_url}/_sandbox/{path}",
            params={"access_token": META},
            json=body,
            timeout=120,
        )
        response.raise_for_status()
        return response.json()

    def now(self) -> datetime:
        return datetime.fromisoformat(self.control("GET", "state")["now"].replace("Z", "+00:00"))


# ---- measurements ------------------------------------------------------------------------------
@dataclass
class _Trial:
    changes: int
    seconds: float
    http: int
    writes: int
    rounds: int = 1

    @property
    def per_second(self) -> float:
        return self.changes / self.seconds if self.seconds else 0.0

    @property
    def calls_per_1000(self) -> float:
        return 1000.0 * self.http / self.changes if self.changes else 0.0


def _settings():
    from optimizer_assets.settings import Settings

    # capacity run: the per-run and per-campaign counts are lifted, the value rules stay
    guard = {"max_changes_per_run": 1_000_000, "max_campaign_actions_per_hour": 1_000_000}
    return Settings(path=Path("bench"), defaults={"guardrails": guard})


def _plan(endpoint, server: _Server, scale: Scale, settings):
    """A guarded plan of +10% edits on the first ``scale.changes`` ad sets, at the sandbox's now."""
    from optimizer_assets.defs.execution import guardrail_configs, meta_minimums, read_adsets
    from optimizer_assets.domain import guardrails

    now = server.now()
    with endpoint.reader() as graph:
        accounts = [a["account_id"] for a in server.control("GET", "accounts")["data"]]
        adsets = read_adsets(graph, accounts).sort("adset_id").head(scale.changes)
        configs = guardrail_configs(settings, meta_minimums(graph, accounts, settings))
    recs = adsets.select(
        "adset_id",
        "campaign_id",
        "account_id",
        current_budget="daily_budget",
        recommended_budget=(pl.col("daily_budget") * 1.1).round(0).cast(pl.Int64),
    )
    plan = guardrails.plan_changes(recs, adsets, None, now=now, config=configs)
    return plan.filter(pl.col("status") == guardrails.PLANNED), now


def _batched(endpoint, server: _Server, scale: Scale, settings) -> _Trial:
    from optimizer_assets.defs.execution import ChangeExecutor, LedgerStore
    from optimizer_assets.warehouse import Warehouse

    server.control("POST", "advance", {"hours": 1})  # a new hour: new change ids
    plan, now = _plan(endpoint, server, scale, settings)
    with tempfile.TemporaryDirectory() as tmp:
        executor = ChangeExecutor(endpoint, LedgerStore(Warehouse(Path(tmp) / "bench.duckdb")))
        started = time.perf_counter()
        ledger = executor.execute(plan, now=now, settings=settings)
        seconds = time.perf_counter() - started
    applied = ledger.filter(pl.col("status") == "applied").height
    if applied != plan.height:
        raise RuntimeError(f"only {applied} of {plan.height} changes applied")
    s = executor.stats
    return _Trial(applied, seconds, s.http_requests, s.batch_requests, s.rounds)


def _one_by_one(endpoint, server: _Server, scale: Scale, settings, threads: int) -> _Trial:
    """One POST per change, ``threads`` in flight, no ledger: the baseline."""
    server.control("POST", "advance", {"hours": 1})
    small = Scale(**{**scale.__dict__, "changes": scale.baseline_changes})
    plan, _ = _plan(endpoint, server, small, settings)
    jobs = list(zip(plan["object_id"], plan["new_value"].cast(pl.Int64), strict=True))
    clients = [endpoint.reader() for _ in range(threads)]
    started = time.perf_counter()

    def run(k: int) -> None:
        for adset_id, budget in jobs[k::threads]:
            clients[k].update_adset(adset_id, daily_budget=int(budget))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    seconds = time.perf_counter() - started
    calls = sum(c.request_count for c in clients)
    for c in clients:
        c.close()
    return _Trial(len(jobs), seconds, calls, calls)


def _warm_up() -> None:
    """Pay the process's one-time DuckDB start (its time zone support loads on first use)."""
    from optimizer_assets.defs.execution import LedgerStore
    from optimizer_assets.domain.ad_changes import empty_ledger
    from optimizer_assets.warehouse import Warehouse

    with tempfile.TemporaryDirectory() as tmp:
        LedgerStore(Warehouse(Path(tmp) / "warm.duckdb")).wh.upsert(
            "ad_change_log", empty_ledger(), ["change_id"]
        )


def main(quick: bool = False) -> str:
    from optimizer_assets.defs.execution import GraphEndpoint

    scale = QUICK if quick else FULL
    settings = _settings()
    _warm_up()
    server = _Server(scale)
    try:
        endpoint = GraphEndpoint(META, server.base_url)
        batched, single = [], []
        for _ in range(scale.trials):  # alternate, so machine load hits both alike
            single.append(_one_by_one(endpoint, server, scale, settings, scale.threads))
            batched.append(_batched(endpoint, server, scale, settings))
        faulty = []
        if not quick:  # the retry rounds back off for seconds: full runs only
            server.control("POST", "faults", {"rate_null_batch_item": 0.05, "seed": 5})
            faulty.append(_batched(endpoint, server, scale, settings))
            server.control("POST", "faults", {})
    finally:
        server.close()

    def med(trials: list[_Trial], attr: str) -> float:
        return statistics.median(getattr(t, attr) for t in trials)

    base_rate, base_calls = med(single, "per_second"), med(single, "calls_per_1000")
    rows = [
        ("one POST per change (baseline, no ledger)", single, base_rate, base_calls),
        ("Graph batches of 50 through the ledger", batched, base_rate, base_calls),
    ]
    if faulty:
        rows.append(("... with 5% null batch items (retried)", faulty, base_rate, base_calls))
    lines = [
        f"Sandbox in its own process: {scale.accounts} accounts x {scale.ads_per_account} ad sets "
        f"(one ad each), budget-edit and hourly call limits lifted; {scale.threads} requests in "
        f"flight on both paths; {os.cpu_count()} CPU(s). Batched: {scale.changes:,} changes per "
        f"trial; baseline: {scale.baseline_changes:,}; medians of {scale.trials} alternating "
        "trial(s). HTTP calls include every read the apply step makes (minimum budgets, ad set "
        "listings for the re-check, reconcile reads).",
        "",
        "| path | changes | changes/s | vs baseline | HTTP calls per 1,000 changes "
        "| fewer calls than baseline | write requests | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, trials, rate0, calls0 in rows:
        rate, calls = med(trials, "per_second"), med(trials, "calls_per_1000")
        lines.append(
            f"| {name} | {trials[0].changes:,} | {rate:,.0f} | {rate / rate0:.1f}x "
            f"| {calls:,.1f} | {calls0 / calls:.1f}x | {int(med(trials, 'writes')):,} "
            f"| {int(med(trials, 'rounds'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(main(quick="--quick" in sys.argv))
