"""FAISS index types for the derived search index: choice by collection size, build, update.

An index type is a FAISS factory string, stored in ``index.json`` (``factory``):

- ``Flat``: exact inner product. Best up to ~50k vectors (a few ms per query there).
- ``HNSW32``: a graph; fast and no training, but FAISS cannot delete from it, so any delete
  rebuilds it from the vectors (a warning says so).
- ``IVF<nlist>,PQ<m>``: inverted lists of product-quantized codes; with the cbir suffix
  ``,RFlat`` the shortlist (``k_factor`` x k) is re-ranked exactly with the stored vectors.
  Training runs on a sample; adds and deletes afterwards are incremental.
- ``auto`` (the default for new indexes): ``Flat`` below `FLAT_MAX` vectors, else
  ``IVF<nlist>_HNSW32,PQ<m>,RFlat`` with ``nlist`` ~ sqrt(N) (a power of two, an HNSW graph
  over the centroids to assign vectors fast) and ``m`` = d/4 (at most 64).
  The choice is re-made, and the index rebuilt, when the collection grows past a step.

Search parameters (``nprobe``, ``efSearch``, ``k_factor``, ``ondisk``) have defaults by type
and can be set per index (``search_params`` in ``index.json``, e.g. ``nprobe=32,k_factor=8``).
``ondisk=1`` (IVF types) keeps the inverted lists in the index's cache file, memory-mapped,
instead of in RAM.

The vectors in the store stay the source of truth: this module only derives a structure
from them, and `SearchIndex.sync` brings one up to date with the live ids (add the new ones,
remove the gone ones, or rebuild where FAISS cannot remove).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

AUTO = "auto"
FLAT_MAX = 50_000
REFINE_SUFFIXES = ("RFlat", "Refine")
DEFAULT_K_FACTOR = 8
# k-means for the coarse lists and the PQ codebooks: 10 iterations on ~40 points per list
# (FAISS's defaults are 25 and up to 256): a build several times faster, recall the same
# after exact re-ranking.
TRAIN_NITER = 10
TRAIN_PER_LIST = 40


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

    @property
    def nlist(self) -> int | None:
        m = re.match(r"IVF(\d+)", self.base)
        return int(m.group(1)) if m else None

    @property
    def is_hnsw(self) -> bool:
        return self.base.startswith("HNSW")

    @property
    def can_remove(self) -> bool:
        """FAISS implements ``remove_ids`` for flat, PQ and IVF indexes, not for HNSW graphs."""
        return not self.is_hnsw


def pq_m(d: int) -> int:
    """Sub-quantizers for PQ: d/4 (4 dims each, 1 byte), at most 64, and dividing d.

    Measured on 1M clustered 256-d vectors (benchmarks/search_speed.py): PQ64 with an 8x
    re-ranked shortlist reaches recall@10 0.98 where PQ32 needs a 32x shortlist for 0.99."""
    target = max(1, min(64, d // 4))
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1


def auto_factory(n: int, d: int) -> str:
    """The index type `auto` resolves to for ``n`` vectors of dimension ``d``."""
    if n < FLAT_MAX:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    nlist = int(min(max(nlist, 256), 65536))
    return f"IVF{nlist}_HNSW32,PQ{pq_m(d)},RFlat"


def resolve(factory: str, n: int, d: int) -> IndexType:
    return IndexType.parse(auto_factory(n, d) if factory == AUTO else factory)


def validate(factory: str, d: int) -> str:
    """Check ``factory`` builds for dimension ``d``; returns it (``auto`` passes)."""
    if factory == AUTO:
        return factory
    import faiss

    t = IndexType.parse(factory)
    try:
        faiss.index_factory(d, t.base, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise IndexTypeError(
            f"FAISS cannot build index type {factory!r} for dimension {d} ({msg}); "
            f"try Flat, HNSW32, IVF1024,PQ{pq_m(d)},RFlat or auto"
        ) from None
    return str(t)


_PARAM = re.compile(r"^(nprobe|efSearch|k_factor|ondisk)=(\d+)$")


def parse_params(text: str | None) -> dict[str, int]:
    """``"nprobe=32,k_factor=8"`` -> dict; unknown names are refused with the list of known ones."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = _PARAM.match(item)
        if not m:
            raise IndexTypeError(f"search parameter {item!r}: use name=integer with name one of nprobe, efSearch, "
                                 f"k_factor, ondisk")
        out[m.group(1)] = int(m.group(2))
    return out


