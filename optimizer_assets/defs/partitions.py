"""Time partitions shared by the daily assets."""

from __future__ import annotations

import os

import dagster as dg

PARTITIONS_START = "2026-01-01"
# The sandbox's clock runs ahead of the wall clock in the live UI (one simulated hour per
# second), so sandbox mode lists a year of future days; live mode lists up to today.
_END_OFFSET = 366 if os.environ.get("OPTIMIZER_MODE", "sandbox").lower() == "sandbox" else 1

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=_END_OFFSET)
