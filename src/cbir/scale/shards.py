"""Descriptor shards: Parquet files of (path, size, mtime_ns, sha256, vector, error) rows.

A shard directory holds ``*.parquet`` files and one ``cbir-shards.json`` manifest naming the
descriptor identity (pipeline + weights hash) and dimension. Extraction on a cluster writes
them (`cbir.scale.ray_extract`); `ingest_shards` adds them to an index, one transaction per
file, so a killed ingest keeps what it committed and a second run completes it. The vectors
column is ``fixed_size_list<float32>[dim]``: any Parquet reader can read a shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

MANIFEST = "cbir-shards.json"
COLUMNS = ("path", "size", "mtime_ns", "sha256", "vector", "error")


class ShardError(ValueError):
    """Shards that cannot be ingested (wrong identity, missing manifest, bad columns)."""


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ShardError("reading or writing Parquet shards needs pyarrow: pip install 'cbir[ray]'") from None
    return pa, pq


def table(paths: list[str], sizes: list[int], mtimes: list[int], hashes: list[str], vectors: np.ndarray,
          errors: list[str]):
    """One shard's rows as an Arrow table (rows with an error carry a zero vector)."""
    pa, _ = _pa()
    vectors = np.ascontiguousarray(vectors, np.float32)
    return pa.table({
        "path": pa.array(paths, pa.string()),
        "size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()),
        "sha256": pa.array(hashes, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
        "error": pa.array(errors, pa.string()),
    })


def write_manifest(shards_dir: Path, identity: dict, dim: int, extra: dict | None = None) -> None:
    shards_dir.mkdir(parents=True, exist_ok=True)
    (shards_dir / MANIFEST).write_text(json.dumps({"identity": identity, "dim": int(dim), **(extra or {})}, indent=1))


def shard_files(shards_dir: Path) -> list[Path]:
    return sorted(Path(shards_dir).rglob("*.parquet"))


def read_shard(path: Path) -> tuple[dict[str, list], np.ndarray]:
    """(columns other than vector, as lists; vectors ``(n, dim)`` float32)."""
    _, pq = _pa()
    t = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in t.column_names]
    if missing:
        raise ShardError(f"{path}: not a cbir shard (missing columns {', '.join(missing)})")
    vec = t.column("vector").combine_chunks()
    dim = vec.type.list_size
    vectors = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    cols = {c: t.column(c).to_pylist() for c in COLUMNS if c != "vector"}
    return cols, vectors


def ingest_shards(index, shards_dir: Path, meta: dict[str, dict] | None = None, meta_root: Path | None = None,
                  warn: Callable[[str], None] = print) -> tuple[int, list[str]]:
    """Add every shard under ``shards_dir`` to ``index`` (call under ``index.writer()``); returns
    (rows added, paths that failed to extract). ``meta``: `folder_metadata` of ``meta_root``."""
    from cbir.index.store import Entry, IndexMismatch

    p = Path(shards_dir) / MANIFEST
    if not p.exists():
        raise ShardError(f"{shards_dir}: no {MANIFEST}; not a cbir shard directory")
    manifest = json.loads(p.read_text())
    if manifest["identity"] != index.identity:
        raise IndexMismatch(f"shards in {shards_dir} hold descriptors of {manifest['identity']['pipeline']!r}, "
                            f"the index {index.root} those of {index.pipeline!r} (or other weights)")
    if int(manifest["dim"]) != index.dim:
        raise ShardError(f"shards in {shards_dir} have dimension {manifest['dim']}, the index {index.dim}")
    added, failed = 0, []
    for f in shard_files(shards_dir):
        cols, vectors = read_shard(f)
        entries, rows = [], []
        for i, path in enumerate(cols["path"]):
            if cols["error"][i]:
                failed.append(path)
                warn(f"warning: skipped {cols['error'][i]}")
                continue
            rel = Path(path).relative_to(meta_root).as_posix() if meta_root and Path(path).is_relative_to(meta_root) else path
            entries.append(Entry(path, int(cols["size"][i]), int(cols["mtime_ns"][i]), cols["sha256"][i],
                                 (meta or {}).get(rel, {})))
            rows.append(i)
        if entries:
            index.add(entries, vectors[rows])  # one transaction per shard file
            added += len(entries)
    return added, failed
