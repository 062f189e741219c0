"""Winner index: selection, embeddings, FAISS search, persistence, cold-start priors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from optimizer_assets.domain.winner_index import (
    NEIGHBOR_SCHEMA,
    EmbeddingConfig,
    IndexParams,
    WinnerIndex,
    WinnerSettings,
    build,
    embed,
    priors_from_winners,
    select_winners,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
VOCAB = {
    "hook_type": ["question", "stat", "story", "offer", "testimonial", "pain"],
    "format": ["image", "video", "carousel"],
    "cta": ["learn_more", "book_now", "get_quote", "sign_up"],
    "emotion": ["trust", "urgency", "curiosity", "joy"],
}
WORDS = [f"word{i}" for i in range(400)]


def _creatives(n: int, seed: int, *, accounts: int = 8, prefix: str = "w") -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, (n, 10))
    spend = rng.uniform(100, 2000, n)
    return pl.DataFrame(
        {
            "ad_id": [f"{prefix}{i}" for i in range(n)],
            "account_id": [f"acct{i % accounts}" for i in range(n)],
            **{k: rng.choice(v, n) for k, v in VOCAB.items()},
            "title": [" ".join(w[:3]) for w in words],
            "body": [" ".join(w[3:]) for w in words],
            "spend": spend,
            "pipeline_value": spend * rng.uniform(2.0, 6.0, n),
            "clicks": rng.integers(45, 120, n),
            "impressions": np.full(n, 2000),
            "created_at": [NOW - timedelta(days=3)] * n,
        }
    )


def test_select_winners_applies_every_threshold_and_per_account_overrides():
    base = {
        "account_id": "a",
        "spend": 200.0,
        "pipeline_value": 600.0,
        "clicks": 50,
        "impressions": 2000,
        "created_at": NOW - timedelta(days=2),
    }
    perf = pl.DataFrame(
        [
            {**base, "ad_id": "ok"},
            {**base, "ad_id": "low_roas", "pipeline_value": 390.0},
            {**base, "ad_id": "low_ctr", "clicks": 39},
            {**base, "ad_id": "low_spend", "spend": 99.0, "pipeline_value": 300.0},
            {**base, "ad_id": "young", "created_at": NOW - timedelta(hours=23)},
            {**base, "ad_id": "strict_account", "account_id": "b"},
        ]
    )
    over = pl.DataFrame({"account_id": ["b"], "min_roas": [3.5], "min_ctr": [None]})
    out = select_winners(perf, now=NOW, per_account=over)
    assert out["ad_id"].to_list() == ["ok"]
    assert out["roas"].to_list() == [3.0] and out["ctr"].to_list() == [0.025]
    assert out.columns == [*perf.columns, "roas", "ctr"]
    loose = select_winners(perf, now=NOW, settings=WinnerSettings(min_roas=1.5, min_ctr=0.01))
    assert set(loose["ad_id"]) == {"ok", "low_roas", "low_ctr", "strict_account"}


def test_embeddings_are_deterministic_unit_float32_and_trait_aware():
    c = _creatives(50, 1)
    x = embed(c)
    assert x.dtype == np.float32 and x.shape == (50, EmbeddingConfig().dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x, embed(c))
    np.testing.assert_array_equal(x[7], embed(c[7:8])[0])  # no dependence on the batch
    pair = pl.DataFrame(
        {
            "hook_type": ["question", "question", "stat"],
            "format": ["video", "video", "image"],
            "cta": ["book_now"] * 3,
            "emotion": ["trust", "trust", "joy"],
            "title": ["fix your roof today", "new roof in a day", "fix your roof today"],
            "body": [None, None, None],
        }
    )
    v = embed(pair)
    # traits weigh 60%: same traits + related copy beats same copy with 3 of 4 traits changed
    same_traits, same_text = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert same_traits > same_text > 0.4


def test_each_winner_finds_itself_first():
    c = _creatives(400, 2)
    index = build(c)
    assert index.kind == "flat" and index.size == 400
    assert index.self_match_rate() == 1.0
    assert index.self_match_rate(sample=50, rng=np.random.default_rng(0)) == 1.0
    shuffled = WinnerIndex(
        index.index, index.winners.reverse(), index.config, index.params, index.version, "flat"
    )
    assert shuffled.self_match_rate() < 0.1  # metadata out of line with vectors is caught
    hits = index.search(c, k=1, exclude_self=False)
    assert hits["ad_id"].to_list() == c["ad_id"].to_list()
    top = index.similar_winners(c.row(5, named=True), k=5)
    assert top.columns == ["ad_id", "account_id", "similarity", "roas", "ctr"]
    assert top["ad_id"][0] == "w5" and top["similarity"][0] == pytest.approx(1.0, abs=1e-5)
    assert top["similarity"].is_sorted(descending=True)


def test_hnsw_recall_against_exact_search():
    winners = _creatives(3000, 3)
    queries = _creatives(200, 4, prefix="q")
    exact = build(winners)
    approx = build(winners, params=IndexParams(hnsw_threshold=1000))
    assert (exact.kind, approx.kind) == ("flat", "hnsw")
    e = exact.search(queries, k=5)
    a = approx.search(queries, k=5)
    assert e.schema == pl.Schema(NEIGHBOR_SCHEMA) and a.height == e.height
    # tie-aware recall: an HNSW hit counts when it is at least as similar as exact's 5th
    fifth = e.group_by("query").agg(pl.col("similarity").min().alias("kth"))
    recall = a.join(fifth, on="query").select((pl.col("similarity") >= pl.col("kth") - 1e-5).mean())
    assert recall.item() >= 0.95
    assert approx.self_match_rate() >= 0.99


def test_save_load_round_trip_gives_identical_results(tmp_path):
    winners = _creatives(300, 5)
    queries = _creatives(20, 6, prefix="q")
    for params in (IndexParams(), IndexParams(hnsw_threshold=100)):
        index = build(winners, params=params)
        path = index.save(tmp_path / index.kind)
        loaded = WinnerIndex.load(path)
        assert (loaded.version, loaded.kind, loaded.size) == (index.version, index.kind, 300)
        assert loaded.search(queries, k=5).equals(index.search(queries, k=5))


def test_version_follows_content(tmp_path):
    winners = _creatives(100, 7)
    v1 = build(winners).version
    assert build(winners.reverse()).version == v1  # order of rows does not matter
    assert build(winners.head(99)).version != v1
    assert build(winners, EmbeddingConfig(text_features=32)).version != v1
    changed = winners.with_columns(pl.col("pipeline_value") * 2)
    assert build(changed).version != v1


def test_load_refuses_files_that_do_not_belong_together(tmp_path):
    build(_creatives(50, 8)).save(tmp_path)
    _creatives(50, 9).pipe(build).winners.write_parquet(tmp_path / "winners.parquet")
    with pytest.raises(ValueError):
        WinnerIndex.load(tmp_path)


def test_priors_come_from_similar_winners_weighted_by_similarity():
    winners = _creatives(500, 10)
    index = build(winners)
    twin = winners[42:43].with_columns(pl.lit("brand_new").alias("ad_id"))
    stranger = pl.DataFrame({"ad_id": ["odd"], "account_id": ["acct1"], "title": ["zzz qqq"]})
    out = priors_from_winners(pl.concat([twin, stranger], how="diagonal"), index, k=5)
    t, s = out.rows(named=True)
    assert s["prior_alpha"] is None and s["prior_roas"] is None and s["prior_reason"] is None
    src = winners.row(42, named=True)
    twin_ctr = t["prior_alpha"] / (t["prior_alpha"] + t["prior_beta"])
    neighbours = index.search(twin, k=5)
    lo, hi = neighbours["ctr"].min(), neighbours["ctr"].max()
    assert lo - 0.005 <= twin_ctr <= hi + 0.005
    assert 1.0 < t["prior_roas"] < neighbours["roas"].max()
    assert 0.2 < t["prior_similarity"] <= 1.0
    assert "ad w42" in t["prior_reason"]
    # a winner asking for its own prior does not count itself
    own = priors_from_winners(winners[42:43], index, k=5).row(0, named=True)
    assert "ad w42" not in own["prior_reason"]
    assert src["ad_id"] == "w42"


def test_same_account_search_stays_in_the_account():
    winners = _creatives(400, 11, accounts=4)
    index = build(winners)
    queries = _creatives(10, 12, accounts=4, prefix="q")
    hits = index.search(queries, k=3, same_account=True)
    acct = queries.with_row_index("query").select("query", pl.col("account_id").alias("qa"))
    joined = hits.join(acct, on="query")
    assert joined.height == 30 and (joined["account_id"] == joined["qa"]).all()