def default_params(t: IndexType, n: int) -> dict[str, int]:
    p: dict[str, int] = {}
    if t.nlist:
        p["nprobe"] = max(4, min(t.nlist, t.nlist // 256))
    if t.is_hnsw:
        p["efSearch"] = 64
    if t.refine:
        p["k_factor"] = DEFAULT_K_FACTOR
    return p


def _new_index(t: IndexType, d: int):
    """IVF indexes store ids themselves (and renumber nothing on delete); the others get an
    id map (FAISS's IndexIDMap assumes, rightly for them, that a delete shifts later rows)."""
    import faiss

    index = faiss.index_factory(d, t.base, faiss.METRIC_INNER_PRODUCT)
    return index if t.nlist else faiss.IndexIDMap2(index)


def _stored_ids(index) -> np.ndarray:
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = []
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _set_training(index, t: IndexType) -> None:
    import faiss

    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
    if t.nlist:
        base = faiss.downcast_index(faiss.extract_index_ivf(base))
        base.cp.niter = TRAIN_NITER
    if hasattr(base, "do_polysemous_training"):
        base.do_polysemous_training = False  # for Hamming-filtered search, which cbir does not use; slow
    pq = getattr(base, "pq", None)
    if pq is not None:
        pq.cp.niter = TRAIN_NITER


def _train_sample(vecs: np.ndarray, t: IndexType) -> np.ndarray:
    n = len(vecs)
    want = max(TRAIN_PER_LIST * (t.nlist or 0), 1 << 15)
    if n <= want:
        return vecs
    rows = np.sort(np.random.default_rng(1234).choice(n, want, replace=False))
    return vecs[rows]


@dataclass
class SearchIndex:
    """A FAISS index over (id, vector) pairs, plus the exact vectors where it re-ranks."""

    factory: str  # as configured: a factory string or "auto"
    dim: int
    params: dict[str, int] = field(default_factory=dict)  # overrides of the defaults
    index: object = None  # faiss.IndexIDMap2
    type: IndexType | None = None
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted
    vecs: np.ndarray | None = None  # rows of ``ids`` (only kept when re-ranking)
    build_seconds: float = 0.0
    trained_now: bool = False
    mmapped: bool = False  # inverted lists read-only from the cache file (``ondisk=1``)

    # -- building ----------------------------------------------------------------
    def build(self, ids: np.ndarray, vecs: np.ndarray) -> "SearchIndex":
        """Build from scratch (training on a sample where the type needs it)."""
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
                _set_training(index, t)
                index.train(_train_sample(vecs, t))
                self.trained_now = True
        if n:
            index.add_with_ids(vecs, ids)
        self.index, self.type = index, t
        order = np.argsort(ids, kind="stable")
        self.ids = np.ascontiguousarray(ids[order], np.int64)
        self.vecs = np.ascontiguousarray(vecs[order]) if t.refine else None
        self._apply_params()
        self.build_seconds = time.perf_counter() - t0
        return self

    def wanted_type(self, n: int) -> IndexType:
        return resolve(self.factory, n, self.dim)

    def sync(self, ids: np.ndarray, vecs: np.ndarray) -> tuple["SearchIndex", bool]:
        """The index brought up to date with the live ``(ids, vecs)``: (index, changed).

        Never modifies ``self`` (other threads may be searching it): a change gives a new
        object. New ids are added and gone ones removed on a copy; a rebuild happens where the
        type should change (``auto`` crossed a size step), where FAISS cannot remove (HNSW,
        with a warning), or where the index was never built.
        """
        import copy

        import faiss

        fresh = SearchIndex(self.factory, self.dim, dict(self.params))
        if self.index is None or self.type != self.wanted_type(len(ids)) and self._may_retype(len(ids)):
            return fresh.build(ids, vecs), True
        new_mask = ~np.isin(ids, self.ids, assume_unique=True)
        gone = np.setdiff1d(self.ids, ids, assume_unique=True)
        if not new_mask.any() and not len(gone):
            if self.type.refine and (self.vecs is None or len(self.vecs) != len(self.ids)):
                out = copy.copy(self)
                out.vecs = np.ascontiguousarray(vecs[np.argsort(ids, kind="stable")])
                return out, False
            return self, False
        if len(gone) and not self.type.can_remove:
            warnings.warn(IndexTypeWarning(
                f"FAISS cannot delete from a {self.type} index: rebuilding it from {len(ids)} vectors "
                f"after {len(gone)} deletion(s) (use an IVF type for collections with frequent deletes)"),
                stacklevel=3)
            return fresh.build(ids, vecs), True
        t0 = time.perf_counter()
        out = copy.copy(self)
        out.index, out.mmapped, out.trained_now = faiss.clone_index(self.index), False, False
        if len(gone):
            out.index.remove_ids(np.ascontiguousarray(gone, np.int64))
        if new_mask.any():
            out.index.add_with_ids(np.ascontiguousarray(vecs[new_mask]), np.ascontiguousarray(ids[new_mask]))
        order = np.argsort(ids, kind="stable")
        out.ids = np.ascontiguousarray(ids[order], np.int64)
        out.vecs = np.ascontiguousarray(vecs[order]) if out.type.refine else None
        out._apply_params()
        out.build_seconds = time.perf_counter() - t0
        return out, True

    def _may_retype(self, n: int) -> bool:
        # A forced fallback to Flat (too few vectors to train) is left as soon as there are enough;
        # an explicit type never changes otherwise; auto follows the size steps.
        return self.factory == AUTO or self.type == IndexType("Flat", False)

    # -- parameters --------------------------------------------------------------
    @property
    def effective_params(self) -> dict[str, int]:
        p = default_params(self.type, len(self.ids)) if self.type else {}
        p.update({k: v for k, v in self.params.items() if k != "ondisk"})
        return p

    def _apply_params(self) -> None:
        import faiss

        p = self.effective_params
        base = faiss.downcast_index(self.index.index if isinstance(self.index, faiss.IndexIDMap2) else self.index)
        if "nprobe" in p and self.type.nlist:
            faiss.extract_index_ivf(base).nprobe = int(p["nprobe"])
        if "efSearch" in p and self.type.is_hnsw:
            hnsw = base if hasattr(base, "hnsw") else None
            if hnsw is not None:
                hnsw.hnsw.efSearch = int(p["efSearch"])

    # -- search ------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) if self.index is not None else 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product (re-ranked exactly where the type says ``RFlat``)."""
        if not self.type.refine or self.vecs is None:
            return self.index.search(queries, k)
        kf = max(1, int(self.effective_params.get("k_factor", DEFAULT_K_FACTOR)))
        _, cand = self.index.search(queries, min(self.ntotal, k * kf))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        out = np.full((len(queries), k), -1, np.int64)
        for qi, row in enumerate(cand):
            row = row[row >= 0]
            if not len(row):
                continue
            pos = np.searchsorted(self.ids, row)
            exact = self.vecs[pos] @ queries[qi]
            top = np.argsort(-exact, kind="stable")[:k]
            scores[qi, : len(top)] = exact[top]
            out[qi, : len(top)] = row[top]
        return scores, out

    # -- persistence -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_file(cls, path, factory: str, dim: int, params: dict[str, int], ids: np.ndarray,
                  vecs: np.ndarray, resolved: str, mmap: bool = False) -> "SearchIndex":
        """Load a cached index; ``ids``/``vecs`` are the live ones (for re-ranking after sync)."""
        import faiss

        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        si = cls(factory, dim, params, index, IndexType.parse(resolved), mmapped=mmap)
        si.ids = np.sort(_stored_ids(index))
        si._apply_params()
        return si
