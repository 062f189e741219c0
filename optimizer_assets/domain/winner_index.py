"""Winner index: past winning ads, embedded locally, searchable with FAISS for cold-start priors.

- :func:`select_winners` picks winners per account settings (defaults: pipeline ROAS >= 2.0,
  CTR >= 2%, spend >= $100, age >= 24 h).
- :func:`embed` turns creatives (traits + copy) into deterministic float32 vectors with
  scikit-learn hashing only (no fitted vocabulary, no download): each trait hashes into its own
  block of buckets, the copy (title + body, word 1-2 grams) into a signed hashing block; both
  blocks are L2-normalized, weighted, concatenated and L2-normalized again, so inner product =
  cosine similarity = ``trait_weight`` x trait agreement + the rest x copy similarity.
- :func:`build` makes a :class:`WinnerIndex`: exact ``IndexFlatIP`` below ``HNSW_THRESHOLD``
  winners, ``IndexHNSWFlat`` (inner product) above it; ``save``/``load`` by directory with a
  content-derived version string.
- :func:`priors_from_winners` gives new ads Beta priors on CTR and a ROAS prior from their
  nearest winners, weighted by similarity: the ``prior_alpha``, ``prior_beta``, ``prior_roas``
  inputs of ``sampler.allocate``.

Creatives frame columns: ad_id, account_id (Utf8), hook_type, format, cta, emotion, title, body
(Utf8, nullable). Winner rows also carry spend, pipeline_value (Float64), clicks, impressions
(Int64) and created_at (Datetime UTC) for selection.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import faiss
import numpy as np
import polars as pl

# scikit-learn is imported inside embed(), not here: importing it costs ~1 s CPU, and every
# Dagster run loads this module with the code location whether or not it embeds anything.

TRAITS: tuple[str, ...] = ("hook_type", "format", "cta", "emotion")
# Exact search below this many winners, HNSW above. Measured with bench/learning.py on this
# 2-core box (d=128): at 50k winners exact single-query top-5 took 2-5 ms (p50) and a batch over
# all winners (the self-match check) ran at 100-270 queries/s, while HNSW answered in ~0.1 ms
# with recall@5 0.99 after a ~20 s build; at 10k exact was ~0.2 ms, recall 1, no build cost.
HNSW_THRESHOLD = 50_000
INDEX_FILE = "winners.faiss"
META_FILE = "winners.parquet"
MANIFEST_FILE = "manifest.json"
NEIGHBOR_SCHEMA: dict[str, pl.DataType] = {
    "query": pl.UInt32(),
    "rank": pl.UInt32(),
    "ad_id": pl.Utf8(),
    "account_id": pl.Utf8(),
    "similarity": pl.Float32(),
    "roas": pl.Float64(),
    "ctr": pl.Float64(),
}
_META_COLUMNS = (
    "ad_id",
    "account_id",
    *TRAITS,
    "spend",
    "pipeline_value",
    "clicks",
    "impressions",
    "roas",
    "ctr",
    "title",
    "body",
)


@dataclass(frozen=True)
class WinnerSettings:
    """What makes a winner (per account; defaults from the learning issue)."""

    min_roas: float = 2.0  # pipeline value / spend
    min_ctr: float = 0.02  # clicks / impressions
    min_spend: float = 100.0  # currency units
    min_age_hours: float = 24.0


@dataclass(frozen=True)
class EmbeddingConfig:
    """Shape of the creative embedding; changing it changes every vector (and the version)."""

    trait_buckets: int = 16  # hashed buckets per trait (collision odds 1/16 per value pair)
    text_features: int = 64  # signed hashing buckets for the copy's word 1-2 grams
    trait_weight: float = 0.6  # share of the similarity that comes from traits

    @property
    def dim(self) -> int:
        return self.trait_buckets * len(TRAITS) + self.text_features


@dataclass(frozen=True)
class IndexParams:
    """FAISS choices: exact below ``hnsw_threshold`` winners, HNSW with these knobs above."""

    hnsw_threshold: int = HNSW_THRESHOLD
    hnsw_m: int = 16  # M=16/efConstruction=40: a 1M build already takes ~6-10 min on 2 cores
    ef_construction: int = 40
    ef_search: int = 128  # recall@5 0.998 / 0.987 / 0.896 at 50k / 100k / 1M (bench sweep)


def select_winners(
    perf: pl.DataFrame,
    *,
    now: datetime,
    settings: WinnerSettings | None = None,
    per_account: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Rows of ``perf`` that are winners, with ``roas`` and ``ctr`` added.

    ``per_account`` (account_id + any of min_roas, min_ctr, min_spend, min_age_hours; null =
    default) overrides ``settings`` for its accounts.
    """
    s = settings or WinnerSettings()
    limits = asdict(s)
    frame = perf
    if per_account is not None:
        over = per_account.select(
            pl.col("account_id").cast(pl.Utf8),
            *[
                pl.col(k).cast(pl.Float64).alias(f"_{k}")
                for k in limits
                if k in per_account.columns
            ],
        )
        frame = frame.join(over, on="account_id", how="left", maintain_order="left")
    lim = {
        k: pl.col(f"_{k}").fill_null(v) if f"_{k}" in frame.columns else pl.lit(v)
        for k, v in limits.items()
    }
    age_h = (pl.lit(now) - pl.col("created_at")).dt.total_seconds(fractional=True) / 3600.0
    out = frame.with_columns(
        pl.when(pl.col("spend") > 0).then(pl.col("pipeline_value") / pl.col("spend")).alias("roas"),
        pl.when(pl.col("impressions") > 0)
        .then(pl.col("clicks") / pl.col("impressions"))
        .alias("ctr"),
    ).filter(
        (pl.col("roas") >= lim["min_roas"])
        & (pl.col("ctr") >= lim["min_ctr"])
        & (pl.col("spend") >= lim["min_spend"])
        & (age_h >= lim["min_age_hours"])
    )
    return out.drop([c for c in out.columns if c.startswith("_min_")])


