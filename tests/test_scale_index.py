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
    assert auto_factory(1_000_000, 256) == "IVF1024_HNSW32,PQ64,RFlat"
    assert auto_factory(100_000, 1280) == "IVF256_HNSW32,PQ64,RFlat"
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
    if factory.startswith("HNSW"):
        assert msgs and "cannot delete" in msgs[0] and "rebuilding" in msgs[0]
    else:
        assert not msgs

    with idx.writer():
        new = idx.add([Entry(f"/new/{i}.jpg", 1, 1, "h", {}) for i in range(5)], x[:5])
    _, found = idx.search(x[:5], 1)
    assert found[:, 0].tolist() == new
    assert idx.search_index().ntotal == len(idx)


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
    monkeypatch.setattr(Index, "CACHE_MIN_SECONDS", 0.0)
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
