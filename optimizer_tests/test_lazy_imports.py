"""Loading the code location must not import river or scikit-learn (each Dagster run loads it).

Each test runs a fresh interpreter: the test process itself has both libraries loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import polars as pl

from optimizer_assets.domain.instant_learner import InstantLearner
from optimizer_tests.test_instant_learner import START, _world

HEAVY = ("river", "sklearn")


def _run(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_definitions_leaves_river_and_sklearn_out_of_sys_modules():
    out = _run(
        "import json, sys\n"
        "import optimizer_assets.definitions as d\n"
        "assert d.defs is not None\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    assert out == dict.fromkeys(HEAVY, False)


def test_stored_learner_and_embeddings_work_in_a_process_that_loaded_neither(tmp_path):
    """A pickled learner loads (pickle imports river itself), predicts the same, keeps learning
    (new drift detectors are built lazily), and the winner embedding imports sklearn on use."""
    ads, events = _world(4, days=30)
    learner = InstantLearner()
    learner.learn_many(events.filter(pl.col("day") < 20))
    now = START + timedelta(days=21)
    (tmp_path / "state.bin").write_bytes(learner.to_bytes())
    ads.write_parquet(tmp_path / "ads.parquet")
    learner.predict_many(ads, now=now).write_parquet(tmp_path / "expected.parquet")
    events.filter(pl.col("day") >= 20).write_parquet(tmp_path / "rest.parquet")
    learned_before = learner.events_learned
    learner.learn_many(pl.read_parquet(tmp_path / "rest.parquet"))

    out = _run(
        "import json, sys\n"
        "from datetime import datetime\n"
        "from pathlib import Path\n"
        "import polars as pl\n"
        "import optimizer_assets.definitions\n"
        "from optimizer_assets.domain.instant_learner import InstantLearner\n"
        "from optimizer_assets.domain.winner_index import embed\n"
        "d = Path(sys.argv[1])\n"
        f"before = {{m: m in sys.modules for m in {HEAVY!r}}}\n"
        "ln = InstantLearner.from_bytes((d / 'state.bin').read_bytes())\n"
        "ads = pl.read_parquet(d / 'ads.parquet')\n"
        "now = datetime.fromisoformat(sys.argv[2])\n"
        "same = ln.predict_many(ads, now=now).equals(pl.read_parquet(d / 'expected.parquet'))\n"
        "ln.learn_many(pl.read_parquet(d / 'rest.parquet'))\n"
        "vec = embed(ads.head(3).with_columns(title=pl.lit('a'), body=pl.lit('b')))\n"
        "print(json.dumps({'before': before, 'same': same, 'learned': ln.events_learned,\n"
        "    'drifts': len(ln.drifts), 'shape': list(vec.shape)}))\n",
        str(tmp_path),
        now.isoformat(),
    )
    assert out["before"] == dict.fromkeys(HEAVY, False)
    assert out["same"] is True
    assert learned_before < out["learned"] == learner.events_learned == events.height
    assert out["drifts"] == len(learner.drifts)
    assert out["shape"][0] == 3
