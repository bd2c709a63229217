"""A Milvus search backend, for collections that outgrow one machine (docs/scaling.md).

``--backend milvus://HOST:PORT/COLLECTION`` (``milvuss://`` for TLS; a token for an
authenticated server comes from ``$MILVUS_TOKEN``). Milvus holds a copy of the index's
vectors under the same ids: every committed change is sent as it happens, and
`MilvusBackend.sync` repairs whatever a failed send left behind. The client is pymilvus's
``MilvusClient``, the path a Milvus cluster takes; tests run it against ``milvus-lite`` (pure
Python, O(N) per query: a protocol test double, never a default).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.fileio import atomic_write_npy
from cbir.index.backends import SearchBackend

_URI = re.compile(r"^(milvus|milvuss)://([^/:]+|\[[^\]]+\]):(\d+)/([A-Za-z_][A-Za-z0-9_]*)$")
INSERT_CHUNK = 2000


class MilvusError(ValueError):
    """A backend URI that cannot be used, or a Milvus that does not answer; one line."""


@dataclass(frozen=True)
class MilvusURI:
    secure: bool
    host: str
    port: int
    collection: str

    @classmethod
    def parse(cls, text: str) -> "MilvusURI":
        m = _URI.match(text.strip())
        if not m:
            raise MilvusError(f"backend {text!r}: expected milvus://HOST:PORT/COLLECTION "
                              f"(collection: letters, digits, underscores)")
        return cls(m.group(1) == "milvuss", m.group(2), int(m.group(3)), m.group(4))

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{'milvuss' if self.secure else 'milvus'}://{self.host}:{self.port}/{self.collection}"


class MilvusBackend(SearchBackend):
    """One collection: ``id`` INT64 primary key, ``vector`` FLOAT_VECTOR(dim), inner product.
    ``record``: the index directory where the ids the collection holds are remembered
    (``milvus-<collection>.ids.npy``), updated only after Milvus took a change."""

    def __init__(self, uri: str | MilvusURI, dim: int, timeout: float = 30.0, record: str | Path | None = None) -> None:
        try:
            from pymilvus import MilvusClient
        except ModuleNotFoundError:
            raise MilvusError("the Milvus backend needs pymilvus: pip install 'cbir[milvus]'") from None
        self.uri = uri if isinstance(uri, MilvusURI) else MilvusURI.parse(uri)
        self.dim = int(dim)
        try:
            self.client = MilvusClient(uri=self.uri.endpoint, token=os.environ.get("MILVUS_TOKEN", ""),
                                       timeout=timeout)
        except Exception as e:  # pymilvus raises its own MilvusException, or grpc errors
            raise MilvusError(f"cannot reach Milvus at {self.uri.endpoint}: {_one_line(e)}") from None
        self.collection = self.uri.collection
        self.record = Path(record) / f"milvus-{self.collection}.ids.npy" if record is not None else None
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        c = self.client
        if c.has_collection(self.collection):
            desc = c.describe_collection(self.collection)
            dims = [f.get("params", {}).get("dim") for f in desc.get("fields", []) if f.get("name") == "vector"]
            if dims and dims[0] is not None and int(dims[0]) != self.dim:
                raise MilvusError(f"Milvus collection {self.collection!r} has dimension {dims[0]}, the index {self.dim}: "
                                  f"use another collection name")
        else:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            params = c.prepare_index_params()
            params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="IP")
            c.create_collection(self.collection, schema=schema, index_params=params)
        c.load_collection(self.collection)

    # -- changes -------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._send(np.asarray(ids, np.int64), np.asarray(vectors, np.float32), np.zeros(0, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self._send(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), np.asarray(ids, np.int64))

    def _send(self, ids: np.ndarray, vecs: np.ndarray, gone: np.ndarray, record: bool = True) -> None:
        """Upsert ``ids``/``vecs`` and delete ``gone``; the record follows only what Milvus took
        (``record=False``: the caller records the whole set itself)."""
        if not len(ids) and not len(gone):
            return
        try:
            for i in range(0, len(gone), INSERT_CHUNK):
                self.client.delete(self.collection, ids=[int(v) for v in gone[i:i + INSERT_CHUNK]])
            for i in range(0, len(ids), INSERT_CHUNK):
                self.client.upsert(self.collection, [{"id": int(j), "vector": v.tolist()}
                                                     for j, v in zip(ids[i:i + INSERT_CHUNK], vecs[i:i + INSERT_CHUNK])])
            self.client.flush(self.collection)
        except Exception as e:
            raise MilvusError(f"Milvus at {self.uri.endpoint} refused the change: {_one_line(e)}") from None
        if record and self.record is not None:
            held = _read_ids(self.record)
            if held is not None:
                atomic_write_npy(self.record, np.setdiff1d(np.union1d(held, ids), gone))

    def remote_ids(self) -> np.ndarray:
        """Every id in the collection (a full scan: used only when the local record is missing)."""
        it = self.client.query_iterator(self.collection, batch_size=5000, output_fields=["id"])
        out: list[int] = []
        try:
            while rows := it.next():
                out += [int(r["id"]) for r in rows]
        finally:
            it.close()
        return np.unique(np.asarray(out, np.int64))

    def sync(self, index) -> tuple[int, int]:
        """Make the collection hold exactly the index's live vectors; returns (inserted, deleted)."""
        ids, vecs = index.live()
        record = self.record or Path(index.root) / f"milvus-{self.collection}.ids.npy"
        sent = _read_ids(record)
        if sent is None:
            sent = self.remote_ids()
        new = ~np.isin(ids, sent, assume_unique=True)
        gone = np.setdiff1d(sent, ids, assume_unique=True)
        self._send(ids[new], vecs[new], gone, record=False)
        atomic_write_npy(record, ids)  # sorted and unique; only after Milvus took every change
        return int(new.sum()), int(len(gone))

    # -- search ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, params: dict[str, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: (scores (Q, k), ids (Q, k)); missing slots have id -1.
        ``params`` (FAISS settings) do not apply: Milvus chooses its own search setting."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        try:
            res = self.client.search(self.collection, data=queries.tolist(), limit=int(k), output_fields=["id"],
                                     search_params={"metric_type": "IP", "params": {"ef": max(64, 2 * int(k))}})
        except Exception as e:
            raise MilvusError(f"Milvus search at {self.uri.endpoint} failed: {_one_line(e)}") from None
        scores = np.full((len(queries), k), -np.inf, np.float32)
        out = np.full((len(queries), k), -1, np.int64)
        for qi, hits in enumerate(res):
            for j, h in enumerate(list(hits)[:k]):
                out[qi, j] = int(h["id"])
                scores[qi, j] = float(h["distance"])
        return scores, out

    def count(self) -> int:
        return int(self.client.get_collection_stats(self.collection).get("row_count", 0))

    def drop(self) -> None:
        self.client.drop_collection(self.collection)


def _read_ids(path: Path) -> np.ndarray | None:
    """The sorted ids a record file says the collection holds; None when missing or unreadable."""
    try:
        return np.load(path)
    except (OSError, ValueError):
        return None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
