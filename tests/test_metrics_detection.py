"""Detection AP against pycocotools (COCO style), torchmetrics, and the VOC devkit's
``voc_eval`` / ``voc_ap`` written out naively here (torchmetrics has no VOC-style AP)."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

from cbir.metrics.detection import (
    COCO_IOU_THRESHOLDS,
    COCO_RECALL_POINTS,
    DetectionMAP,
    interpolated_ap,
    mean_average_precision,
)


def make_scene(seed: int, n_images: int = 25, n_classes: int = 4, crowd: bool = True, difficult: bool = False):
    """Random images with GT of all sizes (small/medium/large), jittered true detections,
    duplicates and false positives, continuous scores."""
    r = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n_images):
        g = r.integers(0, 7) if i % 7 else 0  # some images without GT
        xy = r.random((g, 2)) * 400
        wh = np.exp(r.uniform(np.log(8), np.log(220), (g, 2)))
        gt = np.c_[xy, xy + wh]
        gl = r.integers(0, n_classes - 1, g)  # the last class never has GT
        t = {"boxes": gt, "labels": gl}
        if crowd:
            t["iscrowd"] = r.random(g) < 0.1
        if difficult:
            t["difficult"] = r.random(g) < 0.2
        boxes, labels = [], []
        for b, lab in zip(gt, gl):
            for _ in range(r.integers(0, 3)):  # 0, 1 or 2 (duplicate) detections per object
                wh_ = b[2:] - b[:2]
                jit = r.normal(0, 0.12, 4) * np.r_[wh_, wh_]
                boxes.append(b + jit)
                labels.append(lab if r.random() < 0.9 else r.integers(0, n_classes))
        for _ in range(r.integers(0, 4) if i % 5 else 0):  # false positives; some images none
            xy_ = r.random(2) * 400
            boxes.append(np.r_[xy_, xy_ + r.uniform(5, 150, 2)])
            labels.append(r.integers(0, n_classes))
        boxes = np.array(boxes).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        preds.append({"boxes": boxes, "scores": r.random(len(boxes)), "labels": np.array(labels, dtype=int)})
        targets.append(t)
    return preds, targets


def coco_reference(preds, targets, n_classes, max_dets=(1, 10, 100), iou_thrs=None):
    """pycocotools COCOeval on the same data: returns (stats (12,), precision, recall)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i, "width": 640, "height": 640})
        crowd = t.get("iscrowd", np.zeros(len(t["labels"]), bool))
        for b, lab, c in zip(t["boxes"], t["labels"], crowd):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], w, h],
                 "area": w * h, "iscrowd": int(c)}
            )
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            dets.append({"image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(n_classes)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = list(max_dets)
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs)
        ev.evaluate()
        ev.accumulate()
        if iou_thrs is None and tuple(max_dets) == (1, 10, 100):
            ev.summarize()
    return getattr(ev, "stats", None), ev.eval["precision"], ev.eval["recall"]


STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
             "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True)])
def test_coco_matches_pycocotools(seed, ties):
    preds, targets = make_scene(seed)
    if ties:  # equal scores within and across images: the stable orderings must agree
        for p in preds:
            p["scores"] = np.round(p["scores"], 1)
    stats, precision, recall = coco_reference(preds, targets, 4)
    m = DetectionMAP("coco")
    m.update(preds[:10], targets[:10])  # streaming: two batches
    m.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds[10:]],
             [{k: torch.as_tensor(v) for k, v in t.items()} for t in targets[10:]])
    out = m.compute()
    np.testing.assert_allclose([out[k] for k in STAT_KEYS], stats, atol=1e-12)
    # Per class and threshold: pycocotools' precision averaged over the 101 recall points.
    ref_ap = np.where((precision[:, :, :, 0, -1] > -1).all(1), precision[:, :, :, 0, -1].mean(1), -1).T
    np.testing.assert_allclose(out["ap"], ref_ap, atol=1e-12)
    assert out["map_per_class"][3] == -1  # the class that has detections but no GT


