"""Index types (cbir.index.factory) through the store: build, incremental add/delete, cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cbir.images import batches_by_shape
from cbir.index.factory import (
    IndexType,
    IndexTypeError,
    IndexTypeWarning,
    SearchIndex,
    auto_factory,
    parse_params,
    pq_m,
    validate,
)
from cbir.index.backends import FaissBackend
from cbir.index.store import Entry, Index, IndexStoreError

IDENTITY = {"pipeline": "test", "weights_sha256": "0" * 64}


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((50, d)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_index(tmp_path, factory: str, n: int = 3000, params: str | None = None, d: int = 32):
    idx = Index.create(tmp_path / "idx", IDENTITY, d, factory=factory)
    if params:
        idx.set_index_type(search_params=params)
    x = clustered(n, d)
    with idx.writer():
        ids = idx.add([Entry(f"/img/{i}.jpg", 1, 1, "h", {}) for i in range(n)], x)
    return idx, x, np.asarray(ids)


def test_auto_choice_by_size():
    assert auto_factory(10_000, 1280) == "Flat"
    assert auto_factory(100_000, 1280) == "IVF256_HNSW32,PQ64,RFlat"
    assert auto_factory(199_999, 256) == "IVF512_HNSW32,PQ64,RFlat"
    assert auto_factory(200_000, 256) == auto_factory(1_000_000, 256) == "HNSW32"
    assert pq_m(1280) == 64 and pq_m(256) == 64 and pq_m(100) == 25 and pq_m(32) == 8
    t = IndexType.parse("IVF4096,PQ32,RFlat")
    assert t.base == "IVF4096,PQ32" and t.refine and t.nlist == 4096 and t.can_remove
    assert not IndexType.parse("HNSW32").can_remove


def test_bad_type_and_params_are_one_line_errors(tmp_path):
    with pytest.raises(IndexTypeError, match="FAISS cannot build index type 'IVF12,Bogus7'"):
        validate("IVF12,Bogus7", 32)
    with pytest.raises(IndexStoreError, match="cannot build"):
        Index.create(tmp_path / "x", IDENTITY, 32, factory="NotAType")
    with pytest.raises(IndexTypeError, match="nprobe, efSearch"):
        parse_params("nprob=3")
    assert parse_params("nprobe=32, k_factor=4") == {"nprobe": 32, "k_factor": 4}


@pytest.mark.parametrize("factory,params", [
    ("Flat", None),
    ("IVF32,PQ8,RFlat", "nprobe=8,k_factor=10"),
    ("IVF32,PQ8,RFlat", "nprobe=8,ondisk=1"),
    ("HNSW32", "efSearch=64"),
])
def test_incremental_add_and_delete(tmp_path, factory, params):
    idx, x, ids = make_index(tmp_path, factory, params=params)
    _, found = idx.search(x[:20], 5)
    assert (found[:, 0] == ids[:20]).mean() >= 0.95  # each vector finds itself
    si = idx.search_index()
    assert str(si.type) == str(IndexType.parse(factory))
    if params and "ondisk" in params:
        assert si.mmapped  # inverted lists served from the cache file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with idx.writer():
            idx.remove(ids=[int(i) for i in ids[:5]])
        _, found = idx.search(x[:5], 3)
    assert not set(found.ravel()) & set(ids[:5].tolist())
    msgs = [str(w.message) for w in caught if issubclass(w.category, IndexTypeWarning)]
    assert not msgs  # a graph keeps the deleted vectors as tombstones instead of rebuilding
    if factory.startswith("HNSW"):
        assert idx.search_index().dead.tolist() == sorted(ids[:5].tolist())

    with idx.writer():
        new = idx.add([Entry(f"/new/{i}.jpg", 1, 1, "h", {}) for i in range(5)], x[:5])
    _, found = idx.search(x[:5], 1)
    assert found[:, 0].tolist() == new
    assert idx.search_index().ntotal == len(idx)


def test_graph_deletes_are_tombstones_until_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(FaissBackend, "CACHE_MIN_SECONDS", 0.0)
    idx, x, ids = make_index(tmp_path, "HNSW32", n=2000, params="efSearch=64")
    idx.search(x[:1], 1)
    built = idx.search_index()
    gone = ids[10:150]  # 7 %: under TOMBSTONE_MAX
    with idx.writer():
        idx.remove(ids=[int(i) for i in gone])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndexTypeWarning)  # no rebuild
        scores, found = idx.search(x[:200], 10)
    si = idx.search_index()
    assert si.index.ntotal == 2000 and si.ntotal == len(idx) == 1860 and len(si.dead) == 140
    assert not np.isin(found, gone).any() and (found >= 0).all()
    # Live vectors still find themselves; a deleted one's nearest live neighbour is exact.
    assert (found[:10, 0] == ids[:10]).all()
    exact = SearchIndex("Flat", 32).build(np.setdiff1d(ids, gone), x[np.isin(ids, gone, invert=True)])
    assert recall10(found[10:150], exact.search(x[10:150], 10)[1]) >= 0.95
    # Per-call parameter overrides keep skipping the tombstones.
    _, found = idx.search(x[10:150], 5, params={"efSearch": 16})
    assert not np.isin(found, gone).any()
    # A fresh process reads the cached graph and tombstones what the store no longer has.
    again = Index(idx.root)
    monkeypatch.setattr(SearchIndex, "build", lambda self, *a: pytest.fail("rebuilt"))
    _, found = again.search(x[10:150], 10)
    assert len(again.search_index().dead) == 140 and not np.isin(found, gone).any()
    monkeypatch.undo()

    # Past TOMBSTONE_MAX (10 % of the live vectors) the graph is rebuilt without them.
    with idx.writer():
        idx.remove(ids=[int(i) for i in ids[150:250]])
    with pytest.warns(IndexTypeWarning, match="240 deleted vectors.*rebuilding"):
        _, found = idx.search(x[:5], 3)
    si = idx.search_index()
    assert si is not built and si.index.ntotal == si.ntotal == 1760 and not len(si.dead)
    assert (found[:, 0] == ids[:5]).all()


def test_refine_recall_matches_exact(tmp_path):
    idx, x, ids = make_index(tmp_path, "IVF32,PQ8,RFlat", n=4000, params="nprobe=16,k_factor=16")
    q = clustered(100, seed=7)
    exact = SearchIndex("Flat", 32).build(ids, x)
    _, want = exact.search(q, 10)
    scores, got = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.9
    # Scores are exact inner products, not PQ estimates.
    row = np.searchsorted(ids, got[0, 0])
    assert scores[0, 0] == pytest.approx(float(x[row] @ q[0]), abs=1e-5)


def test_trained_index_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(FaissBackend, "CACHE_MIN_SECONDS", 0.0)
    idx, x, ids = make_index(tmp_path, "IVF32,PQ8,RFlat")
    idx.search(x[:1], 1)
    files = list((idx.root / "faiss").glob("*.faiss"))
    assert len(files) == 1 and f"g{idx.version():010d}" in files[0].name

    again = Index(idx.root)
    built = []
    monkeypatch.setattr(SearchIndex, "build", lambda self, *a: built.append(1) or pytest.fail("rebuilt"))
    _, found = again.search(x[:3], 1)
    assert found[:, 0].tolist() == ids[:3].tolist() and not built

    # A stale cache (older generation) is brought up to date incrementally, not rebuilt.
    with again.writer():
        again.remove(ids=[int(ids[0])])
    third = Index(idx.root)
    _, found = third.search(x[:1], 1)
    assert found[0, 0] != ids[0]


def test_too_few_vectors_to_train_searches_exactly(tmp_path):
    with pytest.warns(IndexTypeWarning, match="needs at least 256 vectors"):
        idx, x, ids = make_index(tmp_path, "IVF16,PQ8,RFlat", n=100)
        _, found = idx.search(x[:3], 1)
    assert found[:, 0].tolist() == ids[:3].tolist()
    assert str(idx.search_index().type) == "Flat"


def test_set_index_type_rebuilds_from_vectors(tmp_path):
    idx, x, ids = make_index(tmp_path, "Flat", n=2000)
    assert idx.set_index_type("IVF16,Flat", "nprobe=16")
    assert Index(idx.root).factory == "IVF16,Flat"
    _, found = idx.search(x[:3], 1)
    assert found[:, 0].tolist() == ids[:3].tolist()
    assert idx.stats()["index_type"] == "IVF16,Flat"
    with pytest.raises(IndexStoreError):
        idx.set_index_type("IVF16,Nope")


def test_batches_by_shape_bounds_pending_images():
    shapes = [(10 + i % 7, 12, 3) for i in range(50)]  # many distinct shapes
    alive, peak = 0, 0

    def items():
        nonlocal alive, peak
        for i, s in enumerate(shapes):
            alive += 1
            peak = max(peak, alive)
            yield i, np.zeros(s, np.uint8)

    seen = []
    for keys, batch in batches_by_shape(items(), 4, max_pending=4):
        alive -= len(keys)
        assert len({tuple(b.shape) for b in batch}) == 1
        seen += keys
    assert sorted(seen) == list(range(50))
    assert peak <= 5


# -- search: re-rank in FAISS, tuned parameters, threads (issue 16) -----------------------
def hard(n: int, d: int = 64, seed: int = 0, centres: int = 300) -> np.ndarray:
    """Overlapping blobs: nearest neighbours are not just "the same blob", so cheap search
    settings miss some (unlike `clustered`, where nprobe 1 finds nearly everything)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(98).standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 1.2 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall10(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)]))


