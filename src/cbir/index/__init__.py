"""The index: vectors + SQLite catalog + a derived FAISS index; building, updating, searching."""

from cbir.index.builder import Hit, Searcher, UpdateReport, open_or_create, update_index
from cbir.index.store import Entry, Index, IndexBusy, IndexExists, IndexMismatch, IndexStoreError

__all__ = ["Entry", "Hit", "Index", "IndexBusy", "IndexExists", "IndexMismatch", "IndexStoreError", "Searcher", "UpdateReport",
           "open_or_create", "update_index"]
