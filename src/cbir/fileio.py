"""Crash-safe file writes: the whole new content or the old one, never half of either.

Write to a temporary file in the same folder, fsync it, rename it over the target, fsync the
folder (so the rename itself survives a power cut). Every file cbir writes for later reading
(index.json, segments, caches, exported graphs, checkpoints, uploads) goes through here.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: str | Path) -> None:
    """fsync a file, or a folder (which makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (an ONNX
    export, say); on success it is fsynced and renamed to ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_npy(path: str | Path, array) -> None:
    """`atomic_write_bytes` of ``array`` in ``.npy`` format."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())
