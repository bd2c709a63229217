"""Search backends: where an index's vectors are searched.

The index directory (`cbir.index.store`) keeps the catalog and the vectors, the source of
truth; a `SearchBackend` answers the top-k over them. The store reports every committed change
to it (`add`, `remove`) and asks it to `search`: the embedded `FaissBackend`, or
`cbir.index.milvus.MilvusBackend`, which holds a copy of the vectors under the same ids.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbir.fileio import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from cbir.index.store import Index


class SearchBackend(ABC):
    """Top-k inner-product search over an index's vectors, kept in step with its catalog."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Committed rows ``ids`` (n,) with ``vectors`` (n, D) are now in the index."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Committed removal of ``ids`` (n,)."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, params: dict[str, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (Q, D) -> (scores (Q, k), ids (Q, k)); missing slots have id -1. ``k``
        includes any re-ranking shortlist; ``params`` override the search setting."""

    @abstractmethod
    def count(self) -> int:
        """Vectors the backend holds."""


class FaissBackend(SearchBackend):
    """The embedded FAISS index of the type ``index.json`` names (`cbir.index.factory`), derived
    from the vectors when first needed, tuned to the recall target, cached in ``faiss/`` (trained
    or slow-to-build ones; keyed by the type, labelled with the catalog generation). It ignores
    the change reports: it catches up from the catalog's generation at the next search, which
    covers other processes' writes too."""

    # Building a derived index faster than this is not worth a cache file.
    CACHE_MIN_SECONDS = 1.0

    def __init__(self, index: "Index") -> None:
        self.index = index
        self.cache_dir = index.root / "faiss"
        self._si = None
        self._version = None
        self._lock = threading.Lock()

    # -- the interface ------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        pass  # caught up from the catalog at the next search

    def remove(self, ids: np.ndarray) -> None:
        pass

    def search(self, queries: np.ndarray, k: int, params: dict[str, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        si = self.search_index()
        return si.search(queries, max(1, min(int(k), max(1, si.ntotal))), params)

    def count(self) -> int:
        return self.search_index().ntotal

    # -- tuning ----------------------------------------------------------------------
    def _needs_tuning(self, si) -> bool:
        """Tune when the stored measurement no longer `describes` ``si`` or is for another target."""
        from cbir.index.factory import describes

        if si.type is None or str(si.type) == "Flat" or not si.ntotal:
            return False
        rec = self.index.info.get("tuned") or {}
        return not describes(rec, si) or rec.get("target") != self.index.recall_target

    def _tune(self, si, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Measure ``si``'s search setting (`cbir.index.factory.tune`) and keep it in index.json
        (best effort: a read-only index keeps it in this process only)."""
        record = si.tune(self.index.recall_target, ids=ids, vecs=vecs)
        try:
            self.index.update_info(tuned=record)
        except OSError:
            self.index.info = {**self.index.info, "tuned": record}

    def tune(self, force: bool = False) -> dict | None:
        """Tune the search parameters now if missing or stale (or ``force``); returns the
        stored measurement (None for Flat)."""
        si = self.search_index()
        with self._lock:
            if force or self._needs_tuning(si):
                self._tune(si, *self.index.live())
        return self.index.info.get("tuned") if si.type is not None and str(si.type) != "Flat" else None

    # -- the cache -------------------------------------------------------------------
    def _cache_prefix(self) -> str:
        return hashlib.sha256(f"{self.index.factory}|{self.index.dim}".encode()).hexdigest()[:12]

    def _cached_files(self) -> list[tuple[int, str, Path]]:
        """(generation, resolved type, path) of this index type's cache files, newest first."""
        out = []
        prefix = self._cache_prefix() + "-g"
        for f in self.cache_dir.glob(prefix + "*.faiss"):
            gen, _, resolved = f.stem[len(prefix):].partition("-")
            if gen.isdigit() and resolved:
                out.append((int(gen), resolved.replace("+", ","), f))
        return sorted(out, reverse=True)

    def _from_file(self, path: Path, resolved: str, params, mmap: bool = False, tuning=None):
        from cbir.index.factory import SearchIndex

        return SearchIndex.from_file(path, self.index.factory, self.index.dim, params, resolved, mmap=mmap,
                                     tuning=tuning if tuning is not None else self.index.info.get("tuned"))

    def _load_cached(self, ids: np.ndarray, params: dict[str, int]):
        for _, resolved, path in self._cached_files():
            try:
                si = self._from_file(path, resolved, params)
            except (RuntimeError, OSError):
                continue  # unreadable (half-deleted by another reader, older FAISS): next, or rebuild
            if params.get("ondisk") and si.type.nlist and np.array_equal(si.ids, ids):
                # Up to date: serve the inverted lists from the file instead of RAM.
                si = self._from_file(path, resolved, params, mmap=True)
            return si
        return None

    def _save_cache(self, si, version: int) -> Path | None:
        name = f"{self._cache_prefix()}-g{version:010d}-{str(si.type).replace(',', '+')}.faiss"
        path = self.cache_dir / name
        try:
            self.cache_dir.mkdir(exist_ok=True)
            atomic_write_bytes(path, si.to_bytes())
            for f in self.cache_dir.iterdir():  # older generations, and other index types
                if f != path and f.suffix == ".faiss":
                    f.unlink(missing_ok=True)
        except OSError:
            return None  # a read-only index directory: the index is rebuilt by each process
        return path

    def search_index(self):
        """The derived search structure (`cbir.index.factory.SearchIndex`), built or updated now."""
        from cbir.index.factory import SearchIndex, parse_params

        version = self.index.version()
        with self._lock:
            if self._si is not None and self._version == version:
                return self._si
            ids, vecs = self.index.live()
            params = parse_params(self.index.info.get("search_params"))
            si = self._si if self._si is not None else self._load_cached(ids, params)
            if si is not None and si.mmapped and not np.array_equal(si.ids, ids):
                # Read-only memory-mapped lists cannot take updates: update a copy in RAM.
                si = self._load_cached(ids, {k: v for k, v in params.items() if k != "ondisk"})
            if si is None:
                si = SearchIndex(self.index.factory, self.index.dim, params, tuning=self.index.info.get("tuned"))
            si, changed = si.sync(ids, vecs, self.index.recall_target)
            if changed and self._needs_tuning(si):  # built or rebuilt: measure its search setting
                self._tune(si, ids, vecs)
            if changed and (si.trained_now or si.build_seconds >= self.CACHE_MIN_SECONDS or params.get("ondisk")):
                path = self._save_cache(si, version)
                if path is not None and params.get("ondisk") and si.type.nlist:
                    si = self._from_file(path, str(si.type), params, mmap=True, tuning=si.tuning)
                    si, _ = si.sync(ids, vecs)  # no change: sets the re-ranking vectors
            si.trained_now = False
            self._si, self._version = si, version
            return si

