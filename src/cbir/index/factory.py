"""FAISS index types for the derived search index: choice by collection size, build, update, tuning.

An index type is a FAISS factory string, stored in ``index.json`` (``factory``): ``Flat``;
``HNSW32`` (FAISS cannot delete from a graph: deleted vectors stay as tombstones that
searches skip, up to `TOMBSTONE_MAX`); ``IVF<nlist>,PQ<m>``, with the cbir suffix ``,RFlat``
for an exact re-ranking of a ``k_factor`` x k shortlist; or ``auto`` (`auto_factory`, re-chosen
as the collection grows). Search parameters (``nprobe``, ``efSearch``, ``k_factor``, ``ondisk``:
IVF lists memory-mapped from the cache file) are measured when an index is built (`tune`,
stored as ``tuned``), can be fixed per index (``search_params``, which win) and overridden per
call. docs/scaling.md explains the choices and their measurements.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import faiss
import numpy as np

AUTO = "auto"
FLAT_MAX = 50_000
# From this size on `auto` builds an HNSW graph instead of IVF + PQ: on data with real
# descriptors' statistics it is the faster of the two for the same recall (docs/scaling.md).
GRAPH_MIN = 200_000
REFINE_SUFFIXES = ("RFlat", "Refine")
DEFAULT_K_FACTOR = 8
# k-means for the coarse lists and the PQ codebooks: 10 iterations on ~40 points per list
# (FAISS's defaults are 25 and up to 256): a build several times faster, recall the same
# after exact re-ranking.
TRAIN_NITER = 10
TRAIN_PER_LIST = 40
# HNSW graphs (the HNSW32 type, and the graph over IVF centroids) are built with this
# efConstruction: FAISS's default 40 left HNSW32 below recall 0.98 at any efSearch on the
# benchmark data; 200 is what hnswlib users run.
EF_CONSTRUCTION = 200
# Tombstones (deleted vectors an HNSW graph still holds, skipped by searches) allowed, as a
# fraction of the live vectors, before the graph is rebuilt without them: each one still costs
# a visit during the walk, and the graph's routes through them age.
TOMBSTONE_MAX = 0.1
# Threads per search call (OpenMP and BLAS; see `search_threads`): one query per thread is what
# a server wants, and an unpinned pool makes latency depend on whatever else the machine runs.
SEARCH_THREADS = 1
# The recall@10 `tune` aims at unless the index stores another (``cbir index --recall``).
DEFAULT_RECALL = 0.95


class IndexTypeError(ValueError):
    """A factory string or search parameter that cannot be used; the message says why."""


class IndexTypeWarning(UserWarning):
    """Something about the index type the user should know (e.g. a rebuild FAISS forces)."""


@dataclass(frozen=True)
class IndexType:
    """A parsed factory string: what FAISS builds, and whether cbir re-ranks exactly."""

    base: str  # the FAISS factory string, without the refine suffix
    refine: bool

    @classmethod
    def parse(cls, text: str) -> "IndexType":
        parts = [p.strip() for p in text.split(",") if p.strip()]
        refine = bool(parts) and parts[-1] in REFINE_SUFFIXES
        if refine:
            parts = parts[:-1]
        if not parts:
            raise IndexTypeError(f"index type {text!r} is empty")
        return cls(",".join(parts), refine)

    def __str__(self) -> str:
        return self.base + (",RFlat" if self.refine else "")

    @functools.cached_property  # read on every search: parse once
    def nlist(self) -> int | None:
        m = re.match(r"IVF(\d+)", self.base)
        return int(m.group(1)) if m else None

    @functools.cached_property
    def is_hnsw(self) -> bool:
        return self.base.startswith("HNSW")

    @property
    def can_remove(self) -> bool:
        """FAISS implements ``remove_ids`` for flat, PQ and IVF indexes, not for HNSW graphs
        (those keep tombstones instead, see `SearchIndex.sync`)."""
        return not self.is_hnsw


def pq_m(d: int) -> int:
    """Sub-quantizers for PQ: d/4 (4 dims each, 1 byte), at most 64, and dividing d.

    Measured on 1M clustered 256-d vectors (benchmarks/search_speed.py): PQ64 with an 8x
    re-ranked shortlist reaches recall@10 0.98 where PQ32 needs a 32x shortlist for 0.99."""
    return next(m for m in range(max(1, min(64, d // 4)), 0, -1) if d % m == 0)


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~sqrt(N), a power of two, in [256, 65536]."""
    return int(min(max(2 ** round(math.log2(math.sqrt(max(n, 1)))), 256), 65536))


