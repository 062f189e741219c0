"""Fault injection and rate limits of the sandbox server (seeded, so tests are reproducible)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass
class Faults:
    """Shares in [0, 1] of requests that go wrong; all default to 0 (a healthy service).

    - ``rate_429``: HubSpot (``/crm``) requests answered 429 with ``Retry-After``.
    - ``rate_5xx``: Graph, CAPI and HubSpot requests answered 500/502/503.
    - ``rate_throttle``: Graph and CAPI requests answered with a throttle error
      (code 4, 17/2446079, 80004/2446079 or, on insights, 80000/2446079) and usage headers at 100%.
    - ``rate_null_batch_item``: batch items that come back ``null`` (not executed, like a timeout).
    - ``slow_share``/``slow_seconds``: requests delayed by ``slow_seconds`` (async sleep).
    - ``report_run_polls``: status polls an async insights report run answers ``Job Running``
      (percent growing, 100 on the last such poll, as Meta sometimes does) before it ends.
    - ``rate_report_failed``: share of report runs that end ``Job Failed`` instead of
      ``Job Completed`` (drawn when the run starts, from a generator of its own so the
      per-request fault sequence stays the same).
    - ``seed``: seed of the generator that draws the faults, in request order.
    """

    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_throttle: float = 0.0
    rate_null_batch_item: float = 0.0
    slow_share: float = 0.0
    slow_seconds: float = 0.0
    report_run_polls: int = 0
    rate_report_failed: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = ("rate_429", "rate_5xx", "rate_throttle", "rate_null_batch_item", "slow_share")
        for name in (*rates, "rate_report_failed"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be in [0, 1], got {value}")
            setattr(self, name, value)
        if self.slow_seconds < 0:
            raise ValueError("Faults.slow_seconds must be >= 0")
        if int(self.report_run_polls) != self.report_run_polls or self.report_run_polls < 0:
            raise ValueError("Faults.report_run_polls must be a whole number >= 0")
        self.report_run_polls = int(self.report_run_polls)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Faults:
        """Build from a JSON object; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"unknown fault knobs: {', '.join(unknown)}")
        return cls(**payload)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Limits:
    """The real services' limits the sandbox enforces (``None`` switches one off, e.g. in benches).

    Defaults follow CONTRACTS.md; the Graph hourly call budgets are sandbox choices, sized so the
    usage headers visibly grow in tests while ordinary runs never hit them.
    """

    hubspot_search_per_second: int | None = 5  # sliding 1 s window of real wall-clock time
    hubspot_search_max_limit: int = 200
    hubspot_search_max_results: int = 10_000
    hubspot_batch_read_max: int = 100
    graph_batch_max: int = 50
    capi_max_events: int = 1000
    graph_calls_per_hour_account: int | None = 10_000  # rolling real hour; 100% -> code 17/80004
    graph_calls_per_hour_app: int | None = 50_000  # rolling real hour; 100% -> code 4

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Limits:
        """Build from a JSON object; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"unknown limits: {', '.join(unknown)}")
        return cls(**payload)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Graph throttle errors the fault knob draws from: (code, subcode, message)
GRAPH_THROTTLES: tuple[tuple[int, int | None, str], ...] = (
    (4, None, "(#4) Application request limit reached"),
    (17, 2446079, "(#17) User request limit reached"),
    (
        80004,
        2446079,
        "(#80004) There have been too many calls to this ad-account. Wait a bit and try again.",
    ),
)
INSIGHTS_THROTTLE = (
    80000,
    2446079,
    "(#80000) There have been too many calls from this ad-account. Wait a bit and try again.",
)


class FaultInjector:
    """Draws faults for each request from one seeded ``numpy.random.Generator``.

    Every request draws the same number of variates whatever the knobs, so a given request
    sequence meets the same faults on every run with the same seed.
    """

    def __init__(self, faults: Faults | None = None) -> None:
        self.set(faults or Faults())

    def set(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = np.random.default_rng(faults.seed)
        self.report_rng = np.random.default_rng([faults.seed, 1])

    def draw_request_faults(self, family: str) -> dict[str, Any]:
        """Faults for one request of a route family ("graph", "capi" or "hubspot")."""
        u = self.rng.random(4)
        f = self.faults
        throttle_rate = f.rate_429 if family == "hubspot" else f.rate_throttle
        return {
            "slow": f.slow_seconds if u[0] < f.slow_share and f.slow_seconds > 0 else 0.0,
            "error_5xx": bool(u[1] < f.rate_5xx),
            "throttle": bool(u[2] < throttle_rate),
            "variant": float(u[3]),
        }

    def draw_report_run(self) -> dict[str, Any]:
        """How one async report run behaves: polls it stays running, and whether it fails."""
        failed = bool(self.report_rng.random() < self.faults.rate_report_failed)
        return {"running_polls": self.faults.report_run_polls, "failed": failed}

    def draw_null_item(self) -> bool:
        """Whether one batch item comes back ``null``."""
        return bool(self.rng.random() < self.faults.rate_null_batch_item)
