"""Pooling against naive loops; post-processing against scikit-learn; pipeline strings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cbir.pipeline import PipelineError, PipelineSpec, resolve_spec
from cbir.pooling import F, POOLINGS, parse_pooling, pool
from cbir.postprocess import PCA, L2Normalizer, NotFittedError, PowerNormalizer, parse_postprocess

from conftest import random_maps


def naive(x: np.ndarray, reduce) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            out[i, k] = reduce([float(x[i, k, a, b]) for a in range(h) for b in range(w)])
    return out


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 3, 1, 1), (3, 4, 2, 9)])
def test_poolings_equal_naive_loops(shape):
    x = random_maps(shape)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(F.spoc(t).numpy(), naive(x, sum), rtol=1e-5)
    np.testing.assert_allclose(F.ave(t).numpy(), naive(x, lambda v: sum(v) / len(v)), rtol=1e-5)
    np.testing.assert_allclose(F.mac(t).numpy(), naive(x, max), rtol=1e-6)
    for p in (1.0, 3.0, 6.5):
        ref = naive(x, lambda v: (sum(max(a, 1e-6) ** p for a in v) / len(v)) ** (1 / p))
        np.testing.assert_allclose(F.gem(t, p).numpy(), ref, rtol=1e-4)


def test_gem_spans_ave_to_max():
    t = torch.from_numpy(random_maps())
    torch.testing.assert_close(F.gem(t, 1.0), F.ave(t), rtol=1e-5, atol=1e-6)
    assert torch.all(F.gem(t, 50.0) <= F.mac(t) + 1e-5)
    assert torch.all(F.gem(t, 50.0) >= 0.9 * F.mac(t))


def test_pooling_tokens():
    m, v = parse_pooling("GeM3.5")
    assert m.name == "GeM" and v == 3.5
    assert parse_pooling("GeM") == (POOLINGS["GeM"], 3.0)
    assert parse_pooling("MAX") == (POOLINGS["MAX"], None)
    assert parse_pooling("L2") is None
    with pytest.raises(ValueError, match="takes no parameter"):
        parse_pooling("MAX3")
    x = torch.from_numpy(random_maps())
    torch.testing.assert_close(pool(x, *parse_pooling("SUM")), F.spoc(x))


def test_l2_and_power():
    x = np.array([[3.0, -4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(L2Normalizer().transform(x), [[0.6, -0.8], [0, 0]])
    np.testing.assert_allclose(PowerNormalizer(0.5).transform(x), [[math.sqrt(3), -2.0], [0, 0]], rtol=1e-6)


def test_pca_matches_sklearn_and_whitens():
    from sklearn.decomposition import PCA as SkPCA

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))).astype(np.float32)
    ours = PCA(6).fit(x)
    ref = SkPCA(6).fit(x.astype(np.float64))
    y, y_ref = ours.transform(x), ref.transform(x)
    # Components are defined up to sign.
    signs = np.sign(np.sum(y * y_ref, axis=0))
    np.testing.assert_allclose(y * signs, y_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    yw = PCA(6, whiten=True).fit(x).transform(x)
    np.testing.assert_allclose(yw.var(axis=0, ddof=1), np.ones(6), rtol=1e-3)


def test_pca_state_round_trip_and_errors():
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    a = PCA(4, whiten=True).fit(x)
    b = PCA(4, whiten=True).load_state(a.state())
    assert set(a.state()) == {"mean_", "components_", "explained_variance_"}
    np.testing.assert_array_equal(a.transform(x), b.transform(x))
    with pytest.raises(NotFittedError, match="--fit-on"):
        PCA(4).transform(x)
    with pytest.raises(ValueError, match="at least 16"):
        PCA(16).fit(x[:10])


def test_postprocess_tokens():
    assert isinstance(parse_postprocess("L2"), L2Normalizer)
    p = parse_postprocess("PCAW128")
    assert isinstance(p, PCA) and p.whiten and p.n_components == 128
    assert parse_postprocess("POW0.5").alpha == 0.5
    assert parse_postprocess("GeM3") is None
    with pytest.raises(ValueError, match="needs a number"):
        parse_postprocess("PCA")


def test_pipeline_string_round_trips_and_fills_default_layer():
    s = "efficientnet_lite0/blocks.5,long384,GeM2.5,L2,PCAW64,L2"
    assert str(PipelineSpec.parse(s)) == s
    assert str(resolve_spec("efficientnet_lite0,long512,MAX,L2")) == "efficientnet_lite0/bn2,long512,MAX,L2"
    assert str(resolve_spec("efficientnet_lite0/head,crop224,L2")) == "efficientnet_lite0/head,crop224,L2"


@pytest.mark.parametrize("text,message", [
    ("efficientnet_lite0/bn2,GeM3,L2", "needs an input size"),
    ("efficientnet_lite0/bn2,long512,GeM3,L3", "unknown pipeline step 'L3'"),
    ("efficientnet_lite0/head,long512,GeM3", "already a vector"),
    ("efficientnet_lite0/bn2,long512,L2", "add a pooling step"),
    ("efficientnet_lite0/bn2,long512,L2,GeM3", "must come before post-processing"),
    ("efficientnet_lite0,long99999,GeM3", "outside 16..4096"),
    ("resnet9000,long512,GeM3", "unknown backbone 'resnet9000'"),
    ("", "empty pipeline"),
])
def test_bad_pipeline_strings_name_the_problem(text, message):
    with pytest.raises(PipelineError, match=message):
        resolve_spec(text)