def auto_factory(n: int, d: int) -> str:
    """The index type `auto` resolves to for ``n`` vectors of dimension ``d`` (between the steps,
    IVF with an HNSW graph over its centroids, to assign vectors fast)."""
    if n < FLAT_MAX:
        return "Flat"
    if n >= GRAPH_MIN:
        return "HNSW32"
    return f"IVF{ivf_nlist(n)}_HNSW32,PQ{pq_m(d)},RFlat"


def resolve(factory: str, n: int, d: int) -> IndexType:
    return IndexType.parse(auto_factory(n, d) if factory == AUTO else factory)


def validate(factory: str, d: int) -> str:
    """Check ``factory`` builds for dimension ``d``; returns it (``auto`` passes)."""
    if factory == AUTO:
        return factory
    t = IndexType.parse(factory)
    try:
        faiss.index_factory(d, t.base, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise IndexTypeError(f"FAISS cannot build index type {factory!r} for dimension {d} ({msg}); "
                             f"try Flat, HNSW32, IVF1024,PQ{pq_m(d)},RFlat or auto") from None
    return str(t)


_PARAM = re.compile(r"^(nprobe|efSearch|k_factor|ondisk)=(\d+)$")


def parse_params(text: str | None) -> dict[str, int]:
    """``"nprobe=32,k_factor=8"`` -> dict; unknown names are refused with the list of known ones."""
    out: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in (text or "").split(","))):
        m = _PARAM.match(item)
        if not m:
            raise IndexTypeError(f"search parameter {item!r}: use name=integer with name one of nprobe, efSearch, "
                                 f"k_factor, ondisk")
        out[m.group(1)] = int(m.group(2))
    return out


def default_params(t: IndexType) -> dict[str, int]:
    p: dict[str, int] = {}
    if t.nlist:
        p["nprobe"] = max(4, min(t.nlist, t.nlist // 256))
    if t.is_hnsw:
        p["efSearch"] = 64
    if t.refine:
        p["k_factor"] = DEFAULT_K_FACTOR
    return p


def _parts(index):
    """(base, ivf, graph quantizer) of ``index``: the FAISS index inside its id map, its IVF
    part and that part's HNSW quantizer, downcast; None where it has no such part."""
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(base))
    except RuntimeError:
        return base, None, None
    quantizer = faiss.downcast_index(ivf.quantizer)
    return base, ivf, quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _new_index(t: IndexType, d: int):
    """An empty index of type ``t`` with cbir's build settings (`EF_CONSTRUCTION` for every HNSW
    graph, `TRAIN_NITER`). IVF indexes store ids themselves (and renumber nothing on delete);
    the others get an id map (FAISS's IndexIDMap assumes, rightly for them, that a delete
    shifts later rows)."""
    index = faiss.index_factory(d, t.base, faiss.METRIC_INNER_PRODUCT)
    index = index if t.nlist else faiss.IndexIDMap2(index)
    base, ivf, quantizer = _parts(index)
    for graph in (base, quantizer):
        if hasattr(graph, "hnsw"):
            graph.hnsw.efConstruction = max(graph.hnsw.efConstruction, EF_CONSTRUCTION)
    if t.nlist:
        base = ivf
        base.cp.niter = TRAIN_NITER
    if hasattr(base, "do_polysemous_training"):
        base.do_polysemous_training = False  # for Hamming-filtered search, which cbir does not use; slow
    pq = getattr(base, "pq", None)
    if pq is not None:
        pq.cp.niter = TRAIN_NITER
    return index


def _stored_ids(index) -> np.ndarray:
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
             for lst in range(invlists.nlist) if invlists.list_size(lst)]
    return np.concatenate([np.empty(0, np.int64), *parts]).astype(np.int64)