def embed(creatives: pl.DataFrame, config: EmbeddingConfig | None = None) -> np.ndarray:
    """(n, config.dim) float32 unit vectors of traits + copy; deterministic, no fitted state."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.utils import murmurhash3_32

    cfg = config or EmbeddingConfig()
    n = creatives.height
    traits = np.zeros((n, cfg.trait_buckets * len(TRAITS)), dtype=np.float32)
    for j, t in enumerate(TRAITS):
        if t not in creatives.columns:
            continue
        values = creatives[t].cast(pl.Utf8)
        uniques = values.drop_nulls().unique().to_list()
        bucket = {
            u: j * cfg.trait_buckets
            + murmurhash3_32(f"{t}={u}", seed=0, positive=True) % cfg.trait_buckets
            for u in uniques
        }
        col = values.replace_strict(bucket, default=-1, return_dtype=pl.Int64).to_numpy()
        rows = np.nonzero(col >= 0)[0]
        traits[rows, col[rows]] = 1.0
    # copy is often reused across ads (formats, audiences): hash each distinct text once
    text = _text(creatives)
    distinct = text.unique(maintain_order=True)
    code = (
        text.to_frame("t")
        .join(
            distinct.to_frame("t").with_row_index("code"),
            on="t",
            how="left",
            maintain_order="left",
        )["code"]
        .to_numpy()
    )
    hv = HashingVectorizer(
        n_features=cfg.text_features,
        ngram_range=(1, 2),
        alternate_sign=True,
        norm="l2",
        dtype=np.float32,
    )
    words = hv.transform(distinct.to_list()).toarray()[code]
    _normalize(traits)
    out = np.hstack(
        [np.sqrt(cfg.trait_weight) * traits, np.sqrt(1.0 - cfg.trait_weight) * words]
    ).astype(np.float32)
    _normalize(out)
    return out


@dataclass
class WinnerIndex:
    """FAISS index over winners plus their metadata (row i of ``winners`` is vector id i)."""

    index: faiss.Index
    winners: pl.DataFrame
    config: EmbeddingConfig
    params: IndexParams
    version: str
    kind: str  # "flat" (exact) or "hnsw"
    _ranges: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # winners are sorted by account, so each account is a contiguous id range (for filters)
        spans = (
            self.winners.with_row_index("_i")
            .group_by("account_id")
            .agg(pl.col("_i").min().alias("lo"), (pl.col("_i").max() + 1).alias("hi"))
        )
        self._ranges = {a: (int(lo), int(hi)) for a, lo, hi in spans.iter_rows()}

    @property
    def size(self) -> int:
        return self.winners.height

    @property
    def dim(self) -> int:
        return self.config.dim

    def search(
        self,
        creatives: pl.DataFrame,
        k: int = 5,
        *,
        same_account: bool = False,
        exclude_self: bool = True,
    ) -> pl.DataFrame:
        """Top-k winners per creative: query (row number), rank, ad_id, account_id, similarity,
        roas, ctr. ``exclude_self`` drops a winner whose ad_id equals the query's ad_id;
        ``same_account`` restricts each query to winners of its own account.
        """
        sims, ids = self._neighbors(creatives, k, same_account, exclude_self)
        q = np.repeat(np.arange(creatives.height, dtype=np.uint32), ids.shape[1])
        r = np.tile(np.arange(1, ids.shape[1] + 1, dtype=np.uint32), creatives.height)
        flat_ids = ids.ravel()
        ok = flat_ids >= 0
        meta = self.winners.select("ad_id", "account_id", "roas", "ctr")[flat_ids[ok]]
        return pl.DataFrame(
            {
                "query": q[ok],
                "rank": r[ok],
                "ad_id": meta["ad_id"],
                "account_id": meta["account_id"],
                "similarity": sims.ravel()[ok].astype(np.float32),
                "roas": meta["roas"],
                "ctr": meta["ctr"],
            },
            schema=NEIGHBOR_SCHEMA,
        )

    def similar_winners(
        self, creative: dict | pl.DataFrame, k: int = 5, *, exclude_self: bool = False
    ) -> pl.DataFrame:
        """Winners most similar to one creative: ad_id, account_id, similarity, roas, ctr.

        A winner searched with its own creative comes back first (similarity 1).
        """
        frame = creative if isinstance(creative, pl.DataFrame) else pl.DataFrame([creative])
        return self.search(frame.head(1), k, exclude_self=exclude_self).drop("query", "rank")

    def self_match_rate(
        self, sample: int | None = None, rng: np.random.Generator | None = None
    ) -> float:
        """Share of winners that find themselves first when their stored creative is searched.

        Re-embeds the stored traits and copy, so it also proves metadata rows and vectors line
        up; an identical twin tied at the top counts as found. ``sample`` checks that many
        winners drawn with ``rng`` (the full check is one search per winner).
        """
        if self.size == 0:
            return 1.0
        ids = np.arange(self.size)
        if sample is not None and sample < self.size:
            gen = rng if rng is not None else np.random.default_rng(0)
            ids = np.sort(gen.choice(self.size, sample, replace=False))
        x = embed(self.winners[ids], self.config)
        sims, found = self.index.search(x, 1)
        own = np.einsum("ij,ij->i", x, self.index.reconstruct_batch(ids))
        aligned = own >= 1.0 - 1e-4  # stored vector i is the embedding of metadata row i
        first = (found[:, 0] == ids) | (sims[:, 0] >= own - 1e-5)
        return float((aligned & first).mean())

    def vectors(self) -> np.ndarray:
        """Stored vectors in id order (reconstructed from the index)."""
        if self.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.index.reconstruct_n(0, self.size)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write index, metadata parquet and manifest (last) into ``directory``; return it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic(d / INDEX_FILE, lambda p: faiss.write_index(self.index, str(p)))
        _atomic(d / META_FILE, lambda p: self.winners.write_parquet(p))
        manifest = {
            "version": self.version,
            "kind": self.kind,
            "dim": self.dim,
            "count": self.size,
            "embedding": asdict(self.config),
            "params": asdict(self.params),
            "faiss": faiss.__version__,
        }
        _atomic(d / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WinnerIndex:
        """Read an index written by :meth:`save`; raises ValueError if the parts disagree."""
        d = Path(directory)
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        index = faiss.read_index(str(d / INDEX_FILE))
        winners = pl.read_parquet(d / META_FILE)
        config = EmbeddingConfig(**manifest["embedding"])
        params = IndexParams(**manifest["params"])
        if index.ntotal != winners.height or index.d != config.dim:
            raise ValueError("winner index files are inconsistent (count or dimension)")
        out = cls(index, winners, config, params, manifest["version"], manifest["kind"])
        if _version(winners, out.vectors(), config) != manifest["version"]:
            raise ValueError("winner index files do not match their manifest version")
        return out

    def _neighbors(
        self, creatives: pl.DataFrame, k: int, same_account: bool, exclude_self: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) of shape (n, k); id -1 where fewer than k neighbours exist."""
        n = creatives.height
        sims = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or self.size == 0:
            return sims, ids
        x = embed(creatives, self.config)
        extra = 1 if exclude_self else 0
        kk = min(k + extra, self.size)
        if same_account:
            raw_s = np.full((n, kk), -np.inf, dtype=np.float32)
            raw_i = np.full((n, kk), -1, dtype=np.int64)
            accounts = creatives["account_id"].cast(pl.Utf8).to_numpy()
            for a in np.unique(accounts):  # one search per account, not per ad
                rows = np.nonzero(accounts == a)[0]
                if a not in self._ranges:
                    continue
                lo, hi = self._ranges[a]
                sel = faiss.IDSelectorRange(lo, hi)
                params = (
                    faiss.SearchParametersHNSW(sel=sel, efSearch=self.params.ef_search)
                    if self.kind == "hnsw"
                    else faiss.SearchParameters(sel=sel)
                )
                s, i = self.index.search(x[rows], kk, params=params)
                raw_s[rows], raw_i[rows] = s, i
        else:
            raw_s, raw_i = self.index.search(x, kk)
        if exclude_self and "ad_id" in creatives.columns:
            win_ids = self.winners["ad_id"].to_numpy()
            query_ids = creatives["ad_id"].cast(pl.Utf8).to_numpy()
            found = np.where(raw_i >= 0, win_ids[np.maximum(raw_i, 0)], None)
            is_self = found == query_ids[:, None]
            raw_i = np.where(is_self, -1, raw_i)
        # compact: valid neighbours first, in rank order, then keep k
        order = np.argsort(raw_i < 0, axis=1, kind="stable")
        raw_i = np.take_along_axis(raw_i, order, axis=1)[:, :k]
        raw_s = np.take_along_axis(raw_s, order, axis=1)[:, :k]
        w = raw_i.shape[1]
        ids[:, :w] = raw_i
        sims[:, :w] = np.where(raw_i >= 0, raw_s, -np.inf)
        return sims, ids


