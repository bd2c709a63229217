"""WSOL localization metrics against naive loops (IoU from torchvision.ops, PxAP from
scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchvision.ops import box_iou

from cbir.metrics.localization import LocalizationAccuracy, MaskLocalization, max_box_iou


def rand_boxes(r, n):
    xy = r.random((n, 2)) * 100
    return np.c_[xy, xy + r.uniform(5, 60, (n, 2))]


def test_box_accuracy_matches_naive_loop():
    r = np.random.default_rng(0)
    n, t = 40, 5
    gts = [rand_boxes(r, r.integers(1, 4)) for _ in range(n)]
    # Predictions: jittered first GT box, more jitter for higher "CAM thresholds".
    pred = np.stack([np.stack([g[0] + r.normal(0, 4 + 6 * k, 4) for k in range(t)]) for g in gts])
    pred[..., 2:] = np.maximum(pred[..., 2:], pred[..., :2] + 1)
    pl, gl = r.integers(0, 3, n), r.integers(0, 3, n)
    m = LocalizationAccuracy(0.5)
    m.update(torch.as_tensor(pred[:15]), gts[:15], torch.as_tensor(pl[:15]), gl[:15])
    m.update(pred[15:], gts[15:], pl[15:], gl[15:])
    out = m.compute()
    hits = np.zeros((n, t), bool)
    for i in range(n):
        for k in range(t):
            iou = box_iou(torch.as_tensor(pred[i, k : k + 1]), torch.as_tensor(gts[i])).max().item()
            hits[i, k] = iou >= 0.5
    gt_known = hits.mean(0)
    best = int(np.argmax(gt_known))
    assert out["best_threshold_index"] == best
    assert out["gt_known"] == pytest.approx(gt_known[best])
    assert out["top1"] == pytest.approx(np.mean(hits[:, best] & (pl == gl)))
    np.testing.assert_allclose(out["gt_known_per_threshold"], gt_known)


def test_single_box_per_image_and_edge_cases():
    gts = [np.array([[0.0, 0, 10, 10]]), np.array([[0.0, 0, 10, 10], [20, 20, 30, 30]]), np.zeros((0, 4))]
    pred = np.array([[0.0, 0, 10, 10], [21, 21, 30, 30], [0, 0, 5, 5]])
    np.testing.assert_allclose(max_box_iou(pred, gts), [1.0, 0.81, 0.0])
    m = LocalizationAccuracy()
    m.update(pred, gts)  # no labels: top-1 undefined
    out = m.compute()
    assert out["gt_known"] == pytest.approx(2 / 3)
    assert np.isnan(out["top1"])
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_mask_iou_and_pxap_match_naive():
    r = np.random.default_rng(1)
    masks = r.random((6, 20, 20)) < 0.3
    cams = np.clip(masks * 0.4 + r.random(masks.shape) * 0.7, 0, 1)
    ignore = r.random(masks.shape) < 0.05
    m = MaskLocalization(num_thresholds=50)
    m.update(torch.as_tensor(cams[:3]), torch.as_tensor(masks[:3]), ignore[:3])
    m.update(cams[3:], masks[3:], ignore[3:])
    out = m.compute()
    keep = ~ignore
    ious = []
    for tau in np.arange(50) / 50:
        pm = cams >= tau
        tp = np.sum(pm & masks & keep)
        fp = np.sum(pm & ~masks & keep)
        fn = np.sum(~pm & masks & keep)
        ious.append(tp / (tp + fp + fn))
    np.testing.assert_allclose(out["iou_per_threshold"], ious, atol=1e-12)
    assert out["mask_iou"] == pytest.approx(max(ious))
    assert out["best_threshold"] == pytest.approx(np.argmax(ious) / 50)
    # PxAP: pixel AP with the CAM quantised to the threshold grid.
    quantised = np.floor(cams[keep] * 50)
    assert out["pxap"] == pytest.approx(average_precision_score(masks[keep], quantised), abs=1e-12)


def test_mask_edge_cases():
    m = MaskLocalization(10)
    m.update(np.ones((4, 4)), np.ones((4, 4), bool))
    out = m.compute()
    assert out["mask_iou"] == 1.0 and out["pxap"] == pytest.approx(1.0)
    m.reset()
    m.update(np.zeros((4, 4)), np.zeros((4, 4), bool))  # no foreground at all
    out = m.compute()
    assert out["mask_iou"] == 0.0 and np.isnan(out["pxap"])