def hard_index(tmp_path, n: int, d: int, factory: str) -> tuple[Index, np.ndarray, np.ndarray]:
    idx = Index.create(tmp_path / "idx", IDENTITY, d, factory=factory)
    x = hard(n, d)
    with idx.writer():
        ids = np.asarray(idx.add([Entry(f"/img/{i}.jpg", 1, 1, "h", {}) for i in range(n)], x))
    return idx, x, ids


def test_tuned_setting_reaches_target_recall_on_50k(tmp_path):
    n, d = 50_000, 64
    idx, x, ids = hard_index(tmp_path, n, d, "auto")
    tuned = idx.tune_search(0.95)
    si = idx.search_index()
    assert str(si.type) == "IVF256_HNSW32,PQ16,RFlat" and tuned["type"] == str(si.type)
    assert tuned["reached"] and tuned["recall"] >= 0.95 and tuned["params"].keys() == {"nprobe", "k_factor"}
    # Stored with the index, and used by a fresh process.
    assert Index(idx.root).info["tuned"]["params"] == tuned["params"]
    assert Index(idx.root).search_index().effective_params["nprobe"] == tuned["params"]["nprobe"]

    # New queries (not in the index) reach the target with the tuned setting...
    q = hard(300, d, seed=5)
    _, want = SearchIndex("Flat", d).build(ids, x).search(q, 10)
    _, got = Index(idx.root).search(q, 10)
    assert recall10(got, want) >= 0.95
    # ...where the cheapest setting does not: the tuning had something to find.
    _, cheap = idx.search(q, 10, params="nprobe=1,k_factor=1")
    assert recall10(cheap, want) < 0.9

    # A higher target costs a dearer setting, and is re-measured when asked for.
    higher = idx.tune_search(0.99)
    assert higher["target"] == 0.99 and higher["recall"] >= 0.99
    assert (higher["params"]["nprobe"] * higher["params"]["k_factor"]
            > tuned["params"]["nprobe"] * tuned["params"]["k_factor"])
    _, got = idx.search(q, 10)
    assert recall10(got, want) >= 0.98


