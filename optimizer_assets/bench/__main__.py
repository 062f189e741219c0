"""`python -m optimizer_assets.bench [name ...] [--quick]`: run the benchmarks, print markdown."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import optimizer_assets.bench as bench_pkg


def available() -> list[str]:
    modules = pkgutil.iter_modules(bench_pkg.__path__)
    return sorted(m.name for m in modules if not m.name.startswith("_"))


def run(names: list[str], quick: bool) -> int:
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}")
        return 2
    for name in names or available():
        module = importlib.import_module(f"optimizer_assets.bench.{name}")
        started = time.perf_counter()
        print(f"\n## {name}\n", flush=True)
        print(module.main(quick=quick), flush=True)
        print(f"\n_({name}: {time.perf_counter() - started:.1f} s wall)_", flush=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(run([a for a in args if not a.startswith("-")], quick="--quick" in args))
