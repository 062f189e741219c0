"""The one `Definitions` of the code location, assembled from the modules under `defs/`.

Each stage of the loop lives in its own module under `defs/` and exposes any of `assets`,
`asset_checks`, `jobs`, `sensors` and `schedules` (lists). Add a stage by listing its module here.
"""

from __future__ import annotations

import importlib

import dagster as dg

from optimizer_assets.defs.resources import build_resources

STAGE_MODULES = (
    "optimizer_assets.defs.ingestion",
    "optimizer_assets.defs.revenue",
    "optimizer_assets.defs.attribution",
    "optimizer_assets.defs.capi",
    "optimizer_assets.defs.allocation",
    "optimizer_assets.defs.execution",
    "optimizer_assets.defs.orchestration",
    "optimizer_assets.defs.learning",
)

_modules = [importlib.import_module(name) for name in STAGE_MODULES]


def _collect(attribute: str) -> list:
    return [item for module in _modules for item in getattr(module, attribute, [])]


loop_assets = _collect("assets")
loop_checks = _collect("asset_checks")

# the whole loop for one day: unpartitioned assets plus that day's partition of the daily ones
optimizer_loop_job = dg.define_asset_job(
    "optimizer_loop",
    selection=dg.AssetSelection.assets(*loop_assets),
    tags={"optimizer/meta-writes": "true"},  # it uploads to CAPI and changes budgets
)

defs = dg.Definitions(
    assets=loop_assets,
    asset_checks=loop_checks,
    jobs=[optimizer_loop_job, *_collect("jobs")],
    sensors=_collect("sensors"),
    schedules=_collect("schedules"),
    resources=build_resources(),
)