def test_graph_tuned_efsearch_reaches_target_recall(tmp_path):
    d = 64
    idx, x, ids = hard_index(tmp_path, 20_000, d, "HNSW32")
    tuned = idx.tune_search(0.95)
    # Measured on vectors held out of the graph while it was built (its own vectors would
    # pick efSearch 10, which gives new queries 0.90), and stored with the curve.
    assert tuned["reached"] and tuned["held_out"] and tuned["params"].keys() == {"efSearch"}
    assert Index(idx.root).info["tuned"]["curve"] == tuned["curve"]
    q = hard(300, d, seed=5)
    _, want = SearchIndex("Flat", d).build(ids, x).search(q, 10)
    _, got = Index(idx.root).search(q, 10)
    assert recall10(got, want) >= 0.94  # 0.951 measured; the graph's build is multi-threaded
    # Another target is read off the stored curve: no rebuild.
    si = idx.search_index()
    assert idx.tune_search(0.99)["params"]["efSearch"] > tuned["params"]["efSearch"]
    assert idx.search_index().index is si.index
    _, cheap = idx.search(q, 10, params="efSearch=10")
    assert recall10(cheap, want) < recall10(got, want)
    # Deleting every query's nearest neighbour (the worst case for a graph walk) keeps the
    # tuned setting and nearly its recall over what is left (tombstones, no rebuild; 0.947
    # measured).
    gone = want[:, 0]
    with idx.writer():
        idx.remove(ids=[int(i) for i in np.unique(gone)])
    live = ~np.isin(ids, gone)
    _, want = SearchIndex("Flat", d).build(ids[live], x[live]).search(q, 10)
    _, got = idx.search(q, 10)
    assert len(idx.search_index().dead) == len(np.unique(gone)) and recall10(got, want) >= 0.93


