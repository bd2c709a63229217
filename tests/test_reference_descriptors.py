"""Descriptors stay bit-identical across restructurings (saved by tests/reference_descriptors.py)."""

from __future__ import annotations

import numpy as np

from reference_descriptors import OUT, compute


def test_descriptors_equal_the_saved_ones_bit_for_bit(museum, tmp_path):
    from cbir.demo import build_demo_benchmark

    saved = np.load(OUT)
    now = compute(museum, build_demo_benchmark(tmp_path / "demo"))
    assert set(now) == set(saved.files)
    for name in saved.files:
        assert now[name].shape == saved[name].shape, name
        diff = np.abs(now[name] - saved[name]).max()
        assert np.array_equal(now[name], saved[name]), f"{name}: descriptors moved (max |diff| {diff:.3g})"
