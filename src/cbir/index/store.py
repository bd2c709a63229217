"""The on-disk index: vectors are the source of truth, a SQLite catalog says what they are.

The layout (``index.json``, ``post.npz``, ``catalog.sqlite``, ``vectors/seg-*.npy``, ``faiss/``)
is in docs/index-and-pipelines.md. Crash safety comes by construction rather than by recovery
code: a segment file is written to a temporary name, fsynced and renamed *before* the SQLite
transaction that references it commits (a killed run leaves an unreferenced file that the next
writer deletes), and deletes and replacements are single transactions; so the catalog only
ever names complete vectors. Searches go to a `SearchBackend` (`cbir.index.backends`).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import sqlite3
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir.fileio import atomic_write_bytes, atomic_write_npy
from cbir.index.backends import FaissBackend, SearchBackend

FORMAT = "cbir-index/1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (id INTEGER PRIMARY KEY, file TEXT NOT NULL, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    segment INTEGER NOT NULL REFERENCES segments(id),
    row INTEGER NOT NULL,
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_segment ON images(segment);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('generation', 0);
"""
# Tables added after the first release; every writer makes them, so older indexes gain them.
# roots: the folders `cbir index` has read (the service serves files only from inside them);
# deleted: files deleted through the service, which later scans of their folder leave out.
LATER_SCHEMA = """
CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS deleted (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
"""
# What `create` writes before index.json; finding only these means a creation was interrupted.
CREATION_LEFTOVERS = {"vectors", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "post.npz", ".lock"}
BUMP = "UPDATE state SET value = value + 1 WHERE key = 'generation'"
# Where each image's vector is: (id, segment file, row).
VECTOR_ROWS = ("SELECT images.id, segments.file, images.row "
               "FROM images JOIN segments ON images.segment = segments.id")


class IndexStoreError(RuntimeError):
    """An index that cannot be opened or used as asked; the message says why."""


class IndexBusy(IndexStoreError):
    """Another process holds the index's writer lock."""


class IndexExists(IndexStoreError):
    """`Index.create` on a directory that already holds an index."""


class IndexMismatch(IndexStoreError):
    """The index was built by a different pipeline than the one given."""


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    meta: dict
    id: int | None = None