def test_coco_max_detections_and_custom_thresholds_match_pycocotools():
    preds, targets = make_scene(5, n_images=12, crowd=True)
    _, precision, recall = coco_reference(preds, targets, 4, max_dets=(1, 2, 3), iou_thrs=[0.3, 0.6])
    out = mean_average_precision(preds, targets, style="coco", max_detection_thresholds=(1, 2, 3), iou_thresholds=[0.3, 0.6])
    valid = precision[0, 0, :, 0, -1] > -1
    np.testing.assert_allclose(out["ap"][valid], precision[:, :, valid, 0, -1].mean(1).T, atol=1e-12)
    for m_idx, md in enumerate((1, 2, 3)):
        r = recall[:, :, 0, m_idx]
        assert out[f"mar_{md}"] == pytest.approx(r[r > -1].mean(), abs=1e-12)


def test_coco_matches_torchmetrics_and_box_formats():
    from torchmetrics.detection import MeanAveragePrecision

    preds, targets = make_scene(7, n_images=15)
    to_t = lambda d: {k: torch.as_tensor(v) for k, v in d.items()}
    # torchmetrics' default grids come from float32 torch.linspace (0.07 -> 0.0700000003):
    # a recall of exactly 7/100 then falls on the other side. Give it pycocotools' grids.
    tm = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools",
        iou_thresholds=COCO_IOU_THRESHOLDS.tolist(), rec_thresholds=COCO_RECALL_POINTS.tolist(),
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        tm.update([to_t(p) for p in preds], [to_t(t) for t in targets])
        ref = tm.compute()
    out = mean_average_precision(preds, targets)
    for k in STAT_KEYS:
        assert out[k] == pytest.approx(float(ref[k]), abs=1e-6), k
    np.testing.assert_allclose(out["map_per_class"][: len(ref["map_per_class"])], ref["map_per_class"].numpy(), atol=1e-6)
    # The same boxes given as cxcywh give the same result.
    cx = [dict(p, boxes=np.c_[(p["boxes"][:, :2] + p["boxes"][:, 2:]) / 2, p["boxes"][:, 2:] - p["boxes"][:, :2]]) for p in preds]
    ct = [dict(t, boxes=np.c_[(t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2, t["boxes"][:, 2:] - t["boxes"][:, :2]]) for t in targets]
    out2 = mean_average_precision(cx, ct, box_format="cxcywh")
    assert out2["map"] == pytest.approx(out["map"], abs=1e-9)


# ---------------------------------------------------------------- VOC


def devkit_voc_ap(rec, prec, use_07_metric):
    """voc_ap of the py-faster-rcnn VOC devkit port, loops as written there."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_voc_eval(preds, targets, cls, ovthresh, use_07_metric):
    """voc_eval of the devkit port (continuous IoU, no +1), for one class; None without GT."""
    recs, npos = {}, 0
    for i, t in enumerate(targets):
        sel = np.asarray(t["labels"]) == cls
        diff = np.asarray(t.get("difficult", np.zeros(len(t["labels"]), bool)))[sel]
        recs[i] = {"bbox": np.asarray(t["boxes"])[sel], "difficult": diff, "det": [False] * int(sel.sum())}
        npos += int((~diff).sum())
    image_ids, conf, bbs = [], [], []
    for i, p in enumerate(preds):
        for b, s, lab in zip(p["boxes"], p["scores"], p["labels"]):
            if lab == cls:
                image_ids.append(i), conf.append(s), bbs.append(b)
    if npos == 0:
        return None
    order = np.argsort(-np.array(conf), kind="mergesort")
    nd = len(order)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = recs[image_ids[order[d]]]
        bb = bbs[order[d]]
        ovmax, BBGT = -np.inf, R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin, 0.0)
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric)


@pytest.mark.parametrize("style", ["voc2010", "voc2007"])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_voc_matches_devkit(style, seed, thr):
    preds, targets = make_scene(seed, crowd=False, difficult=True)
    out = mean_average_precision(preds, targets, style=style, iou_thresholds=[thr])
    refs = [devkit_voc_eval(preds, targets, c, thr, style == "voc2007") for c in range(4)]
    assert refs[3] is None and out["map_per_class"][3] == -1
    np.testing.assert_allclose(out["map_per_class"][:3], refs[:3], atol=1e-12)
    assert out["map"] == pytest.approx(np.mean(refs[:3]), abs=1e-12)
    assert "map_small" not in out


def test_voc_duplicate_is_fp_even_if_another_gt_is_free():
    # Two GT; both detections overlap GT0 most. VOC: second is a duplicate (FP).
    # COCO: the second takes the still-free GT1 if IoU >= t.
    gt = {"boxes": np.array([[0.0, 0, 10, 10], [2.0, 0, 12, 10]]), "labels": np.array([0, 0])}
    pr = {"boxes": np.array([[0.0, 0, 10, 10], [0.5, 0, 10.5, 10]]), "scores": np.array([0.9, 0.8]), "labels": np.array([0, 0])}
    voc = mean_average_precision([pr], [gt], style="voc2010")
    coco = mean_average_precision([pr], [gt], style="coco", iou_thresholds=[0.5])
    assert voc["map"] == pytest.approx(0.5)
    assert coco["map"] == pytest.approx(1.0)


# ---------------------------------------------------------------- edge cases and interpolation


@pytest.mark.parametrize("style", ["coco", "voc2010", "voc2007"])
def test_empty_predictions_and_no_ground_truth(style):
    _, targets = make_scene(1)
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)} for _ in targets]
    out = mean_average_precision(empty, targets, style=style)
    assert out["map"] == 0.0
    assert out["map_50"] == 0.0
    preds, _ = make_scene(1)
    no_gt = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)} for _ in preds]
    out = mean_average_precision(preds, no_gt, style=style)
    assert out["map"] == -1.0 and (out["map_per_class"] == -1).all()
    out = mean_average_precision(empty, no_gt, style=style)
    assert out["map"] == -1.0 and out["classes"].size == 0


@pytest.mark.parametrize("style", ["coco", "voc2010", "voc2007"])
def test_single_class_perfect_and_reset(style):
    gt = {"boxes": np.array([[0.0, 0, 50, 50], [100, 100, 200, 180]]), "labels": np.array([0, 0])}
    pr = {"boxes": gt["boxes"].copy(), "scores": np.array([0.6, 0.7]), "labels": np.array([0, 0])}
    m = DetectionMAP(style)
    m.update([pr], [gt])
    out = m.compute()
    assert out["map"] == pytest.approx(1.0)
    m.reset()
    assert m.compute()["map"] == -1.0


def test_crowd_absorbs_detections_and_ignores_them():
    # One real GT and one crowd region; detections inside the crowd are neither TP nor FP.
    gt = {"boxes": np.array([[0.0, 0, 10, 10], [50, 50, 150, 150]]), "labels": np.array([0, 0]), "iscrowd": np.array([False, True])}
    pr = {"boxes": np.array([[60.0, 60, 70, 70], [0, 0, 10, 10], [80, 80, 90, 90]]),
          "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([0, 0, 0])}
    out = mean_average_precision([pr], [gt], style="coco", iou_thresholds=[0.5])
    assert out["map"] == pytest.approx(1.0)
    stats, precision, _ = coco_reference([pr], [gt], 1, iou_thrs=[0.5])
    assert out["map"] == pytest.approx(precision[0, :, 0, 0, -1].mean())


def test_interpolated_ap_hand_computed():
    # Detections TP, FP, TP with 2 GT: (R, P) = (.5, 1), (.5, .5), (1, 2/3).
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert interpolated_ap(rec, prec, "all") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 11-point: r = 0..0.5 -> 1 (6 points), r = 0.6..1.0 -> 2/3 (5 points).
    assert interpolated_ap(rec, prec, "11") == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert interpolated_ap(rec, prec, "101") == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert interpolated_ap(np.zeros(0), np.zeros(0), "all") == 0.0
    assert interpolated_ap(np.zeros(0), np.zeros(0), "101") == 0.0
