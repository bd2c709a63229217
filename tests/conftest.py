"""Shared fixtures: small real photos (scikit-image's), the shared benchmarks when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# Keep tests from fighting over the 2 cores with ONNX Runtime's and PyTorch's thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_benchmark(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not (path / "gt.json").exists():
        pytest.skip(f"needs the shared benchmark {path} (../shared/datasets beside the repo); not present here")
    return path


@pytest.fixture(scope="session")
def museum() -> Path:
    return shared_benchmark("museum")


def skimage_photo(name: str, max_side: int = 400) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    img.thumbnail((max_side, max_side))
    return img


PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Six real photographs as JPEGs (a read-only fixture: copy it before changing it)."""
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        skimage_photo(name).save(d / f"{name}.jpg", quality=90)
    return d


@pytest.fixture
def chelsea_crop(tmp_path) -> Path:
    """An edited copy (crop + rescale) of the chelsea photo: a query whose answer is known."""
    img = skimage_photo("chelsea")
    w, h = img.size
    q = img.crop((w // 8, h // 8, w - w // 6, h - h // 10)).resize((300, 200))
    p = tmp_path / "query.jpg"
    q.save(p, quality=85)
    return p


def random_maps(shape=(2, 5, 7, 6), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)
