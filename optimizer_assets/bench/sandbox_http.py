"""Benchmark: requests per second the sandbox HTTP server sustains on this machine.

The server runs in its own process (uvicorn on uvloop, as ``optimizer sandbox serve`` runs it)
so client threads and server do not share a GIL; clients are ``N`` threads with one
``requests.Session`` each, over loopback. Baseline, measured in the same run: a one-route
Starlette app on a second port of the same server loop (the HTTP floor: what any endpoint
costs before it does work). Floor and workload rounds alternate, and the ratio column is the
median of per-pair ratios, so load from other processes on a shared machine hits both alike.

Service limits are lifted for the measurement (HubSpot 5 searches/s, Graph hourly call budgets,
and the world's 4 budget edits per ad set per hour), so the numbers are the server's capacity,
not the limits it imposes on clients.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from optimizer_assets.bench._server import ChildServer, announce, listening_socket

META = "sandbox-meta-token"
HUBSPOT = "sandbox-hubspot-token"


@dataclass(frozen=True)
class Scale:
    accounts: int
    ads_per_account: int
    days: int
    threads: int
    rounds: int
    seconds: float


FULL = Scale(accounts=2, ads_per_account=1000, days=21, threads=4, rounds=5, seconds=1.5)
QUICK = Scale(accounts=1, ads_per_account=60, days=7, threads=4, rounds=3, seconds=0.2)


# ---- server process ----------------------------------------------------------------------------
def _serve(accounts: int, ads: int, days: int) -> None:
    """Subprocess entry: the floor app and the sandbox on two free ports of one event loop.

    Prints ``{"floor": port, "sandbox": port}`` once both listen; serves until terminated.
    """
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from optimizer_assets.sandbox import world as world_module
    from optimizer_assets.sandbox.server import Limits, create_app

    async def ping(request):
        return JSONResponse({"ok": True})

    floor = Starlette(routes=[Route("/ping", ping)])
    world_module.BUDGET_EDITS_PER_HOUR = 10**9  # measure the success path of budget edits
    world = world_module.World(
        world_module.WorldConfig(seed=7, accounts=accounts, ads_per_account=ads)
    )
    world.advance(24 * days)
    world.deals(), world.contacts()  # warm the world's own caches before serving
    limits = Limits(
        hubspot_search_per_second=None,
        graph_calls_per_hour_account=None,
        graph_calls_per_hour_app=None,
    )
    sandbox = create_app(world, limits=limits)
    servers, ports = [], {}
    for name, app in (("floor", floor), ("sandbox", sandbox)):
        sock = listening_socket()
        ports[name] = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="error", access_log=False)
        servers.append((uvicorn.Server(config), sock))

    async def run() -> None:
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
        while not all(server.started for server, _ in servers):
            await asyncio.sleep(0.01)
        announce(ports)
        await asyncio.gather(*tasks)

    try:  # the loop `uvicorn.run` picks ("auto"): uvloop when installed
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


class _Servers(ChildServer):
    """The server subprocess; ``floor`` and ``sandbox`` are base URLs."""

    def __init__(self, scale: Scale) -> None:
        super().__init__(
            "optimizer_assets.bench.sandbox_http", scale.accounts, scale.ads_per_account, scale.days
        )
        self.floor = self.url("floor")
        self.sandbox = self.url("sandbox")


# ---- load --------------------------------------------------------------------------------------
Request = Callable[[requests.Session, int, dict], requests.Response]


def _round(base: str, request: Request, threads: int, seconds: float) -> tuple[float, float, int]:
    """(requests/s, median latency ms, non-2xx count) of one round."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    start_gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(slot: int) -> None:
        with requests.Session() as session:
            session.params = {"access_token": META}  # type: ignore[assignment]
            session.headers["Authorization"] = f"Bearer {HUBSPOT}"
            memory: dict = {"base": base}
            request(session, slot, memory)  # connect and warm up outside the window
            start_gate.wait()
            i = 0
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at[0]:
                    return
                response = request(session, slot * 1_000_000 + i, memory)
                latencies[slot].append(time.perf_counter() - t0)
                if response.status_code >= 300:
                    failures[slot] += 1
                i += 1

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start_gate.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    flat = [x for xs in latencies for x in xs]
    return len(flat) / elapsed, 1000 * statistics.median(flat) if flat else 0.0, sum(failures)