def build(
    winners: pl.DataFrame,
    config: EmbeddingConfig | None = None,
    params: IndexParams | None = None,
) -> WinnerIndex:
    """Embed winners and index them (exact below ``params.hnsw_threshold``, HNSW above)."""
    cfg = config or EmbeddingConfig()
    prm = params or IndexParams()
    meta = _metadata(winners)
    vectors = embed(meta, cfg)
    index, kind = make_faiss_index(vectors, prm)
    stored = meta.select([c for c in _META_COLUMNS if c in meta.columns])
    return WinnerIndex(index, stored, cfg, prm, _version(stored, vectors, cfg), kind)


def make_faiss_index(
    vectors: np.ndarray, params: IndexParams | None = None, kind: str | None = None
) -> tuple[faiss.Index, str]:
    """FAISS index over unit ``vectors``: ``kind`` "flat" or "hnsw" (default: by size)."""
    prm = params or IndexParams()
    kind = kind or ("hnsw" if len(vectors) >= prm.hnsw_threshold else "flat")
    d = vectors.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, prm.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = prm.ef_construction
        index.hnsw.efSearch = prm.ef_search
    elif kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, kind


def priors_from_winners(
    new_ads: pl.DataFrame,
    index: WinnerIndex,
    k: int = 5,
    *,
    prior_impressions: float = 500.0,
    min_similarity: float = 0.3,
    baseline_roas: float = 1.0,
    same_account: bool = False,
) -> pl.DataFrame:
    """Return ``new_ads`` with prior_alpha, prior_beta, prior_roas, prior_similarity, prior_reason.

    Among the k nearest winners (similarity >= ``min_similarity``; the ad itself excluded),
    CTR and ROAS are averaged with similarity weights. ``affinity`` = summed similarity / k
    (0-1) sets the prior's strength: ``prior_alpha/beta = 1 + affinity * prior_impressions *
    ctr / (1 - ctr)`` (Beta pseudo-counts on CTR) and ``prior_roas = affinity * roas + (1 -
    affinity) * baseline_roas`` (winners are a selected, optimistic sample, so weak matches
    stay near the baseline). Ads without a close winner get nulls (allocator defaults apply).
    """
    sims, ids = index._neighbors(new_ads, k, same_account, exclude_self=True)
    valid = (ids >= 0) & (sims >= min_similarity)
    w = np.where(valid, np.maximum(sims, 0.0), 0.0).astype(np.float64)
    total = w.sum(axis=1)
    has = total > 0
    safe_ids = np.maximum(ids, 0)
    ctr = index.winners["ctr"].to_numpy().astype(np.float64)[safe_ids]
    roas = index.winners["roas"].to_numpy().astype(np.float64)[safe_ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        m_ctr = np.where(has, (w * ctr).sum(axis=1) / total, np.nan)
        m_roas = np.where(has, (w * roas).sum(axis=1) / total, np.nan)
    affinity = total / k
    pseudo = affinity * prior_impressions
    top = ids[:, 0]
    top_ok = has & (top >= 0) & valid[:, 0]
    win_ad = index.winners["ad_id"].to_numpy()[np.maximum(top, 0)]
    cols = {
        "prior_alpha": np.where(has, 1.0 + pseudo * m_ctr, np.nan),
        "prior_beta": np.where(has, 1.0 + pseudo * (1.0 - m_ctr), np.nan),
        "prior_roas": np.where(has, affinity * m_roas + (1.0 - affinity) * baseline_roas, np.nan),
        "prior_similarity": np.where(has, affinity, np.nan),
    }
    out = new_ads.with_columns(
        [pl.Series(name, v, dtype=pl.Float64).fill_nan(None) for name, v in cols.items()]
    )
    out = out.with_columns(
        pl.Series("_n", valid.sum(axis=1), dtype=pl.Int64),
        # a list, not an object array: polars 2.1 fails to cast one that starts with None
        pl.Series("_best", np.where(top_ok, win_ad, None).tolist(), dtype=pl.Utf8),
        pl.Series("_sim", np.round(sims[:, 0].astype(np.float64), 2), dtype=pl.Float64),
    )
    reason = pl.format(
        "{} similar winners (best: ad {} at similarity {}), ROAS prior {}",
        pl.col("_n"),
        pl.col("_best"),
        pl.col("_sim"),
        pl.col("prior_roas").round(2),
    )
    return out.with_columns(
        pl.when(pl.col("prior_alpha").is_not_null()).then(reason).alias("prior_reason")
    ).drop("_n", "_best", "_sim")


# ---------------------------------------------------------------------- helpers


def _text(creatives: pl.DataFrame) -> pl.Series:
    parts = [pl.col(c).cast(pl.Utf8).fill_null("") for c in ("title", "body") if c in creatives]
    if not parts:
        return pl.Series("t", [""] * creatives.height, dtype=pl.Utf8)
    return creatives.select(pl.concat_str(parts, separator=" ")).to_series()


def _normalize(x: np.ndarray) -> None:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)