def _train_sample(vecs: np.ndarray, t: IndexType) -> np.ndarray:
    want = max(TRAIN_PER_LIST * (t.nlist or 0), 1 << 15)
    if len(vecs) <= want:
        return vecs
    return vecs[np.sort(np.random.default_rng(1234).choice(len(vecs), want, replace=False))]


@dataclass
class SearchIndex:
    """A FAISS index over (id, vector) pairs, plus the exact vectors where it re-ranks."""

    factory: str  # as configured: a factory string or "auto"
    dim: int
    params: dict[str, int] = field(default_factory=dict)  # overrides of the defaults
    index: object = None  # faiss.IndexIDMap2
    type: IndexType | None = None
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted, live
    # Deleted ids the FAISS index still holds (graphs cannot remove), sorted; searches skip them.
    dead: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    vecs: np.ndarray | None = None  # rows of ``ids`` (only kept when re-ranking)
    build_seconds: float = 0.0
    trained_now: bool = False
    mmapped: bool = False  # inverted lists read-only from the cache file (``ondisk=1``)
    # What `tune` measured for this index ({"type", "params", "recall", "target", "n", ...});
    # its params apply while ``type`` is the index's type (a retyped index has new defaults).
    tuning: dict | None = None
    _skip: object = field(default=None, repr=False, compare=False)  # see `_tombstone_filter`

    # -- building ----------------------------------------------------------------
    def build(self, ids: np.ndarray, vecs: np.ndarray, tune_target: float | None = None) -> "SearchIndex":
        """Build from scratch (training on a sample where the type needs it).

        With ``tune_target``, a graph is tuned while it is built: a sample of the vectors is
        added last, and measured as queries just before (see `graph_curve`)."""
        t0 = time.perf_counter()
        n = len(ids)
        t = resolve(self.factory, n, self.dim)
        index = _new_index(t, self.dim)
        if not index.is_trained:
            need = max(t.nlist or 1, 256 if "PQ" in t.base else 1)
            if n < need:
                if n:  # an empty index is no news
                    warnings.warn(IndexTypeWarning(
                        f"index type {t} needs at least {need} vectors to train, the index has {n}: "
                        f"searching exactly (Flat) until it has enough"), stacklevel=3)
                t = IndexType("Flat", False)
                index = _new_index(t, self.dim)
            else:
                index.train(_train_sample(vecs, t))
                self.trained_now = True
        self.index, self.type = index, t
        held = _holdout_rows(t, n) if tune_target is not None else None
        if held is None:
            if n:
                index.add_with_ids(vecs, ids)
        else:
            rest_vecs, rest_ids = np.delete(vecs, held, axis=0), np.delete(ids, held)
            index.add_with_ids(rest_vecs, rest_ids)
            q = np.ascontiguousarray(vecs[held])
            _, nn = faiss.knn(q, rest_vecs, TUNE_K, metric=faiss.METRIC_INNER_PRODUCT)
            curve = graph_curve(self, q, rest_ids[nn])
            index.add_with_ids(q, ids[held])
            # The curve is the measurement; `tune` reads the target's setting off it.
            self.tuning = {"type": str(t), "n": int(n), "queries": len(held), "curve": curve}
            self.tuning = tune(self, tune_target, ids, vecs)
        return self._set_live(ids, vecs, t0)

    def _set_live(self, ids: np.ndarray, vecs: np.ndarray, t0: float) -> "SearchIndex":
        """Keep the live ids sorted (and their vectors, to re-rank), apply the search parameters."""
        order = np.argsort(ids, kind="stable")
        self.ids = np.ascontiguousarray(ids[order], np.int64)
        self.vecs = np.ascontiguousarray(vecs[order]) if self.type.refine else None
        self._apply_params()
        self.build_seconds = time.perf_counter() - t0
        return self

    def sync(self, ids: np.ndarray, vecs: np.ndarray, tune_target: float | None = None
             ) -> tuple["SearchIndex", bool]:
        """The index brought up to date with the live ``(ids, vecs)``: (index, changed).

        Never modifies ``self`` (other threads may be searching it): new ids are added and gone
        ones removed on a copy (an HNSW graph keeps them as tombstones, `dead`). It is rebuilt
        (a graph tuned to ``tune_target`` on the way) where the type should change, where the
        tombstones pass `TOMBSTONE_MAX` (with a warning), or where it was never built."""
        fresh = SearchIndex(self.factory, self.dim, dict(self.params), tuning=self.tuning)
        # A forced fallback to Flat (too few vectors to train) is left as soon as there are enough;
        # an explicit type never changes otherwise; auto follows the size steps.
        may_retype = self.factory == AUTO or self.type == IndexType("Flat", False)
        if self.index is None or may_retype and self.type != resolve(self.factory, len(ids), self.dim):
            return fresh.build(ids, vecs, tune_target), True
        new_mask = ~np.isin(ids, self.ids, assume_unique=True)
        gone = np.setdiff1d(self.ids, ids, assume_unique=True)
        if not new_mask.any() and not len(gone):
            if self.type.refine and (self.vecs is None or len(self.vecs) != len(self.ids)):
                out = copy.copy(self)
                out.vecs = np.ascontiguousarray(vecs[np.argsort(ids, kind="stable")])
                return out, False
            return self, False
        tombs = len(gone) and not self.type.can_remove
        dead = np.union1d(self.dead, gone) if tombs else self.dead
        back = np.isin(ids[new_mask], dead).any()  # a deleted id back: its stale vector is in the graph
        if back or tombs and len(dead) > TOMBSTONE_MAX * max(len(ids), 1):
            if tombs:
                warnings.warn(IndexTypeWarning(
                    f"{len(dead)} deleted vectors in the {self.type} graph (FAISS cannot delete from it): "
                    f"rebuilding it from the {len(ids)} live ones"), stacklevel=3)
            return fresh.build(ids, vecs, tune_target), True
        t0 = time.perf_counter()
        out = copy.copy(self)
        out.index, out.mmapped, out.trained_now = faiss.clone_index(self.index), False, False
        out.dead, out._skip = dead, None
        if len(gone) and self.type.can_remove:
            out.index.remove_ids(np.ascontiguousarray(gone, np.int64))
        if new_mask.any():
            out.index.add_with_ids(np.ascontiguousarray(vecs[new_mask]), np.ascontiguousarray(ids[new_mask]))
        return out._set_live(ids, vecs, t0), True

    # -- parameters --------------------------------------------------------------
    @property
    def effective_params(self) -> dict[str, int]:
        """Defaults by type, then the tuned setting (if tuned for this type), then the
        index's explicit ``search_params``."""
        p = default_params(self.type) if self.type else {}
        if self.tuning and self.type is not None and self.tuning.get("type") == str(self.type):
            p.update(self.tuning.get("params", {}))
        p.update({k: v for k, v in self.params.items() if k != "ondisk"})
        return p

    def _apply_params(self) -> None:
        p = self.effective_params
        base, ivf, quantizer = _parts(self.index)
        if "nprobe" in p and self.type.nlist:
            ivf.nprobe = int(p["nprobe"])
            if quantizer is not None:  # must explore at least nprobe centroids
                quantizer.hnsw.efSearch = max(16, int(p["nprobe"]))
        if "efSearch" in p and self.type.is_hnsw and hasattr(base, "hnsw"):
            base.hnsw.efSearch = int(p["efSearch"])

    # -- search ------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors (tombstones not counted)."""
        return int(self.index.ntotal) - len(self.dead) if self.index is not None else 0

    def search(self, queries: np.ndarray, k: int, params: dict[str, int] | None = None,
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product of ``queries`` (Q, d): (scores (Q, k), ids (Q, k)), -1 where
        fewer were found. ``params`` override the search parameters for this call only (the
        shared FAISS object is not touched, so concurrent calls are safe). ``RFlat`` types
        re-rank a shortlist of ``k_factor`` x k exactly. ``threads``: default `SEARCH_THREADS`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        p = self.effective_params if not params else {**self.effective_params, **params}
        # FAISS's exhaustive and coarse-quantizer searches call BLAS only from
        # ``distance_compute_blas_threshold`` queries (20) on.
        blas = len(queries) >= faiss.cvar.distance_compute_blas_threshold
        with search_threads(SEARCH_THREADS if threads is None else threads, blas=blas):
            if not self.type.refine or self.vecs is None:
                return self.index.search(queries, k, params=self._faiss_params(params, p))
            kf = max(1, int(p.get("k_factor", DEFAULT_K_FACTOR)))
            _, cand = self.index.search(queries, min(self.ntotal, k * kf), params=self._faiss_params(params, p))
            return _rerank_exact(queries, cand, self.ids, self.vecs, k)

    def _faiss_params(self, override: dict[str, int] | None, p: dict[str, int]):
        """A FAISS SearchParameters object when ``override`` changes nprobe/efSearch or there are
        tombstones to skip, else None (the values set on the index by `_apply_params` are used)."""
        if len(self.dead):  # (the selector lives as long as ``self``)
            ef = int(p.get("efSearch", 16))
            return faiss.SearchParametersHNSW(efSearch=ef, sel=self._tombstone_filter())
        if not override or not ({"nprobe", "efSearch"} & override.keys()):
            return None
        if self.type.nlist and "nprobe" in p:
            if "_HNSW" not in self.type.base:
                return faiss.SearchParametersIVF(nprobe=int(p["nprobe"]))
            # an HNSW quantizer must explore at least nprobe centroids
            graph = faiss.SearchParametersHNSW(efSearch=max(int(p["nprobe"]), 16))
            sp = faiss.SearchParametersIVF(nprobe=int(p["nprobe"]), quantizer_params=graph)
            sp.keep = graph  # SWIG does not keep the Python object alive through the pointer
            return sp
        if self.type.is_hnsw and "efSearch" in p:
            return faiss.SearchParametersHNSW(efSearch=int(p["efSearch"]))
        return None

    def _tombstone_filter(self):
        """A FAISS id selector passing every id but the tombstones (built once per object: the
        object never changes after `sync`, so concurrent searches can share it)."""
        if self._skip is None:
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(self.dead, np.int64))
            skip = faiss.IDSelectorNot(batch)
            skip.keep = batch  # SWIG does not keep the inner selector alive through the pointer
            self._skip = skip
        return self._skip

    # -- tuning ------------------------------------------------------------------
    def tune(self, target: float, ids: np.ndarray, vecs: np.ndarray) -> dict:
        """Measure and store the cheapest search setting reaching recall@10 ``target`` on the
        live ``ids``/``vecs`` (see `tune`); returns the record kept in ``self.tuning``.

        A graph without a current held-out measurement (`graph_curve`) is rebuilt to take one:
        its own vectors are no test of it."""
        if _current_curve(self) is None and _holdout_rows(self.type, len(vecs)) is not None:
            fresh = SearchIndex(str(self.type), self.dim, dict(self.params)).build(ids, vecs, target)
            self.index, self.ids, self.dead, self._skip = fresh.index, fresh.ids, fresh.dead, None
            self.tuning = fresh.tuning
        else:
            self.tuning = tune(self, target, ids, vecs)
        self._apply_params()
        return self.tuning

    # -- persistence -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_file(cls, path, factory: str, dim: int, params: dict[str, int], resolved: str, mmap: bool = False,
                  tuning: dict | None = None) -> "SearchIndex":
        """Load a cached index of type ``resolved``; `sync` then brings it up to date (and sets
        the re-ranking vectors)."""
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        si = cls(factory, dim, params, index, IndexType.parse(resolved), mmapped=mmap, tuning=tuning)
        si.ids = np.sort(_stored_ids(index))
        si._apply_params()
        return si


