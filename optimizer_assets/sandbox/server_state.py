"""Shared state of the sandbox server: the world behind one lock, caches, counters and limits."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import Any

import polars as pl

from optimizer_assets.sandbox.faults import FaultInjector, Faults, Limits

USAGE_WINDOW_SECONDS = 3600.0  # Graph usage is a rolling hour
SEARCH_WINDOW_SECONDS = 1.0  # HubSpot search limit is per second


class SandboxState:
    """Everything the route modules share; every world access happens under ``lock``.

    Derived frames (catalog, insights, CRM tables) are memoized per world version: the cache is
    dropped whenever the simulated clock moves or the server mutates the world (``bump``).
    """

    def __init__(
        self,
        world: Any,
        *,
        meta_token: str,
        hubspot_token: str,
        faults: Faults | None = None,
        limits: Limits | None = None,
        speed: float | None = None,
        request_counts: Counter | None = None,
    ) -> None:
        self.world = world
        self.lock = threading.RLock()
        self.meta_token = meta_token
        self.hubspot_token = hubspot_token
        self.injector = FaultInjector(faults)
        self.limits = limits or Limits()
        self.speed = speed
        self.request_counts: Counter = request_counts if request_counts is not None else Counter()
        self._version = 0
        self._cache: dict[Any, Any] = {}
        self._cache_key: Any = None
        self._static: dict[Any, Any] = {}
        self._ids = itertools.count(1)
        # HubSpot search: accepted requests (for the limit) and all attempts (for the statistic)
        self._search_accepted: deque[float] = deque()
        self._search_attempts: deque[float] = deque()
        # Graph usage: one deque of call times for the app and per (account, use-case type)
        self._app_calls: deque[float] = deque()
        self._account_calls: dict[str, deque[float]] = defaultdict(deque)
        self._buc_calls: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.report_runs: dict[str, dict[str, Any]] = {}
        self.capi_test_events: Counter = Counter()

    # ---- world versioning and memoization -------------------------------------------------
    def bump(self) -> None:
        """Mark the world as changed by the server (a mutation), dropping derived frames."""
        self._version += 1

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per world version (simulated time + server mutations)."""
        current = (self._version, self.world.now)
        if current != self._cache_key:
            self._cache.clear()
            self._cache_key = current
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def memo_static(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once for the server's life: for facts that never change (object ids)."""
        if key not in self._static:
            self._static[key] = build()
        return self._static[key]

    # ---- ids --------------------------------------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def fbtrace_id(self) -> str:
        """An opaque, deterministic trace id like Graph's ``fbtrace_id``."""
        digest = hashlib.sha256(f"trace-{self.next_id()}".encode()).digest()
        return base64.urlsafe_b64encode(digest[:9]).decode()

    def correlation_id(self) -> str:
        """A UUID-shaped HubSpot ``correlationId``."""
        h = hashlib.sha256(f"corr-{self.next_id()}".encode()).hexdigest()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    # ---- counters ---------------------------------------------------------------------------
    def count(self, *families: str) -> None:
        for family in families:
            self.request_counts[family] += 1

    # ---- HubSpot search rate limit (real wall clock, sliding window) ----------------------
    def hubspot_search_admit(self) -> float | None:
        """Record one search attempt; ``None`` if admitted, else seconds until it would be."""
        now = time.monotonic()
        attempts = self._search_attempts
        attempts.append(now)
        while attempts and attempts[0] <= now - SEARCH_WINDOW_SECONDS:
            attempts.popleft()
        key = "hubspot_search_max_per_second"
        self.request_counts[key] = max(self.request_counts[key], len(attempts))
        accepted = self._search_accepted
        while accepted and accepted[0] <= now - SEARCH_WINDOW_SECONDS:
            accepted.popleft()
        cap = self.limits.hubspot_search_per_second
        if cap is not None and len(accepted) >= cap:
            return max(0.0, accepted[len(accepted) - cap] + SEARCH_WINDOW_SECONDS - now)
        accepted.append(now)
        return None

    # ---- Graph usage ------------------------------------------------------------------------
    @staticmethod
    def _prune(calls: deque[float], now: float) -> None:
        while calls and calls[0] <= now - USAGE_WINDOW_SECONDS:
            calls.popleft()

    def graph_record(self, account_id: str | None, use_case: str) -> None:
        """Count one Graph call (a batch item counts as a call, like on the real API)."""
        now = time.monotonic()
        self._app_calls.append(now)
        if account_id is not None:
            self._account_calls[account_id].append(now)
            self._buc_calls[(account_id, use_case)].append(now)

    def graph_over_limit(self, account_id: str | None, use_case: str) -> tuple | None:
        """The throttle error (code, subcode, message, scope) when a rolling budget is spent."""
        now = time.monotonic()
        self._prune(self._app_calls, now)
        app_cap = self.limits.graph_calls_per_hour_app
        if app_cap is not None and len(self._app_calls) >= app_cap:
            return (4, None, "(#4) Application request limit reached", "app")
        acc_cap = self.limits.graph_calls_per_hour_account
        if account_id is not None and acc_cap is not None:
            calls = self._account_calls[account_id]
            self._prune(calls, now)
            if len(calls) >= acc_cap:
                if use_case == "ads_insights":
                    msg = "(#80000) There have been too many calls from this ad-account."
                    return (80000, 2446079, msg + " Wait a bit and try again.", "account")
                msg = "(#80004) There have been too many calls to this ad-account."
                return (80004, 2446079, msg + " Wait a bit and try again.", "account")
        return None

    @staticmethod
    def _pct(count: int, cap: int | None) -> int:
        if not cap:
            return 0
        return math.ceil(100.0 * count / cap)

    def _regain_minutes(self, calls: deque[float], cap: int | None, now: float) -> int:
        if not cap or len(calls) < cap:
            return 0
        # the oldest call that must expire before the count drops below the cap
        oldest = calls[len(calls) - cap]
        return max(1, math.ceil((oldest + USAGE_WINDOW_SECONDS - now) / 60.0))

    def usage_headers(
        self, account_id: str | None, use_case: str, *, saturate: str | None = None
    ) -> dict[str, str]:
        """``x-app-usage``, ``x-ad-account-usage`` and ``x-business-use-case-usage`` headers.

        ``saturate`` ("app", "account") forces the matching figures to 100% (fault throttles).
        """
        now = time.monotonic()
        self._prune(self._app_calls, now)
        app_pct = self._pct(len(self._app_calls), self.limits.graph_calls_per_hour_app)
        if saturate == "app":
            app_pct = max(app_pct, 100)
        app = {
            "call_count": app_pct,
            "total_time": app_pct // 2,
            "total_cputime": app_pct // 3,
        }
        headers = {"x-app-usage": json.dumps(app, separators=(",", ":"))}
        if account_id is None:
            return headers
        acc_cap = self.limits.graph_calls_per_hour_account
        calls = self._account_calls[account_id]
        self._prune(calls, now)
        acc_pct = self._pct(len(calls), acc_cap)
        regain = self._regain_minutes(calls, acc_cap, now)
        if saturate == "account":
            acc_pct, regain = max(acc_pct, 100), max(regain, 5)
        reset = 0 if acc_pct == 0 else int(USAGE_WINDOW_SECONDS - (now - calls[0]) if calls else 0)
        headers["x-ad-account-usage"] = json.dumps(
            {
                "acc_id_util_pct": acc_pct,
                "reset_time_duration": max(0, reset),
                "ads_api_access_tier": "standard_access",
            },
            separators=(",", ":"),
        )
        buc = []
        for kind in ("ads_management", "ads_insights"):
            kind_calls = self._buc_calls.get((account_id, kind))
            if kind_calls is None and kind != use_case:
                continue
            kind_calls = kind_calls if kind_calls is not None else deque()
            self._prune(kind_calls, now)
            pct = self._pct(len(kind_calls), acc_cap)
            kind_regain = self._regain_minutes(kind_calls, acc_cap, now)
            if saturate == "account" and kind == use_case:
                pct, kind_regain = max(pct, 100), max(kind_regain, 5)
            buc.append(
                {
                    "type": kind,
                    "call_count": pct,
                    "total_cputime": pct // 3,
                    "total_time": pct // 2,
                    "estimated_time_to_regain_access": kind_regain,
                }
            )
        headers["x-business-use-case-usage"] = json.dumps({account_id: buc}, separators=(",", ":"))
        return headers


def iso_graph(column: str) -> pl.Expr:
    """A UTC datetime column as Graph prints it: ``2026-11-20T10:15:00+0000``."""
    return pl.col(column).dt.strftime("%Y-%m-%dT%H:%M:%S+0000")


def iso_hubspot(column: str) -> pl.Expr:
    """A UTC datetime column as HubSpot prints it: ``2026-11-20T10:15:00.000Z``."""
    return pl.col(column).dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")


def as_utc(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Make the given datetime columns ``Datetime("us", "UTC")`` whatever the world returned."""
    exprs = []
    for name in columns:
        if name not in frame.columns:
            continue
        dtype = frame.schema[name]
        if isinstance(dtype, pl.Datetime):
            expr = pl.col(name)
            expr = (
                expr.dt.replace_time_zone("UTC")
                if dtype.time_zone is None
                else expr.dt.convert_time_zone("UTC")
            )
            exprs.append(expr.dt.cast_time_unit("us").alias(name))
        elif dtype == pl.Date:
            exprs.append(pl.col(name).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
        elif dtype == pl.String:
            exprs.append(pl.col(name).str.to_datetime(time_zone="UTC", time_unit="us").alias(name))
    return frame.with_columns(exprs) if exprs else frame


def rows_json(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: dates ``YYYY-MM-DD``, datetimes ISO-8601 UTC with ``Z``."""
    exprs = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Datetime):
            col = pl.col(name)
            if dtype.time_zone is not None:
                col = col.dt.convert_time_zone("UTC")
            exprs.append(col.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias(name))
        elif dtype == pl.Date:
            exprs.append(pl.col(name).dt.strftime("%Y-%m-%d").alias(name))
        elif dtype == pl.Duration:
            exprs.append(pl.col(name).dt.total_seconds().alias(name))
    if exprs:
        frame = frame.with_columns(exprs)
    return frame.to_dicts()