def _metadata(winners: pl.DataFrame) -> pl.DataFrame:
    """Winners with roas/ctr and all text columns, sorted by account (contiguous id ranges)."""
    frame = winners
    if "roas" not in frame.columns:
        frame = frame.with_columns(
            pl.when(pl.col("spend") > 0)
            .then(pl.col("pipeline_value") / pl.col("spend"))
            .alias("roas")
        )
    if "ctr" not in frame.columns:
        frame = frame.with_columns(
            pl.when(pl.col("impressions") > 0)
            .then(pl.col("clicks") / pl.col("impressions"))
            .alias("ctr")
        )
    frame = frame.with_columns(
        pl.col("ad_id").cast(pl.Utf8),
        pl.col("account_id").cast(pl.Utf8),
        pl.col("roas").cast(pl.Float64),
        pl.col("ctr").cast(pl.Float64),
    )
    return frame.unique("ad_id", keep="first", maintain_order=True).sort("account_id", "ad_id")


def _version(meta: pl.DataFrame, vectors: np.ndarray, config: EmbeddingConfig) -> str:
    """Content hash of embedding config, winner ids/metrics and vectors (16 hex chars)."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    keys = meta.select(pl.concat_str("ad_id", "account_id", separator="\t").str.join("\n"))
    h.update((keys.item() or "").encode())
    metrics = meta.select(pl.col("roas").round(6), pl.col("ctr").round(6)).to_numpy()
    h.update(np.ascontiguousarray(np.nan_to_num(metrics), dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    """Write through a temporary sibling then rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