# -- the search path ---------------------------------------------------------------
def _rerank_exact(queries: np.ndarray, cand: np.ndarray, ids: np.ndarray, vecs: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query's shortlist, in FAISS (one call for all queries).

    queries (Q, d); cand (Q, S) image ids from the coarse search, -1 padded at the end;
    ids (N,) sorted image ids and vecs (N, d) their vectors. Returns (scores (Q, k), ids (Q, k)).
    A candidate that is not in ``ids`` (a deleted id a FAISS index still holds) is dropped:
    FAISS's routine stops at the first -1, so such holes are moved to the end first.
    """
    nq, s = cand.shape
    rows = np.searchsorted(ids, cand)
    np.minimum(rows, len(ids) - 1, out=rows)
    live = (cand >= 0) & (ids[rows] == cand)
    rows = np.where(live, rows, -1)
    if not live[:, :1].all() or (live[:, 1:] & ~live[:, :-1]).any():  # a hole before a live one
        rows = np.take_along_axis(rows, np.argsort(~live, axis=1, kind="stable"), axis=1)
    rows = np.ascontiguousarray(rows, np.int64)
    scores = np.empty((nq, k), np.float32)
    found = np.empty((nq, k), np.int64)
    # (x, y, ids, d, nx, ny = rows of y, nsubset = shortlist length, k, vals, ids, ld_ids);
    # ld_ids given explicitly: FAISS's default for it (-1) is ny, not the shortlist length.
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), faiss.swig_ptr(vecs), faiss.swig_ptr(rows), vecs.shape[1], nq,
        len(vecs), s, k, faiss.swig_ptr(scores), faiss.swig_ptr(found), s)
    ok = found >= 0
    out = np.where(ok, ids[np.where(ok, found, 0)], -1)
    scores[~ok] = -np.inf
    return scores, out


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list[tuple[object, int]] = []


@functools.cache
def _blas_controllers() -> list:
    """threadpoolctl's handles on the BLAS libraries loaded at the first call (numpy's, FAISS's)."""
    from threadpoolctl import ThreadpoolController

    return [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]


@contextmanager
def _blas_threads(n: int):
    """``n`` BLAS threads for the body. The counts are process-wide: the first concurrent caller
    sets them and the last restores them, so searches side by side never see each other's."""
    global _blas_users
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved.clear()
            for lib in _blas_controllers():
                old = lib.get_num_threads()
                if old != n:
                    lib.set_num_threads(n)
                    _blas_saved.append((lib, old))
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, old in _blas_saved:
                    lib.set_num_threads(old)
                _blas_saved.clear()


@contextmanager
def search_threads(n: int, blas: bool = True):
    """Run the body on ``n`` OpenMP threads (FAISS's; per calling thread) and, with ``blas``,
    ``n`` BLAS threads (`_blas_threads`). Setting OpenBLAS's count costs ~0.1 ms (it resizes
    its pool), so single queries, which FAISS answers without BLAS, leave it alone (``blas``
    False); OpenMP's costs nothing."""
    n = max(1, int(n))
    omp_before = faiss.omp_get_max_threads()
    if omp_before != n:  # on the search path they are usually equal: nothing to set or restore
        faiss.omp_set_num_threads(n)
    try:
        with _blas_threads(n) if blas else nullcontext():
            yield
    finally:
        if omp_before != n:
            faiss.omp_set_num_threads(omp_before)


# -- tuning ------------------------------------------------------------------------
TUNE_QUERIES = 500
TUNE_K = 10  # recall@10 is what the targets mean
TUNE_TIMED = 100  # queries timed, one at a time, per candidate setting
# A setting qualifies when the lower one-sided 95 % confidence bound of its mean recall (mean -
# CONFIDENCE x standard error) reaches the target: the sample is finite, new queries should too.
CONFIDENCE = 1.64
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
K_FACTOR_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# As fine as benchmarks/search_speed.py sweeps its peers: a coarse step costs latency for nothing.
EF_GRID = (10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


def held_out_truth(ids: np.ndarray, vecs: np.ndarray, nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample of the index's own vectors as queries, and their exact top-``k`` *others*.

    Returns (rows (nq,) into ``vecs``, truth (nq, k) ids). Each query is left out of its own
    ground truth (and `recall_at` drops it from the answers), so the sample measures what a
    new query from the same collection would get."""
    rows = np.sort(np.random.default_rng(0).choice(len(ids), min(nq, len(ids)), replace=False))
    _, nn = faiss.knn(np.ascontiguousarray(vecs[rows]), vecs, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    others = np.argsort(nn == rows[:, None], axis=1, kind="stable")[:, :k]  # the query's own row last
    return rows, ids[np.take_along_axis(nn, others, axis=1)]


def recall_at(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None = None) -> np.ndarray:
    """Per-query recall: |first k of ``found`` (without the query's own id) ∩ truth| / k.

    found (Q, >= k) ids, truth (Q, k) ids, self_ids (Q,) the queries' own ids or None."""
    k = truth.shape[1]
    keep = found >= 0
    if self_ids is not None:
        keep &= found != self_ids[:, None]
    keep &= np.cumsum(keep, axis=1) <= k
    hit = (found[:, :, None] == truth[:, None, :]).any(axis=2) & keep
    return hit.sum(axis=1) / k


def _candidates(si: "SearchIndex") -> tuple[str | None, list[list[dict[str, int]]]]:
    """Search settings to try, as (inner key, chains): along a chain cost and recall both grow,
    so each chain stops at its first setting that reaches the target; chains go from cheap
    to dear in their outer parameter, so a later chain is only worth trying with a smaller
    inner value than the last qualifying one."""
    t, n = si.type, max(si.ntotal, 1)
    kfs = [v for v in K_FACTOR_GRID if v * 10 <= max(n, 10)]
    if t.nlist:
        nprobes = [v for v in NPROBE_GRID if v <= t.nlist]
        if not t.refine:
            return None, [[{"nprobe": v} for v in nprobes]]
        return "k_factor", [[{"nprobe": v, "k_factor": kf} for kf in kfs] for v in nprobes]
    if t.is_hnsw:
        if not t.refine:
            return None, [[{"efSearch": ef} for ef in EF_GRID]]
        return "efSearch", [[{"efSearch": ef, "k_factor": kf} for ef in EF_GRID if ef >= 10 * kf] for kf in kfs]
    return None, []


def _holdout_rows(t: IndexType | None, n: int) -> np.ndarray | None:
    """Rows of an ``n``-vector build to hold out of a graph and tune it on (None: not a plain
    graph, or too small to spare them)."""
    nq = min(TUNE_QUERIES, n // 4)
    if t is None or not t.is_hnsw or t.refine or nq < 20:
        return None
    return np.sort(np.random.default_rng(0).choice(n, nq, replace=False))


def describes(rec: dict, si: "SearchIndex") -> bool:
    """Whether the tuning record ``rec`` still describes ``si``: same type, and a collection at
    most 2x smaller or larger (the best setting moves with N)."""
    n = max(1, int(rec.get("n", 0)))
    return si.type is not None and rec.get("type") == str(si.type) and 0.5 <= si.ntotal / n <= 2


def _current_curve(si: "SearchIndex") -> list | None:
    """The graph's held-out measurement, while it still `describes` the graph."""
    rec = si.tuning or {}
    return rec["curve"] if "curve" in rec and describes(rec, si) else None


def graph_curve(si: "SearchIndex", q: np.ndarray, truth: np.ndarray) -> list[list[float]]:
    """Recall@k of a graph at each efSearch of `EF_GRID`, on queries it does not hold.

    A graph answers its own vectors far too well (the walk lands on the query's node, whose
    edges are its neighbours), so held-out index vectors, the test `tune` uses for IVF,
    would pick too small an efSearch. q (Q, d) and truth (Q, k) their exact neighbours among
    the graph's vectors. Returns [[efSearch, mean recall, lower confidence bound], ...], up to
    the first whose bound reaches 0.999."""
    curve = []
    for ef in EF_GRID:
        mean, bound = _recall(si, q, truth.shape[1], {"efSearch": ef}, truth)
        curve.append([ef, round(mean, 4), round(bound, 4)])
        if bound >= 0.999:
            break
    return curve


def _recall(si: "SearchIndex", q: np.ndarray, k: int, params: dict[str, int], truth: np.ndarray,
            self_ids: np.ndarray | None = None) -> tuple[float, float]:
    """Mean recall (`recall_at`) of ``si``'s top-``k`` at ``params``, and its lower bound (`CONFIDENCE`)."""
    _, found = si.search(q, k, params, threads=os.cpu_count() or 1)
    per_query = recall_at(found, truth, self_ids)
    mean = float(per_query.mean())
    return mean, mean - CONFIDENCE * float(per_query.std(ddof=1)) / np.sqrt(len(per_query))


def _time_ms(si: "SearchIndex", queries: np.ndarray, params: dict[str, int]) -> float:
    """Median over 3 runs of the mean ms per top-10 query, queries one at a time (as served)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(len(queries)):
            si.search(queries[i:i + 1], TUNE_K, params)
        times.append((time.perf_counter() - t0) / len(queries) * 1000)
    return float(np.median(times))


def _measure(si: "SearchIndex", target: float, ids: np.ndarray, vecs: np.ndarray) -> dict:
    """`tune` by the chains of `_candidates`, on `TUNE_QUERIES` held-out index vectors: the fields
    of the record it measures ({} when there is nothing to choose)."""
    inner, chains = _candidates(si)
    if not chains or len(ids) <= TUNE_K + 1:
        return {}
    rows, truth = held_out_truth(ids, vecs, TUNE_QUERIES, TUNE_K)
    q, self_ids = np.ascontiguousarray(vecs[rows]), ids[rows]
    fallback: tuple[dict, float] = ({}, -1.0)
    qualified: list[tuple[dict, float]] = []
    limit = None
    for chain in chains:
        if limit is not None:
            chain = [p for p in chain if p[inner] < limit]
        hit = None
        for params in chain:
            mean, bound = _recall(si, q, TUNE_K + 1, params, truth, self_ids)
            if mean > fallback[1]:
                fallback = (params, mean)
            if bound >= target:
                hit = params
                qualified.append((params, mean))
                break
        if qualified and (hit is None or inner is None):
            break  # a dearer outer setting that does not beat the last one: none further will
        limit = hit[inner] if hit is not None and inner else limit
    scored = [(_time_ms(si, q[:TUNE_TIMED], p), p, r) for p, r in qualified or [fallback]]
    ms, params, recall = min(scored, key=lambda x: x[0])
    return {"params": dict(params), "recall": round(recall, 4), "reached": bool(qualified), "queries": len(rows),
            "ms": round(ms, 4)}


def tune(si: "SearchIndex", target: float, ids: np.ndarray, vecs: np.ndarray) -> dict:
    """The fastest search setting of ``si`` whose recall@10 reaches ``target``, measured.

    Queries are index vectors (``ids``/``vecs``, the live ones) held out of their own ground
    truth; a setting qualifies when its recall's lower bound (`CONFIDENCE`) reaches ``target``.
    Along each chain (`_candidates`) the first qualifying setting is kept; among those, the one
    with the lowest measured single-query latency wins. If none qualifies, the setting with the
    highest recall is kept and ``reached`` is False. A graph with a current held-out curve
    (`graph_curve`, taken when it was built) is read off that instead.
    Returns {"type", "params", "recall", "target", "reached", "n", "queries", "ms", "seconds"}.
    """
    t0 = time.perf_counter()
    record = {"type": str(si.type), "params": {}, "recall": 1.0, "target": float(target), "reached": True,
              "n": int(si.ntotal), "queries": 0, "ms": None}
    curve = _current_curve(si)
    if curve is None:
        record.update(_measure(si, target, ids, vecs))
    else:  # a graph, measured on vectors held out of it: pick from that
        hit = next((c for c in curve if c[2] >= target), None)
        ef, recall, _ = hit or max(curve, key=lambda c: c[1])
        ms = _time_ms(si, vecs[:TUNE_TIMED], {"efSearch": ef})
        record.update(params={"efSearch": int(ef)}, recall=recall, reached=hit is not None, n=si.tuning["n"],
                      queries=si.tuning["queries"], ms=round(ms, 4), curve=curve, held_out=True)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record
