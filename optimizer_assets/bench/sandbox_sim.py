"""How fast the sandbox world simulates: ad-days per second and peak memory.

Full: 100 accounts x 1,000 ads for 30 simulated days. Quick: 10 x 100 for 7 days. Each run
builds and advances a fresh world in its own spawned process (so peak RSS is that run's),
then times the frames the server reads. The baseline, measured in this process, is one
``numpy`` Poisson draw per ad-hour: the least any per-ad hourly simulator must do.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import time

import numpy as np


def _run_world(accounts: int, ads_per_account: int, days: int, seed: int) -> dict[str, float]:
    """Build and advance one world; returns timings (s), sizes and peak RSS (MB)."""
    from optimizer_assets.sandbox.world import World, WorldConfig

    out: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    world = World(WorldConfig(seed=seed, accounts=accounts, ads_per_account=ads_per_account))
    out["build_s"] = time.perf_counter() - wall
    wall, cpu = time.perf_counter(), time.process_time()
    world.advance(24 * days)
    out["advance_wall_s"] = time.perf_counter() - wall
    out["advance_cpu_s"] = time.process_time() - cpu
    out["sim_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    account = world.accounts()["account_id"][0]
    for name, build in (
        ("deals", world.deals),
        ("contacts", world.contacts),
        (
            "insights_one_account",
            lambda: world.insights(account, world.config.start.date(), world.now.date()),
        ),
    ):
        wall = time.perf_counter()
        out[f"rows_{name}"] = float(build().height)
        out[f"frame_{name}_s"] = time.perf_counter() - wall
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["people"] = float(world.counts()["people"])
    return out


def _in_child(accounts: int, ads_per_account: int, days: int, seed: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_run_world, (accounts, ads_per_account, days, seed))


def _baseline_s(n_ads: int, hours: int) -> tuple[float, float]:
    """One Poisson draw per ad-hour (wall, CPU seconds): the floor for a per-ad simulator."""
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.0, 60.0, n_ads)
    wall, cpu = time.perf_counter(), time.process_time()
    for hour in range(hours):
        np.random.default_rng([0, hour]).poisson(lam)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(quick: bool = False) -> str:
    """Markdown report: simulated ad-days per second (median over runs) and peak RSS."""
    accounts, ads, days = (10, 100, 7) if quick else (100, 1000, 30)
    n_ads = accounts * ads
    # quick runs in this process (spawning costs seconds); full runs get a fresh process each
    run = _run_world if quick else _in_child
    runs = [run(accounts, ads, days, 1)]
    # repeat when a run is cheap enough (median of three), else report the single run
    extra = 2 if quick or runs[0]["advance_wall_s"] < 90 else 0
    runs += [run(accounts, ads, days, 1 + i) for i in range(1, 1 + extra)]
    base_wall, base_cpu = _baseline_s(n_ads, 24 * days)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ad_days = n_ads * days
    rss_note = " (bench process)" if quick else ""
    wall, cpu = med("advance_wall_s"), med("advance_cpu_s")
    lines = [
        f"World: {accounts} accounts x {ads} ads = {n_ads:,} ads, {days} simulated days "
        f"({ad_days:,} ad-days), {len(runs)} run(s), median shown.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| simulated ad-days / s (wall) | {ad_days / wall:,.0f} |",
        f"| simulated ad-days / s (CPU) | {ad_days / cpu:,.0f} |",
        f"| advance wall / CPU (s) | {wall:.2f} / {cpu:.2f} |",
        f"| world build (s) | {med('build_s'):.2f} |",
        f"| people (leads) simulated | {med('people'):,.0f} |",
        f"| peak RSS after simulation (MB){rss_note} | {med('sim_rss_mb'):,.0f} |",
        f"| peak RSS after frames (MB){rss_note} | {med('peak_rss_mb'):,.0f} |",
        f"| deals() frame: rows / s | {med('rows_deals'):,.0f} / {med('frame_deals_s'):.2f} |",
        f"| contacts() frame: rows / s | {med('rows_contacts'):,.0f} / "
        f"{med('frame_contacts_s'):.2f} |",
        f"| insights(one account): rows / s | {med('rows_insights_one_account'):,.0f} / "
        f"{med('frame_insights_one_account_s'):.3f} |",
        "",
        "| vs baseline (same process) | wall (s) | CPU (s) | CPU ratio |",
        "|---|---|---|---|",
        f"| one numpy Poisson draw per ad-hour | {base_wall:.2f} | {base_cpu:.2f} | 1.00 |",
        f"| full world simulation | {wall:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} |",
        "",
        f"Machine load average during the run: {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (wall figures suffer when it exceeds the CPU count).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(quick=True))
