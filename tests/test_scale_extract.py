"""Extraction speed machinery: bounded decode window, parallel inference, batch sizing, int8."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from cbir.images import ImageError
from cbir.pipeline import Extractor, resolve_spec
from cbir.models import batch_size as tuning

SPEC = "efficientnet_lite0/bn2,long128,GeM3,L2"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "astronaut", "coffee"]):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img = img.resize((200 + 10 * i, 150))
        p = root / f"{i}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    bad = root / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    return paths, bad


@pytest.fixture(scope="module")
def extractor():
    return Extractor(resolve_spec(SPEC), threads=1)


def test_decoding_runs_ahead_by_a_bounded_window(extractor, images, monkeypatch):
    paths, _ = images
    sources = [paths[i % len(paths)] for i in range(40)]
    alive, peak, lock = 0, 0, threading.Lock()
    real_load = Extractor.load

    def load(self, source, bbox=None):
        nonlocal alive, peak
        arr = real_load(self, source, bbox)
        with lock:
            alive += 1
            peak = max(peak, alive)
        return arr

    def raw(self, batch):
        nonlocal alive
        time.sleep(0.01)  # a slow engine: the decoders must wait, not pile up images
        with lock:
            alive -= len(batch)
        return np.zeros((len(batch), 4), np.float32)

    monkeypatch.setattr(Extractor, "load", load)
    monkeypatch.setattr(Extractor, "raw_descriptors", raw)
    ex = Extractor(resolve_spec(SPEC), batch_size=4, decode_workers=2)
    ex._engine = object()  # not used: raw_descriptors is replaced
    got = sorted(k for keys, _ in ex.iter_batches(sources) for k in keys)
    assert got == list(range(40))
    # Decoded ahead (batch + 2 per decoder), one batch forming, one per decoder finishing, and
    # the batches in the engine (one per inference worker, plus one queued): a constant.
    bound = (4 + 2 * 2) + 4 + 2 + (ex.infer_workers + 1) * 4
    assert peak <= bound


def test_parallel_inference_gives_the_same_descriptors(extractor, images):
    paths, bad = images
    errors = []
    sources = paths + [bad]
    one = extractor.extract(sources, on_error=lambda i, e: errors.append(i))
    two = Extractor(resolve_spec(SPEC), threads=1, infer_workers=2, decode_workers=1, batch_size=2).extract(
        sources, on_error=lambda i, e: errors.append(i))
    assert errors == [len(paths), len(paths)]  # reported once per run, from the consumer thread
    assert np.isnan(one[-1]).all() and np.isnan(two[-1]).all()
    np.testing.assert_allclose(one[:-1], two[:-1], atol=1e-5)
    with pytest.raises(ImageError):
        extractor.extract(sources)


def test_batch_size_by_measurement_is_cached(extractor, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_cache_file", lambda: tmp_path / "batch_sizes.json")
    calls = []
    monkeypatch.setattr(tuning, "measure", lambda ex: calls.append(1) or {1: 0.011, 2: 0.0097, 4: 0.0096, 8: 0.0120})
    ex = Extractor(resolve_spec(SPEC), threads=1, batch_size=0)
    assert ex.resolved_batch_size() == 2  # smallest within 5% of the best
    assert Extractor(resolve_spec(SPEC), threads=1, batch_size=0).resolved_batch_size() == 2
    assert len(calls) == 1
    assert tuning.choose({1: 1.0, 4: 0.5, 16: 0.49}) == 4


def test_measure_runs_the_engine(extractor):
    per_image = tuning.measure(extractor, candidates=(1, 2), repeats=1)
    assert set(per_image) == {1, 2} and all(v > 0 for v in per_image.values())


def test_int8_engine_stays_close_to_float(images):
    paths, _ = images
    fp = Extractor(resolve_spec(SPEC), threads=1).extract(paths)
    q = Extractor(resolve_spec(SPEC), engine_name="onnx-int8", threads=1)
    assert "int8" in q.engine.path.name
    x = q.extract(paths)
    cos = (fp * x).sum(axis=1)
    assert cos.min() > 0.9, cos
    # Same ranking of the database for each image as a query, at the top.
    assert ((fp @ fp.T).argmax(axis=1) == (x @ fp.T).argmax(axis=1)).all()
