"""The Dagster UI in a real browser: headless Chromium finds every asset of the loop on the
global asset graph served by ``dagster-webserver``.

Chromium is Debian's ``chromium``; when it is missing and the tests run as root it is installed
with apt-get. Without it the test skips with the reason, unless OPTIMIZER_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from optimizer_assets.instance import REPO_ROOT, prepare_dagster_home

BIN = Path(sys.executable).parent


def _chromium() -> str:
    """Path of chromium, installing Debian's package when possible; else skip (or fail)."""
    found = shutil.which("chromium")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if found is None:
        reason = "chromium is not installed and could not be installed (needs root and apt-get)"
        if os.environ.get("OPTIMIZER_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (OPTIMIZER_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webserver(tmp_path):
    """``dagster-webserver`` for the code location, on a free port, with a temporary home."""
    port = _free_port()
    home = prepare_dagster_home(tmp_path / "dagster_home")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OPTIMIZER_MODE": "sandbox",
        "OPTIMIZER_WAREHOUSE": str(tmp_path / "warehouse.duckdb"),
    }
    command = [str(BIN / "dagster-webserver"), "-m", "optimizer_assets.definitions"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    log = (tmp_path / "webserver.log").open("w")
    process = subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/server_info", timeout=2).ok:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dagster-webserver did not start: {(tmp_path / 'webserver.log')}")
            time.sleep(0.3)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _loop_assets() -> dict[str, str]:
    """Every asset of the loop -> its group."""
    from optimizer_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    return {k.path[-1]: graph.get(k).group_name for k in graph.get_all_asset_keys()}


def _rendered_dom(chromium: str, url: str, profile: Path, budget_ms: int) -> str:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=5000,5000",  # the graph only renders the nodes inside the viewport
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=budget_ms / 1000 + 30)
    return done.stdout


def test_every_loop_asset_is_on_the_asset_graph(webserver, tmp_path) -> None:
    chromium = _chromium()
    assets = _loop_assets()
    assert {"hubspot_webhook_deal_states", "deal_stage_events", "capi_uploads"} <= set(assets)
    groups = sorted(set(assets.values()))
    # the global lineage collapses groups; expand all of them (either group id format)
    expanded = [f"global@global:{g}" for g in groups]
    expanded += [f"__repository__@optimizer_assets:{g}" for g in groups]
    url = f"{webserver}/asset-groups?expanded={urllib.parse.quote(','.join(expanded), safe='')}"
    missing: set[str] = set(assets)
    for attempt, budget in enumerate((20_000, 40_000)):
        dom = _rendered_dom(chromium, url, tmp_path / f"profile{attempt}", budget)
        names = set(re.findall(r">([a-z][a-z0-9_]*)<", dom))
        missing = set(assets) - names
        if not missing:
            break
    assert not missing, f"assets not on the rendered asset graph: {sorted(missing)}"
