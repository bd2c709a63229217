"""Classification metrics against scikit-learn, on random and edge-case inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from cbir.metrics import classification as C


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    # sklearn warns on zero division / missing positives; the edge cases here do that on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sk_prf(y, p, n, average):
    return skm.precision_recall_fscore_support(
        y, p, labels=np.arange(n), average=average, zero_division=0
    )[:3]


CASES = {
    "random": lambda r: (r.integers(0, 5, 300), r.integers(0, 5, 300), 5),
    "skewed": lambda r: (r.choice(5, 300, p=[0.7, 0.2, 0.05, 0.05, 0.0]), r.integers(0, 4, 300), 5),
    "perfect": lambda r: (np.arange(30) % 3, np.arange(30) % 3, 3),
    "single_class": lambda r: (np.zeros(10, int), np.zeros(10, int), 1),
    "one_sample": lambda r: (np.array([2]), np.array([1]), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_confusion_matrix_and_prf_match_sklearn(case):
    y, p, n = CASES[case](np.random.default_rng(0))
    metric = C.ClassificationMetrics(n)
    # Streaming over uneven batches, mixing numpy and torch.
    for i, (a, b) in enumerate([(0, 7), (7, 100), (100, len(y))]):
        if a >= len(y):
            break
        yy, pp = y[a:b], p[a:b]
        metric.update(torch.as_tensor(pp) if i % 2 else pp, torch.as_tensor(yy) if i % 2 else yy)
    out = metric.compute()
    np.testing.assert_array_equal(out["confusion_matrix"], skm.confusion_matrix(y, p, labels=np.arange(n)))
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    prf = sk_prf(y, p, n, None)
    for name, ref in zip(("precision", "recall", "f1"), prf):
        np.testing.assert_allclose(out[name], ref, atol=1e-12)
    for avg in ("macro", "micro", "weighted"):
        for name, ref in zip(("precision", "recall", "f1"), sk_prf(y, p, n, avg)):
            assert out[f"{name}_{avg}"] == pytest.approx(ref, abs=1e-12), (name, avg)


def test_scores_are_argmaxed_and_binary_probabilities_thresholded():
    r = np.random.default_rng(1)
    logits = r.normal(size=(50, 4))
    y = r.integers(0, 4, 50)
    m = C.ClassificationMetrics(4)
    m.update(torch.as_tensor(logits), torch.as_tensor(y))
    np.testing.assert_array_equal(m.compute()["confusion_matrix"], skm.confusion_matrix(y, logits.argmax(1), labels=range(4)))
    prob = r.random(40)
    yb = r.integers(0, 2, 40)
    m = C.ClassificationMetrics(2)
    m.update(prob, yb)
    assert m.compute()["f1"][1] == pytest.approx(skm.f1_score(yb, prob >= 0.5))
    m.reset()
    assert m.compute()["confusion_matrix"].sum() == 0
    assert np.isnan(m.compute()["accuracy"])  # nothing seen


def test_confusion_matrix_validates_labels():
    with pytest.raises(ValueError):
        C.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        C.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError):
        C.confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)
    with pytest.raises(TypeError):
        C.confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 3)
    cm = C.confusion_matrix(np.array([0, -1, 2]), np.array([0, 1, 2]), 3, ignore_index=-1)
    assert cm.sum() == 2 and cm[0, 0] == 1 and cm[2, 2] == 1


# ---------------------------------------------------------------- PR curve and AP


def test_precision_recall_curve_matches_sklearn():
    r = np.random.default_rng(2)
    y = r.integers(0, 2, 200)
    s = np.round(r.random(200), 2)  # rounded: many ties
    for ours, ref in zip(C.precision_recall_curve(y, s), skm.precision_recall_curve(y, s)):
        np.testing.assert_allclose(ours, ref, atol=1e-12)
    w = r.integers(0, 4, 200)
    for ours, ref in zip(C.precision_recall_curve(y, s, w), skm.precision_recall_curve(y, s, sample_weight=w)):
        np.testing.assert_allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize(
    "y,s",
    [
        ([0, 0, 0], [0.1, 0.4, 0.3]),  # no positives
        ([1, 1, 1], [0.1, 0.4, 0.3]),  # all positives
        ([1], [0.5]),  # one sample
        ([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5]),  # all tied
        ([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5]),
    ],
)
def test_binary_ap_edge_cases_match_sklearn(y, s):
    assert C.average_precision_score(np.array(y), np.array(s)) == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-12
    )
    for ours, ref in zip(C.precision_recall_curve(y, s), skm.precision_recall_curve(y, s)):
        np.testing.assert_allclose(ours, ref)


def test_binary_ap_hand_computed():
    # Ranked labels 1, 0, 1: precision at the two positives 1 and 2/3 -> AP = (1 + 2/3) / 2.
    assert C.average_precision_score([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(5 / 6)


@pytest.mark.parametrize("average", [None, "macro", "micro", "weighted"])
def test_multiclass_and_multilabel_ap_match_sklearn(average):
    r = np.random.default_rng(3)
    scores = r.random((120, 4))
    labels = r.integers(0, 4, 120)
    onehot = np.eye(4)[labels]
    ref = skm.average_precision_score(onehot, scores, average=average)
    np.testing.assert_allclose(C.average_precision_score(labels, scores, average=average), ref, atol=1e-12)
    multilabel = (r.random((120, 4)) < 0.3).astype(int)
    multilabel[:, 3] = 0  # a class without positives
    ref = skm.average_precision_score(multilabel, scores, average=average)
    np.testing.assert_allclose(C.average_precision_score(multilabel, scores, average=average), ref, atol=1e-12)


def test_streaming_average_precision():
    r = np.random.default_rng(4)
    scores = r.random((90, 3))
    labels = r.integers(0, 3, 90)
    m = C.AveragePrecision(average=None)
    for i in range(0, 90, 25):
        m.update(torch.as_tensor(scores[i : i + 25]), torch.as_tensor(labels[i : i + 25]))
    np.testing.assert_allclose(m.compute(), skm.average_precision_score(np.eye(3)[labels], scores, average=None))
    p, rc, t = m.curve(class_index=1)
    for ours, ref in zip((p, rc, t), skm.precision_recall_curve(labels == 1, scores[:, 1])):
        np.testing.assert_allclose(ours, ref)
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint16])
def test_confusion_matrix_dtypes_ignore_and_chunks(dtype):
    # > 65536 elements: several bincount chunks; a negative or a large ignore_index.
    r = np.random.default_rng(5)
    t = r.integers(0, 5, 150_000).astype(dtype)
    p = r.integers(0, 5, 150_000).astype(dtype)
    ignore = -1 if np.issubdtype(dtype, np.signedinteger) else 255
    t[::7] = ignore
    valid = t != ignore
    expected = skm.confusion_matrix(t[valid], p[valid], labels=np.arange(5))
    np.testing.assert_array_equal(C.confusion_matrix(t, p, 5, ignore_index=ignore), expected)
    np.testing.assert_array_equal(C.confusion_matrix(torch.as_tensor(t), torch.as_tensor(p), 5, ignore), expected)