def test_graph_retuned_on_held_out_vectors_after_doubling(tmp_path):
    idx, x, ids = make_index(tmp_path, "HNSW32", n=1000)
    first = idx.tune_search(0.95)
    assert first["held_out"] and first["n"] == 1000 and first["queries"] == 250
    with idx.writer():
        idx.add([Entry(f"/more/{i}.jpg", 1, 1, "h", {}) for i in range(1500)], clustered(1500, seed=11))
    idx.search(x[:1], 1)  # the graph takes the new vectors; its measurement is now for 2.5x fewer
    again = idx.info["tuned"]
    assert again["held_out"] and again["n"] == 2500 and again["queries"] == 500
    assert idx.search_index().ntotal == 2500 and not len(idx.search_index().dead)


def test_explicit_and_per_call_params_win_over_tuned(tmp_path):
    idx, x, ids = make_index(tmp_path, "IVF32,PQ8,RFlat", n=4000)
    tuned = idx.tune_search()
    assert tuned and idx.search_index().effective_params == {**tuned["params"]}
    idx.set_index_type(search_params="nprobe=32,k_factor=3")
    assert idx.search_index().effective_params == {"nprobe": 32, "k_factor": 3}
    si = idx.search_index()
    # A per-call override reaches FAISS (nprobe 1 finds fewer than nprobe 32)...
    q = clustered(200, seed=3)
    _, want = SearchIndex("Flat", 32).build(ids, x).search(q, 10)
    _, wide = si.search(q, 10)
    _, narrow = si.search(q, 10, {"nprobe": 1, "k_factor": 1})
    assert recall10(narrow, want) < recall10(wide, want)
    # ...without changing the shared index.
    _, again = si.search(q, 10)
    assert (again == wide).all()
    with pytest.raises(IndexStoreError, match="search parameter"):
        idx.search(q, 10, params="nprob=3")


def test_rerank_is_batched_exact_and_skips_ids_no_longer_live():
    d = 32
    x = clustered(3000, d)
    ids = np.arange(10, 3010, dtype=np.int64)
    si = SearchIndex("IVF16,PQ8,RFlat", d, {"nprobe": 16, "k_factor": 10}).build(ids, x)
    q = clustered(50, seed=4)
    batched = si.search(q, 10)
    single = [si.search(q[i:i + 1], 10) for i in range(len(q))]
    assert (batched[1] == np.concatenate([s[1] for s in single])).all()
    row = np.searchsorted(ids, batched[1][0])
    assert np.allclose(batched[0][0], x[row] @ q[0], atol=1e-5)  # exact scores, best first
    assert (np.diff(batched[0], axis=1) <= 1e-6).all()

    # Ids that the FAISS index still holds but the live set lacks (a deleted-id mask) are never
    # returned, wherever they sit in the shortlist, and the k slots are still filled.
    dead = np.unique(batched[1][:, [0, 3, 7]])
    keep = ~np.isin(ids, dead)
    si.ids, si.vecs = ids[keep], np.ascontiguousarray(x[keep])
    scores, found = si.search(q, 10)
    assert not np.isin(found, dead).any() and (found >= 0).all() and np.isfinite(scores).all()


def test_deletes_from_tuned_refine_index(tmp_path):
    idx, x, ids = make_index(tmp_path, "IVF32,PQ8,RFlat", n=4000)
    assert idx.tune_search()["params"]
    _, found = idx.search(x[:50], 10)
    gone = np.unique(found[:, :3])
    with idx.writer():
        idx.remove(ids=[int(i) for i in gone])
    scores, found = idx.search(x[:50], 10)
    assert not np.isin(found, gone).any() and (found >= 0).all()
    assert idx.search_index().ntotal == len(idx) == len(ids) - len(gone)


def test_hnsw_built_with_ef_construction_200():
    import faiss

    si = SearchIndex("HNSW32", 32).build(np.arange(500, dtype=np.int64), clustered(500))
    assert faiss.downcast_index(si.index.index).hnsw.efConstruction >= 200
    si = SearchIndex("IVF16_HNSW32,Flat", 32).build(np.arange(2000, dtype=np.int64), clustered(2000))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(si.index).quantizer)
    assert quantizer.hnsw.efConstruction >= 200


def test_search_pins_threads_and_restores_them():
    import faiss
    from threadpoolctl import threadpool_info

    from cbir.index import factory

    def blas():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    faiss.omp_set_num_threads(2)
    before = blas()
    seen = {}
    with factory.search_threads(1):
        seen["omp"], seen["blas"] = faiss.omp_get_max_threads(), blas()
    assert seen["omp"] == 1 and all(n == 1 for n in seen["blas"])
    assert faiss.omp_get_max_threads() == 2 and blas() == before
