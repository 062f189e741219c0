"""A monotonic clock for client tests that moves only when the client sleeps."""

from __future__ import annotations

import time


class FakeClock:
    """Pass as a client's ``clock`` and ``sleep=clock.sleep``: waits are recorded in ``sleeps``
    and advance ``now`` instantly, so retry and throttle tests take no real time."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
