"""Batch size by measurement (docs/scaling.md): the smallest of a few batch sizes within 5% of the
best per-image time (a smaller batch holds less memory and fills sooner with images of one shape),
cached per machine, keyed by everything that changes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import timeit
from pathlib import Path

import numpy as np

from cbir.fileio import atomic_write_bytes
from cbir.models.engine import cache_dir

CANDIDATES = (1, 2, 4, 8, 16)
TOLERANCE = 1.05
MAX_BATCH_BYTES = 256 << 20  # never measure (or use) a batch of pixels larger than this


def _cache_file() -> Path:
    return cache_dir() / "batch_sizes.json"


def _key(extractor) -> str:
    spec = extractor.spec
    parts = [extractor.engine_name, extractor.backbone.name, extractor.backbone.weights_sha256,
             spec.layer, str(spec.resize), str(extractor.engine_threads()), str(extractor.infer_workers),
             str(os.cpu_count())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def measure(extractor, candidates=CANDIDATES, repeats: int = 2) -> dict[int, float]:
    """Seconds per image at each batch size (best of ``repeats`` after one warm-up), on images of
    a typical shape: a 4:3 landscape photo under ``long<S>``, the square under ``crop<S>``."""
    r = extractor.spec.resize
    h, w = (r.size, r.size) if r.mode == "crop" else (round(r.size * 3 / 4), r.size)
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for bs in candidates:
        if bs * h * w * 3 * 4 > MAX_BATCH_BYTES:  # float32 network input
            break
        batch = rng.integers(0, 256, (bs, h, w, 3), dtype=np.uint8)
        extractor.raw_descriptors(batch)  # warm-up
        out[bs] = min(timeit.repeat(lambda: extractor.raw_descriptors(batch), number=1, repeat=repeats)) / bs
    return out


def choose(per_image: dict[int, float]) -> int:
    best = min(per_image.values())
    return min(bs for bs, t in per_image.items() if t <= best * TOLERANCE)


def measured_batch_size(extractor, refresh: bool = False) -> int:
    """The cached choice for this extractor's engine on this machine, measured if missing."""
    path, key = _cache_file(), _key(extractor)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not refresh and isinstance(cached.get(key), dict) and "batch_size" in cached[key]:
        return int(cached[key]["batch_size"])
    per_image = measure(extractor)
    bs = choose(per_image)
    cached[key] = {"batch_size": bs, "pipeline": str(extractor.spec), "engine": extractor.engine_name,
                   "ms_per_image": {str(k): round(v * 1000, 2) for k, v in per_image.items()}}
    with contextlib.suppress(OSError):  # a read-only cache only costs a measurement next time
        atomic_write_bytes(path, json.dumps(cached, indent=1).encode())
    return bs
