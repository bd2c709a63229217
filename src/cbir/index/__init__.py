"""The index: vectors + SQLite catalog (`store`), searched through a `SearchBackend`
(`backends`: embedded FAISS of a `factory` type, or `milvus`); built and searched by `builder`."""

from cbir.index.backends import FaissBackend, SearchBackend
from cbir.index.builder import Hit, Searcher, UpdateReport, open_or_create, update_index
from cbir.index.store import Entry, Index, IndexBusy, IndexExists, IndexMismatch, IndexStoreError

__all__ = ["Entry", "FaissBackend", "Hit", "Index", "IndexBusy", "IndexExists", "IndexMismatch", "IndexStoreError",
           "SearchBackend", "Searcher", "UpdateReport", "open_or_create", "update_index"]