def _catalog(base: str) -> dict:
    """Ids the workloads need, read through the public routes."""
    params = {"access_token": META}
    accounts = requests.get(f"{base}/_sandbox/accounts", params=params, timeout=30).json()["data"]
    account = accounts[0]["account_id"]
    adsets, url = [], f"{base}/v24.0/act_{account}/adsets"
    query = {**params, "limit": 500}
    while url:
        body = requests.get(url, params=query, timeout=30).json()
        adsets += [a["id"] for a in body["data"]]
        url, query = body.get("paging", {}).get("next"), None
    ads = requests.get(
        f"{base}/v24.0/act_{account}/ads", params={**params, "limit": 200}, timeout=30
    ).json()["data"]
    state = requests.get(f"{base}/_sandbox/state", params=params, timeout=30).json()
    return {
        "account": account,
        "pixel": accounts[0]["pixel_id"],
        "adsets": adsets,
        "ads": [a["id"] for a in ads],
        "now": state["now"],
    }


def _workloads(cat: dict, days: int) -> list[tuple[str, int, Request]]:
    """(name, items per request, request function)."""
    from datetime import date, datetime, timedelta

    now = datetime.fromisoformat(cat["now"].replace("Z", "+00:00"))
    until = now.date() - timedelta(days=1)
    since = max(date(2026, 11, 1), until - timedelta(days=min(days, 7) - 1))
    insights_params = {
        "level": "ad",
        "time_increment": 1,
        "time_range": json.dumps({"since": str(since), "until": str(until)}),
        "fields": "ad_id,adset_id,campaign_id,spend,impressions,clicks,inline_link_clicks,actions",
        "limit": 100,
    }

    def insights(session: requests.Session, i: int, memory: dict) -> requests.Response:
        url = memory.get("next")
        if url:
            response = session.get(url, timeout=30)
        else:
            response = session.get(
                f"{memory['base']}/v24.0/act_{cat['account']}/insights",
                params=insights_params,
                timeout=30,
            )
        memory["next"] = response.json().get("paging", {}).get("next")
        return response

    ads = cat["ads"]

    def ad_read(session: requests.Session, i: int, memory: dict) -> requests.Response:
        return session.get(
            f"{memory['base']}/v24.0/{ads[i % len(ads)]}",
            params={"fields": "name,effective_status,adset_id,creative"},
            timeout=30,
        )

    pivot_ms = int((now - timedelta(days=max(1, days // 2))).timestamp() * 1000)

    def search(session: requests.Session, i: int, memory: dict) -> requests.Response:
        body = {
            "filterGroups": [
                {
                    "filters": [
                        {
                            "propertyName": "hs_lastmodifieddate",
                            "operator": "GTE",
                            "value": str(pivot_ms),
                        }
                    ]
                }
            ],
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
            "properties": ["dealname", "amount", "dealstage", "pipeline", "hs_lastmodifieddate"],
            "limit": 100,
            **({"after": memory["after"]} if memory.get("after") else {}),
        }
        response = session.post(f"{memory['base']}/crm/v3/objects/deals/search", json=body)
        memory["after"] = response.json().get("paging", {}).get("next", {}).get("after")
        return response

    adsets = cat["adsets"]

    def batch(session: requests.Session, i: int, memory: dict) -> requests.Response:
        items = [
            {
                "method": "POST",
                "relative_url": f"{adsets[(i * 50 + k) % len(adsets)]}/",
                "body": f"daily_budget={2000 + (i + k) % 500}",
            }
            for k in range(50)
        ]
        return session.post(
            f"{memory['base']}/v24.0/", data={"batch": json.dumps(items)}, timeout=30
        )

    now_epoch = int(now.timestamp())

    def capi(session: requests.Session, i: int, memory: dict) -> requests.Response:
        events = [
            {
                "event_name": "Lead",
                "event_time": now_epoch - 600,
                "event_id": f"bench-{i}-{k}",
                "action_source": "system_generated",
                "user_data": {"em": ["a" * 64], "ph": ["b" * 64]},
                "custom_data": {"event_source": "crm", "lead_event_source": "HubSpot"},
            }
            for k in range(100)
        ]
        return session.post(
            f"{memory['base']}/v24.0/{cat['pixel']}/events", json={"data": events}, timeout=30
        )

    return [
        ("Graph insights page (100 ad-day rows, cursor paging)", 100, insights),
        ("Graph ad read (fields incl. creative)", 1, ad_read),
        ("HubSpot deal search (100 per page, GTE + sort)", 100, search),
        ("Graph batch of 50 ad-set budget edits", 50, batch),
        ("CAPI upload of 100 CRM events", 100, capi),
    ]


def _ping(session: requests.Session, i: int, memory: dict) -> requests.Response:
    return session.get(memory["base"] + "/ping", timeout=30)


@dataclass
class _Row:
    name: str
    items: int
    rps: float
    latency_ms: float
    failures: int
    floor_rps: float
    ratio: float  # median over rounds of (workload round / the floor round just before it)


def _measure(servers: _Servers, name: str, items: int, request: Request, scale: Scale) -> _Row:
    """Alternate floor and workload rounds, so load from elsewhere hits both alike."""
    floor, work = [], []
    for _ in range(scale.rounds):
        floor.append(_round(servers.floor, _ping, scale.threads, scale.seconds))
        work.append(_round(servers.sandbox, request, scale.threads, scale.seconds))
    return _Row(
        name=name,
        items=items,
        rps=statistics.median(w[0] for w in work),
        latency_ms=statistics.median(w[1] for w in work),
        failures=sum(w[2] for w in work),
        floor_rps=statistics.median(f[0] for f in floor),
        ratio=statistics.median(w[0] / f[0] for w, f in zip(work, floor, strict=True)),
    )


def main(quick: bool = False) -> str:
    scale = QUICK if quick else FULL
    servers = _Servers(scale)
    try:
        cat = _catalog(servers.sandbox)
        rows = [
            _measure(servers, name, items, request, scale)
            for name, items, request in _workloads(cat, scale.days)
        ]
    finally:
        servers.close()

    cpus = os.cpu_count() or 1
    floor_rps = statistics.median(r.floor_rps for r in rows)
    lines = [
        f"World: {scale.accounts} account(s) x {scale.ads_per_account} ads, {scale.days} simulated "
        f"days; {scale.threads} client threads (requests.Session) over loopback; server in its "
        "own process (uvicorn on uvloop). Baseline: a one-route Starlette app on a second port "
        "of the same server loop (the HTTP floor), measured in a round right before each "
        f"workload round; {scale.rounds} round pairs of {scale.seconds:g} s, medians; "
        f"{cpus} CPU(s). Service limits lifted (see module docstring).",
        "",
        "| workload | requests/s | median latency (ms) | items/s | vs HTTP floor | non-2xx |",
        "|---|---:|---:|---:|---:|---:|",
        f"| HTTP floor: one-route Starlette app (baseline) | {floor_rps:,.0f} | - | - | 1.00 | - |",
    ]
    for row in rows:
        items_text = f"{row.rps * row.items:,.0f}" if row.items > 1 else "-"
        lines.append(
            f"| {row.name} | {row.rps:,.0f} | {row.latency_ms:.1f} | {items_text} "
            f"| {row.ratio:.2f} | {row.failures} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        print(main(quick="--quick" in sys.argv))