def json_object(text: str) -> dict:
    """The JSON object in ``text``; {} for one that cannot be read back (not JSON, nested too
    deep, not an object), so that a bad catalog row never breaks a look-up or a search."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_index_dir(index_dir: str | Path) -> None:
    """Refuse an index path that is an existing file (`cbir index` checks before loading a model)."""
    if Path(index_dir).exists() and not Path(index_dir).is_dir():
        raise IndexStoreError(f"{index_dir}: exists and is not a directory; give a new or an index directory")


@contextmanager
def _writer_lock(root: Path):
    """Hold ``root/.lock`` exclusively (`IndexBusy` at once if another process does)."""
    lock = open(root / ".lock", "a")  # "a": never truncates a lock file another process holds
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexBusy(f"{root}: another process is writing this index") from None
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


class Index:
    """An image index directory. Many readers; writes happen under `writer()`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / "index.json"
        if not info_path.exists():
            raise IndexStoreError(f"{self.root}: not a cbir index (no index.json); build one with `cbir index`")
        self.info = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT:
            raise IndexStoreError(f"{self.root}: index format {self.info.get('format')!r}, this cbir reads {FORMAT!r}")
        self.identity: dict = self.info["identity"]
        self.pipeline: str = self.identity["pipeline"]
        self.dim: int = self.info["dim"]
        self._local = threading.local()
        self._mmaps: dict[str, np.ndarray] = {}
        self.faiss = FaissBackend(self)
        # ``milvus://HOST:PORT/COLLECTION`` when searches go to Milvus, else None (embedded FAISS).
        self.backend_uri: str | None = self.info.get("backend")
        self._remote: SearchBackend | None = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, identity: dict, dim: int, post_state: dict | None = None,
               factory: str = "auto") -> "Index":
        from cbir.index.factory import IndexTypeError, validate

        root = Path(root)
        try:
            factory = validate(factory, dim)
        except IndexTypeError as e:
            raise IndexStoreError(str(e)) from None
        check_index_dir(root)
        if (root / "index.json").exists():
            raise IndexExists(f"{root}: an index already exists here")
        root.mkdir(parents=True, exist_ok=True)
        # The writer lock first: two runs creating the same index would otherwise delete each
        # other's half-made files below (and then fail on a catalog with no tables).
        with _writer_lock(root):
            if (root / "index.json").exists():  # another process finished creating it meanwhile
                raise IndexExists(f"{root}: an index already exists here")
            found = {p.name for p in root.iterdir()}
            if found - CREATION_LEFTOVERS:
                raise IndexStoreError(f"{root}: directory is not empty and is not a cbir index")
            # A creation killed before index.json was written: nothing was committed, start over
            # (all but the lock file, which is held now).
            for name in found - {".lock"}:
                p = root / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            (root / "vectors").mkdir(parents=True, exist_ok=True)
            if post_state:
                buf = io.BytesIO()
                np.savez(buf, **post_state)
                atomic_write_bytes(root / "post.npz", buf.getvalue())
            con = sqlite3.connect(root / "catalog.sqlite")
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA + LATER_SCHEMA)  # (commits)
            con.close()
            info = {"format": FORMAT, "identity": identity, "dim": int(dim), "factory": factory,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            # index.json last: until it exists, the directory is not an index.
            atomic_write_bytes(root / "index.json", json.dumps(info, indent=1).encode())
        return cls(root)

    # -- properties ----------------------------------------------------------------
    @property
    def factory(self) -> str:
        return self.info.get("factory", "Flat")

    def post_state(self) -> dict[str, np.ndarray]:
        p = self.root / "post.npz"
        if not p.exists():
            return {}
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def check_identity(self, identity: dict) -> None:
        if identity != self.identity:
            mine, theirs = self.identity, identity
            what = "pipeline" if mine["pipeline"] != theirs["pipeline"] else "weights"
            raise IndexMismatch(f"{self.root} was built with pipeline {mine['pipeline']!r} "
                                f"(weights {mine['weights_sha256'][:12]}), not {theirs['pipeline']!r} "
                                f"(weights {theirs['weights_sha256'][:12]}): the {what} differs; "
                                f"search with the index's own pipeline or build a new index")

    # -- catalog -------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        """One SQLite connection per thread (the service reads from a pool of threads)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.root / "catalog.sqlite", timeout=30)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            self._local.con = con
        return con

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def version(self) -> int:
        """A counter every write transaction bumps (used to refresh the derived FAISS index)."""
        return self.db.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0]

    def entries(self, under: str | None = None) -> dict[str, Entry]:
        """Catalog rows by path (optionally only those under a directory prefix)."""
        q, args = "SELECT * FROM images", ()
        if under is not None:
            prefix = under.rstrip("/") + "/"
            q, args = "SELECT * FROM images WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
        return {r["path"]: self._entry(r) for r in self.db.execute(q, args)}

    def id_of(self, path: str) -> int | None:
        """The id of the catalog row for ``path``, if there is one."""
        r = self.db.execute("SELECT id FROM images WHERE path = ?", (str(path),)).fetchone()
        return int(r[0]) if r else None

    def get(self, image_id: int) -> Entry | None:
        r = self.db.execute("SELECT * FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return self._entry(r) if r else None

    @staticmethod
    def _entry(r: sqlite3.Row) -> Entry:
        return Entry(r["path"], r["size"], r["mtime_ns"], r["sha256"], json_object(r["meta"]), r["id"])

    # -- vectors -------------------------------------------------------------------
    def _segment(self, file: str) -> np.ndarray:
        arr = self._mmaps.get(file)
        if arr is None:
            arr = np.load(self.root / "vectors" / file, mmap_mode="r")
            self._mmaps[file] = arr
        return arr

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64, vectors (N, D) float32) of every image in the catalog, by id."""
        rows = self.db.execute(VECTOR_ROWS + " ORDER BY images.id").fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        out = np.empty((len(rows), self.dim), np.float32)
        by_file: dict[str, list[tuple[int, int]]] = {}
        for i, (_, file, row) in enumerate(rows):
            by_file.setdefault(file, []).append((i, row))
        # Unmap segments no row uses any more (another process deleted or compacted them): a
        # long-running reader would otherwise keep their disk space.
        for file in set(self._mmaps) - set(by_file):
            self._mmaps.pop(file, None)
        for file, pairs in by_file.items():
            seg = self._segment(file)
            dst, src = zip(*pairs)
            out[list(dst)] = seg[list(src)]
        return ids, out

    def vectors(self, image_ids) -> np.ndarray:
        """The stored vectors ``(n, D)`` of ``image_ids`` (in that order), reading only those rows;
        KeyError for an id that is not in the catalog."""
        ids = [int(i) for i in np.asarray(image_ids).reshape(-1)]
        out = np.empty((len(ids), self.dim), np.float32)
        where: dict[int, tuple[str, int]] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = sorted(set(ids[start:start + 500]))
            q = VECTOR_ROWS + f" WHERE images.id IN ({','.join('?' * len(chunk))})"
            where.update({r[0]: (r[1], r[2]) for r in self.db.execute(q, chunk)})
        for n, i in enumerate(ids):
            file, row = where[i]  # KeyError for an id not in the catalog
            out[n] = self._segment(file)[row]
        return out

    def vector(self, image_id: int) -> np.ndarray:
        return self.vectors([image_id])[0]

    # -- search --------------------------------------------------------------------
    @property
    def recall_target(self) -> float:
        """The recall@10 search parameters are tuned for (``cbir index --recall``)."""
        from cbir.index.factory import DEFAULT_RECALL

        return float(self.info.get("recall_target", DEFAULT_RECALL))

    def tune_search(self, recall: float | None = None, force: bool = False) -> dict | None:
        """Set the recall target (if given) and tune the embedded index's search parameters now
        if they are missing or stale (or ``force``); returns the stored measurement (None for Flat)."""
        if recall is not None:
            if not 0 < recall <= 1:
                raise IndexStoreError(f"--recall {recall}: a recall@10 target is in (0, 1]")
            self.update_info(recall_target=float(recall))
        return self.faiss.tune(force)

    def search_index(self):
        """The embedded FAISS structure (`cbir.index.factory.SearchIndex`), built or updated now."""
        return self.faiss.search_index()

    def search(self, queries: np.ndarray, k: int = 10, params: dict[str, int] | str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: (scores (Q, k), ids (Q, k)); missing slots have id -1.

        ``params`` (e.g. ``{"nprobe": 8}`` or ``"nprobe=8,k_factor=16"``) override the stored
        and tuned search parameters for this call (embedded FAISS index only)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise IndexStoreError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        if isinstance(params, str):
            from cbir.index.factory import IndexTypeError, parse_params

            try:
                params = parse_params(params)
            except IndexTypeError as e:
                raise IndexStoreError(str(e)) from None
        return self.search_backend.search(queries, max(1, int(k)), params)

    # -- the search backend ---------------------------------------------------------
    def use_backend(self, uri: str | None) -> None:
        """Search through ``uri`` in this process (``None``: the embedded FAISS index)."""
        self.backend_uri, self._remote = uri, None

    @property
    def search_backend(self) -> SearchBackend:
        """The `SearchBackend` searches go to and every committed change is reported to."""
        if not self.backend_uri:
            return self.faiss
        if self._remote is None:
            from cbir.index.milvus import MilvusBackend

            self._remote = MilvusBackend(self.backend_uri, self.dim, record=self.root)
        return self._remote

    def _report(self, added: tuple[list[int], np.ndarray] | None = None, removed: list[int] = ()) -> None:
        """Tell the backend about a committed change; a backend that cannot take it now is
        warned about, not fatal: the commit stands, and `cbir index` re-syncs it."""
        if not self.backend_uri or (added is None and not removed):
            return
        try:
            if len(removed):
                self.search_backend.remove(np.asarray(removed, np.int64))
            if added is not None:
                self.search_backend.add(np.asarray(added[0], np.int64), added[1])
        except (RuntimeError, ValueError, OSError) as e:
            warnings.warn(f"{self.backend_uri}: {e}; `cbir index` will send the change again", stacklevel=3)

    def set_backend(self, uri: str | None) -> None:
        """Store the backend in ``index.json`` (``cbir search`` then uses it by default)."""
        if uri:
            from cbir.index.milvus import MilvusURI

            uri = str(MilvusURI.parse(uri))
        self.update_info(backend=uri or None)
        self.use_backend(uri or None)

    def update_info(self, **changes) -> bool:
        """Store fields in ``index.json`` (a value of None removes the field); atomically.
        Returns whether anything changed."""
        info = {**self.info, **changes}
        for k in [k for k, v in changes.items() if v is None]:
            del info[k]
        if info == self.info:
            return False
        atomic_write_bytes(self.root / "index.json", json.dumps(info, indent=1).encode())
        self.info = info
        return True

    def set_index_type(self, factory: str | None = None, search_params: str | None = None) -> bool:
        """Change the index type and/or search parameters stored in ``index.json`` (the derived
        index is rebuilt on next use); returns whether anything changed."""
        from cbir.index.factory import IndexTypeError, parse_params, validate

        changes = {}
        try:
            if factory is not None:
                changes["factory"] = validate(factory, self.dim)
            if search_params is not None:
                parse_params(search_params)
                changes["search_params"] = search_params
        except IndexTypeError as e:
            raise IndexStoreError(str(e)) from None
        if not self.update_info(**changes):
            return False
        self.faiss = FaissBackend(self)  # the old structure is of the old type
        return True

    # -- writing -------------------------------------------------------------------
    @contextmanager
    def writer(self):
        """Exclusive write access; first deletes the segment files that no committed transaction
        references (a killed writer's)."""
        with _writer_lock(self.root):
            self.db.executescript(LATER_SCHEMA)  # an index made by an older cbir gains the newer tables
            known = {r[0] for r in self.db.execute("SELECT file FROM segments")}
            for f in (self.root / "vectors").iterdir():
                if f.name not in known:
                    f.unlink()
            yield self

    def add(self, entries: list[Entry], vectors: np.ndarray) -> list[int]:
        """Add images (replacing any catalog rows with the same paths) in one transaction."""
        if len(entries) != len(vectors):
            raise ValueError("entries and vectors differ in length")
        if not entries:
            return []
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.shape[1] != self.dim:
            raise IndexStoreError(f"vectors of dimension {vectors.shape[1]} do not fit index dimension {self.dim}")
        now = time.time()
        replaced = self._ids_of_paths([e.path for e in entries]) if self.backend_uri else []
        with self._new_segment(vectors) as (con, seg_id):
            con.executemany("DELETE FROM images WHERE path = ?", [(e.path,) for e in entries])
            con.executemany(
                "INSERT INTO images (path, size, mtime_ns, sha256, meta, segment, row, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.path, e.size, e.mtime_ns, e.sha256, json.dumps(e.meta), seg_id, i, now) for i, e in enumerate(entries)],
            )
        ids = [r[0] for r in self.db.execute("SELECT id FROM images WHERE segment = ? ORDER BY row", (seg_id,))]
        self._report((ids, vectors), replaced)
        return ids

    @contextmanager
    def _new_segment(self, vectors: np.ndarray):
        """Write ``vectors`` (n, D) float32 as the next segment file (durably, before any
        transaction names it), then yield (connection, segment id) inside the one transaction
        that adds the segment, the body's changes and a generation bump: the vectors become
        visible all at once, or not at all. Segments left empty are dropped after the commit."""
        seg_id = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM segments").fetchone()[0] + 1
        file = f"seg-{seg_id:08d}-{os.getpid()}.npy"
        atomic_write_npy(self.root / "vectors" / file, vectors)
        with self.db as con:
            con.execute("INSERT INTO segments (id, file, n) VALUES (?, ?, ?)", (seg_id, file, len(vectors)))
            yield con, seg_id
            con.execute(BUMP)
        self._drop_empty_segments()

    def _ids_of_paths(self, paths: list[str]) -> list[int]:
        return [i for p in paths for (i,) in self.db.execute("SELECT id FROM images WHERE path = ?", (p,))]

    def add_root(self, folder: str) -> None:
        """Record a folder that `cbir index` reads (call under `writer()`)."""
        with self.db as con:
            con.execute("INSERT OR IGNORE INTO roots (path) VALUES (?)", (folder,))

    def roots(self) -> list[str]:
        """The folders recorded by `add_root` (none for an index no newer writer has opened)."""
        try:
            return [r[0] for r in self.db.execute("SELECT path FROM roots")]
        except sqlite3.OperationalError:
            return []

    def tombstones(self, under: str) -> dict[str, tuple[int, int]]:
        """Files under a folder deleted through the service: path -> (size, mtime_ns) then."""
        prefix = under.rstrip("/") + "/"
        try:
            return {r[0]: (r[1], r[2]) for r in self.db.execute(
                "SELECT path, size, mtime_ns FROM deleted WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))}
        except sqlite3.OperationalError:
            return {}

    def forget_tombstones(self, paths: list[str]) -> None:
        with self.db as con:
            con.executemany("DELETE FROM deleted WHERE path = ?", [(p,) for p in paths])

    def touch(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a new mtime for a file whose content (hash) did not change."""
        with self.db as con:
            con.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE path = ?", (size, mtime_ns, path))
            con.execute(BUMP)

    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None, keep_out: bool = False) -> int:
        """Drop images from the catalog (one transaction); returns how many were removed.
        ``keep_out``: also record the files (as they are now) so that later scans of their
        folder leave them out until they change (a deletion through the service)."""
        gone = [int(i) for i in ids or []] + (self._ids_of_paths(list(paths)) if paths and self.backend_uri else [])
        with self.db as con:
            n = 0
            if keep_out and ids:
                con.executemany("INSERT OR REPLACE INTO deleted (path, size, mtime_ns) "
                                "SELECT path, size, mtime_ns FROM images WHERE id = ?", [(int(i),) for i in ids])
            if ids:
                n += con.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in ids]).rowcount
            if paths:
                n += con.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in paths]).rowcount
            con.execute(BUMP)
        self._drop_empty_segments()
        self._report(removed=gone)
        return n

    def _drop_empty_segments(self) -> None:
        with self.db as con:
            dead = con.execute(
                "SELECT id, file FROM segments WHERE id NOT IN (SELECT DISTINCT segment FROM images)"
            ).fetchall()
            con.executemany("DELETE FROM segments WHERE id = ?", [(r[0],) for r in dead])
        for _, file in dead:  # after the commit: a crash here leaves garbage, never a dangling row
            self._mmaps.pop(file, None)
            (self.root / "vectors" / file).unlink(missing_ok=True)

    def compact(self, min_dead_fraction: float = 0.5, min_segments: int = 64) -> bool:
        """Rewrite live vectors into one segment when many are dead or segments are many."""
        total = self.db.execute("SELECT COALESCE(SUM(n), 0), COUNT(*) FROM segments").fetchone()
        live = len(self)
        if not total[0] or (1 - live / total[0] < min_dead_fraction and total[1] < min_segments):
            return False
        ids, vecs = self.live()
        with self._new_segment(vecs) as (con, seg_id):
            con.executemany("UPDATE images SET segment = ?, row = ? WHERE id = ?",
                            [(seg_id, r, int(i)) for r, i in enumerate(ids)])
        return True

    def stats(self) -> dict:
        n_seg = self.db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
        return {"count": len(self), "pipeline": self.pipeline, "dim": self.dim, "index_type": self.factory,
                "search_params": self.info.get("search_params", ""), "backend": self.info.get("backend", ""),
                "segments": n_seg, "weights_sha256": self.identity["weights_sha256"], "path": str(self.root)}
