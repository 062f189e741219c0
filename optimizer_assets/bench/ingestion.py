"""Ingestion throughput: the ingestion assets through Dagster and the production clients against a
sandbox served from its own process (100 accounts x 1,000 ads x 30 days; quick: 5 x 100 x 7).

Reports rows stored per second per asset and in total, and the HTTP requests it took. The
world is simulated before timing starts (its speed is `bench sandbox_sim`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import requests

from optimizer_assets.sandbox.world import META_TOKEN


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_sandbox(accounts: int, ads: int, days: int) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "optimizer_assets.cli",
        "sandbox",
        "serve",
        "--port",
        str(port),
        "--accounts",
        str(accounts),
        "--ads-per-account",
        str(ads),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {META_TOKEN}"
    for _ in range(600):
        try:
            session.get(f"{base}/_sandbox/state", timeout=5).raise_for_status()
            break
        except requests.RequestException:
            time.sleep(0.5)
    started = time.perf_counter()
    for _ in range(days):
        session.post(
            f"{base}/_sandbox/advance", json={"hours": 24}, timeout=3600
        ).raise_for_status()
    return process, base, time.perf_counter() - started


def _settings_file(base: str, folder: Path) -> Path:
    import polars as pl

    from optimizer_assets.sandbox.settings_file import settings_yaml

    rows = requests.get(
        f"{base}/_sandbox/accounts", params={"access_token": META_TOKEN}, timeout=60
    ).json()["data"]
    path = folder / "accounts.yaml"
    path.write_text(settings_yaml(pl.DataFrame(rows)))
    return path


def _run(accounts: int, ads: int, days: int) -> tuple[list[dict], dict]:
    process, base, simulate_s = _start_sandbox(accounts, ads, days)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.update(
                OPTIMIZER_MODE="sandbox",
                OPTIMIZER_SANDBOX_URL=base,
                OPTIMIZER_ACCOUNTS_FILE=str(_settings_file(base, Path(tmp))),
                OPTIMIZER_WAREHOUSE=str(Path(tmp) / "bench.duckdb"),
            )
            from optimizer_assets.defs.ingestion import ingestion_assets
            from optimizer_assets.defs.resources import build_resources
            from optimizer_assets.sandbox.world import SIM_START

            resources = build_resources()
            partitioned = [a for a in ingestion_assets if a.partitions_def is not None]
            others = [a for a in ingestion_assets if a.partitions_def is None]
            rows = []
            with dg.instance_for_test(temp_dir=tmp) as instance:
                for asset in others:
                    started = time.perf_counter()
                    result = dg.materialize(
                        [asset], resources=resources, instance=instance, selection=[asset]
                    )
                    rows.append(_row(asset.key.path[0], result, time.perf_counter() - started))
                started = time.perf_counter()
                results = []
                for day in range(days):
                    key = (SIM_START + timedelta(days=day)).date().isoformat()
                    results.append(
                        dg.materialize(
                            partitioned, resources=resources, instance=instance, partition_key=key
                        )
                    )
                rows.append(_row("meta_ad_insights", results, time.perf_counter() - started))
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows, {"simulate_s": simulate_s}


# the metadata entry that counts the rows one run of each asset fetched or stored
STORED_KEY = {
    "hubspot_deals": "fetched",
    "deal_stage_events": "new_events",
    "hubspot_contacts": "new_contacts",
    "meta_ads": "row_count",
    "meta_leads": "fetched",
    "meta_ad_insights": "row_count",
}


def _row(name: str, results, seconds: float) -> dict:
    results = results if isinstance(results, list) else [results]
    stored = requests_made = 0
    for result in results:
        for event in result.get_asset_materialization_events():
            meta = {k: v.value for k, v in event.materialization.metadata.items()}
            stored += int(
                meta.get(
                    "fetched",
                    meta.get("new_contacts", meta.get("new_events", meta.get("row_count", 0))),
                )
            )
            requests_made += int(meta.get("http_requests", 0))
    return {"asset": name, "rows": stored, "seconds": seconds, "http_requests": requests_made}


def main(quick: bool = False) -> str:
    accounts, ads, days = (5, 100, 7) if quick else (100, 1000, 30)
    # HubSpot's 5 searches/s caps deal ingestion near 1,000 deals/s by contract, so the full
    # world takes long; OPTIMIZER_BENCH_ACCOUNTS scales the account count down
    accounts = int(os.environ.get("OPTIMIZER_BENCH_ACCOUNTS", accounts))
    rows, info = _run(accounts, ads, days)
    total_rows = sum(r["rows"] for r in rows)
    total_s = sum(r["seconds"] for r in rows)
    total_requests = sum(r["http_requests"] for r in rows)
    lines = [
        f"World: {accounts} accounts x {ads} ads x {days} days (simulated in "
        f"{info['simulate_s']:.0f} s in the sandbox process before timing). One run; each asset "
        "materialized through Dagster "
        "in-process against the sandbox over loopback HTTP.",
        "",
        "| asset | rows stored | seconds | rows/s | HTTP requests |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = r["rows"] / r["seconds"] if r["seconds"] else 0.0
        cells = [r["asset"], f"{r['rows']:,}", f"{r['seconds']:.1f}", f"{rate:,.0f}"]
        lines.append("| " + " | ".join([*cells, f"{r['http_requests']:,}"]) + " |")
    total = ["**total**", f"{total_rows:,}", f"{total_s:.1f}", f"{total_rows / total_s:,.0f}"]
    lines.append("| " + " | ".join([*total, f"{total_requests:,}"]) + " |")
    return "\n".join(lines)
