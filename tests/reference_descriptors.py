"""Descriptors saved from the code before the #11 restructuring, and how they were made.

``python tests/reference_descriptors.py`` (run from the repo root, ``../shared`` beside it)
rewrites ``tests/data/reference_descriptors.npz``; ``tests/test_reference_descriptors.py``
recomputes them with today's code and asks for equality, bit for bit.
Only run it again when a change *means* to alter the descriptors, and say so in the commit.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# The same thread settings as the test session (tests/conftest.py).
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "reference_descriptors.npz"
FUSION = "efficientnet_lite0/blocks.5+bn2,long384,MS3,GeM3,W0.5-0.5,L2"


def museum_items(museum: Path) -> tuple[list[Path], list]:
    """Every 15th database painting, and the first 10 queries cropped to their boxes."""
    from cbir.datasets import load_benchmark

    bench = load_benchmark(museum)
    db = [bench.path(p) for p in bench.database[::15]]
    qs = bench.queries[:10]
    return db + [bench.path(q.image) for q in qs], [None] * len(db) + [q.bbox for q in qs]


def demo_items(demo: Path) -> list[Path]:
    from cbir.datasets import load_benchmark

    bench = load_benchmark(demo)
    return [bench.path(p) for p in bench.database] + [bench.path(q.image) for q in bench.queries[::4]]


def compute(museum: Path, demo: Path) -> dict[str, np.ndarray]:
    """name -> descriptors, through the public extraction API of the day."""
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, resolve_spec

    ex = Extractor(resolve_spec(DEFAULT_PIPELINE))
    m_src, m_box = museum_items(museum)
    d_src = demo_items(demo)
    fusion = Extractor(resolve_spec(FUSION))
    return {
        "museum": ex.extract(m_src, m_box),
        "demo": ex.extract(d_src),
        "museum_one": np.stack([ex.extract_one(m_src[-1], m_box[-1]), ex.extract_one(d_src[0])]),
        "fusion": fusion.extract(m_src[:6]),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    from cbir.demo import build_demo_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        demo = build_demo_benchmark(Path(tmp) / "demo")
        vecs = compute(ROOT.parent / "shared" / "datasets" / "museum", demo)
    np.savez_compressed(OUT, **vecs)
    print({k: v.shape for k, v in vecs.items()}, OUT.stat().st_size, "bytes")
