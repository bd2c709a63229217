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


# --- MaxBoxAccV2 and PxAP over a set of CAMs, against naive loops -----------------------------


def _naive_components(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """4-connected components by flood fill -> xyxy boxes (pixel edges)."""
    h, w = binary.shape
    seen = np.zeros_like(binary, bool)
    boxes = []
    for y in range(h):
        for x in range(w):
            if binary[y, x] and not seen[y, x]:
                stack, ys, xs = [(y, x)], [], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    ys.append(cy)
                    xs.append(cx)
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and binary[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                boxes.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


def _naive_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _blob_cams(r, n):
    cams, gts = [], []
    for _ in range(n):
        h, w = r.integers(12, 30, 2)
        yy, xx = np.mgrid[:h, :w]
        cam = r.random((h, w)) * 0.3
        boxes = []
        for _ in range(r.integers(1, 4)):
            cy, cx, s = r.uniform(0, h), r.uniform(0, w), r.uniform(1.5, 5)
            cam = np.maximum(cam, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
            boxes.append([cx - 2 * s, cy - 2 * s, cx + 2 * s, cy + 2 * s])
        cams.append(cam / cam.max())
        gts.append(np.asarray(boxes))
    return cams, gts


def test_max_box_acc_v2_matches_naive_loop():
    from cbir.metrics.localization import max_box_acc_v2

    r = np.random.default_rng(1)
    cams, gts = _blob_cams(r, 12)
    taus = np.linspace(0.05, 0.95, 7)
    out = max_box_acc_v2(cams, gts, cam_thresholds=taus)
    deltas = (0.3, 0.5, 0.7)
    acc = np.zeros((len(taus), 3))
    for cam, gt in zip(cams, gts):
        for k, t in enumerate(taus):
            ious = [_naive_iou(b, g) for b in _naive_components(cam >= t) for g in gt]
            best = max(ious, default=0.0)
            for d, delta in enumerate(deltas):
                acc[k, d] += best >= delta
    acc /= len(cams)
    np.testing.assert_allclose(out["box_acc"], acc)
    np.testing.assert_allclose(out["max_box_acc"], acc.max(0))
    assert out["max_box_acc_v2"] == pytest.approx(acc.max(0).mean())
    np.testing.assert_allclose(out["best_threshold"], taus[acc.argmax(0)])
    assert 0 < out["max_box_acc_v2"] <= 1


def test_pxap_matches_naive_loop():
    from cbir.metrics.localization import pxap

    r = np.random.default_rng(2)
    cams, gts = _blob_cams(r, 6)
    masks = []
    for cam, gt in zip(cams, gts):
        m = np.zeros(cam.shape, bool)
        for x0, y0, x1, y1 in gt:
            m[max(0, int(y0)):max(0, int(y1)), max(0, int(x0)):max(0, int(x1))] = True
        masks.append(m)
    k = 20
    out = pxap(cams, masks, num_thresholds=k)
    bins = np.concatenate([np.clip(np.floor(c.ravel() * k), 0, k - 1) for c in cams])
    fg = np.concatenate([m.ravel() for m in masks])
    prec, rec = [], []
    for t in range(k - 1, -1, -1):  # thresholds high to low
        pos = bins >= t
        tp = (pos & fg).sum()
        prec.append(tp / pos.sum() if pos.sum() else 1.0)
        rec.append(tp / fg.sum())
    ap, last_r = 0.0, 0.0
    for p, rr in zip(prec, rec):
        ap += (rr - last_r) * p
        last_r = rr
    assert out["pxap"] == pytest.approx(ap)
    ious = [((bins >= t) & fg).sum() / ((bins >= t) | fg).sum() for t in range(k)]
    assert out["mask_iou"] == pytest.approx(max(ious))
