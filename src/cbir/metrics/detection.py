"""Object-detection AP: VOC (all-point and 11-point) and COCO (101-point, IoU 0.50:0.95).

Detections are matched to ground truth per image and class in decreasing score order; the
matched flags, pooled over images and sorted by score, give a precision-recall curve per
class whose area under the *precision envelope* (precision made non-increasing in recall) is
the AP. The styles differ in matching and in how the envelope is integrated:

============  ==========================================  ============================
style         matching                                    integration
============  ==========================================  ============================
``voc2010``   each detection takes its highest-IoU GT;    all points (exact area)
              TP if IoU > t and that GT is still free,
              FP otherwise (VOC devkit)
``voc2007``   as voc2010                                  11 recall points 0, .1, .., 1
``coco``      each detection takes the highest-IoU GT     101 recall points 0, .01, .., 1
              still free with IoU >= t (pycocotools),
              up to ``max_det`` detections per image
============  ==========================================  ============================

Ignored ground truth (VOC ``difficult``, COCO ``iscrowd``, and in COCO style boxes outside
the area range) neither needs to be found nor makes a detection false: a detection matched
to it is dropped from the ranking. A crowd box may absorb any number of detections, and its
IoU is intersection over the *detection's* area (COCO). In VOC style crowd boxes are treated
like difficult ones.

A class without (non-ignored) ground truth has no AP: -1 in the per-class output and left
out of every mean, as pycocotools and torchmetrics report it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from cbir.metrics._common import to_numpy

# Exactly pycocotools' grids: the recall points are compared with cumulative TP/npos, so
# even the rounding of linspace matters for bit-equal results.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
COCO_RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
# The VOC2007 devkit's grid (np.arange(0., 1.1, 0.1), so 0.3 is 0.30000000000000004).
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)
COCO_AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}

Style = Literal["coco", "voc2010", "voc2007"]


def interpolated_ap(recall: np.ndarray, precision: np.ndarray,
                    method: Literal["all", "11", "101"] = "all") -> float:
    """AP of one PR curve (points in detection order, recall non-decreasing).

    The precision envelope ``p_env(r) = max_{r' >= r} p(r')`` is integrated exactly
    (``"all"``, VOC2010+) or averaged at 11 (VOC2007) / 101 (COCO) recall points, where a
    point beyond the largest recall reached contributes 0.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if method == "all":
        # VOC devkit: sentinels (0, 0) and (1, 0), envelope, sum of rectangles where recall steps.
        mrec = np.r_[0.0, recall, 1.0]
        mpre = np.maximum.accumulate(np.r_[0.0, precision, 0.0][::-1])[::-1]
        steps = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    points = {"11": VOC07_RECALL_POINTS, "101": COCO_RECALL_POINTS}[method]
    # First curve point with recall >= r carries the envelope value for r; past the end, the 0 sentinel.
    envelope = np.r_[np.maximum.accumulate(precision[::-1])[::-1], 0.0]
    return float(envelope[np.searchsorted(recall, points, side="left")].mean())


# ---------------------------------------------------------------- matching


def _pairwise_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xyxy boxes; for crowd GT, intersection over the detection's area."""
    lt = np.maximum(dt[:, None, :2], gt[None, :, :2])
    rb = np.minimum(dt[:, None, 2:], gt[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    a_dt = (dt[:, 2] - dt[:, 0]) * (dt[:, 3] - dt[:, 1])
    a_gt = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = np.where(crowd[None, :], a_dt[:, None], a_dt[:, None] + a_gt[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_coco(ious: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray,
                thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' greedy matching, all area ranges and IoU thresholds at once.

    ious (D, G) with detections in decreasing score order; gt_ignore (A, G); crowd (G,);
    thresholds (T,) -> (matched (A, T, D), matched-to-ignored (A, T, D)).

    Each detection takes, among GT still free (crowd is never used up) with IoU >= t, the
    best non-ignored one, or failing that the best ignored one; among equal IoUs the last,
    as pycocotools' ``>=`` scan over the GT sorted ignored-last does.
    """
    n_dt, n_gt = ious.shape
    n_a, n_t = gt_ignore.shape[0], thresholds.size
    matched = np.zeros((n_a, n_t, n_dt), dtype=bool)
    to_ignored = np.zeros((n_a, n_t, n_dt), dtype=bool)
    if n_gt == 0 or n_dt == 0:
        return matched, to_ignored
    used = np.zeros((n_a, n_t, n_gt), dtype=bool)
    thr = np.minimum(thresholds, 1 - 1e-10)[None, :, None]
    # Rank key: non-ignored GT above every ignored one, then by IoU (IoU <= 1 < offset 2).
    bonus = np.where(gt_ignore, 0.0, 2.0)[:, None, :]
    rev = slice(None, None, -1)
    for d in range(n_dt):
        ok = (~used | crowd) & (ious[d] >= thr)  # (A, T, G)
        has = ok.any(-1)
        if not has.any():
            continue
        key = np.where(ok, ious[d] + bonus, -np.inf)
        m = n_gt - 1 - np.argmax(key[..., rev], axis=-1)  # last maximum
        matched[..., d] = has
        to_ignored[..., d] = has & np.take_along_axis(gt_ignore[:, None, :], m[..., None], -1)[..., 0]
        a_idx, t_idx = np.nonzero(has)
        used[a_idx, t_idx, m[a_idx, t_idx]] = True
    return matched, to_ignored


def _match_voc(ious: np.ndarray, gt_ignore: np.ndarray,
               thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VOC devkit matching: ious (D, G), detections by decreasing score; gt_ignore (G,);
    -> (TP (T, D), matched-to-ignored (T, D)); the rest are FP.

    A detection looks only at its highest-IoU GT (first on ties, as ``argmax``): if IoU > t
    it is ignored when that GT is difficult, TP when the GT is still free, else a duplicate
    (FP); a detection below the threshold is FP even if another free GT would qualify.
    """
    n_dt, n_gt = ious.shape
    tp = np.zeros((thresholds.size, n_dt), dtype=bool)
    if n_gt == 0 or n_dt == 0:
        return tp, tp.copy()
    best = ious.argmax(axis=1)
    hit = ious[np.arange(n_dt), best][None, :] > thresholds[:, None]  # (T, D)
    ign = hit & gt_ignore[best][None, :]
    used = np.zeros((thresholds.size, n_gt), dtype=bool)
    for d, g in enumerate(best):
        fresh = hit[:, d] & ~ign[:, d] & ~used[:, g]
        tp[:, d] = fresh
        used[:, g] |= fresh
    return tp, ign


# ---------------------------------------------------------------- accumulation


@dataclass
class _ClassRecord:
    """What one class collects over images, for each (area range, threshold)."""

    n_gt: np.ndarray  # (A,) non-ignored GT count
    scores: list = field(default_factory=list)
    ranks: list = field(default_factory=list)  # rank of each detection in its image (max-detections cut)
    tp: list = field(default_factory=list)  # (A, T, D) per image
    ignored: list = field(default_factory=list)  # (A, T, D) per image


def _pr_curve(scores: np.ndarray, tp: np.ndarray, ignored: np.ndarray, n_gt: int):
    """One class pooled over images, at one IoU threshold: (recall, precision) per detection.
    scores (D,), tp (D,), ignored (D,); detections matched to ignored GT leave the ranking."""
    keep = ~ignored
    order = np.argsort(-scores[keep], kind="mergesort")  # stable: ties keep image order
    tps = np.cumsum(tp[keep][order], dtype=np.float64)
    fps = np.arange(1, tps.size + 1, dtype=np.float64) - tps
    # pycocotools' eps, so precision is bit-equal to its own.
    return tps / n_gt, tps / (tps + fps + np.spacing(1))


class DetectionMAP:
    """Streaming detection mAP (torchmetrics' ``MeanAveragePrecision`` interface).

    ``update(preds, targets)``: lists (one entry per image) of dicts

    * preds: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,)
    * targets: ``boxes`` (G, 4), ``labels`` (G,), optional ``iscrowd`` (G,), ``difficult``
      (G,) and ``area`` (G,) (COCO's area-range test uses it; default the box area)

    numpy arrays or tensors, boxes in ``box_format``. ``compute()`` returns a dict:

    * always: ``map`` (mean over classes and IoU thresholds), ``map_per_class`` (K,),
      ``classes`` (K,), ``ap`` (K, T) per class and threshold, ``iou_thresholds`` (T,),
      and ``map_50`` / ``map_75`` when those thresholds are evaluated;
    * COCO style also: ``map_small``, ``map_medium``, ``map_large``, ``mar_{m}`` for each
      ``max_detection_thresholds`` m, ``mar_small``, ``mar_medium``, ``mar_large``.
    """

    def __init__(self, style: Style = "coco", iou_thresholds: Sequence[float] | None = None,
                 max_detection_thresholds: Sequence[int] = (1, 10, 100),
                 box_format: Literal["xyxy", "xywh", "cxcywh"] = "xyxy", num_classes: int | None = None):
        if style not in ("coco", "voc2010", "voc2007"):
            raise ValueError(f"style must be 'coco', 'voc2010' or 'voc2007', got {style!r}")
        self.style = style
        default = COCO_IOU_THRESHOLDS if style == "coco" else (0.5,)
        self.iou_thresholds = np.asarray(default if iou_thresholds is None else iou_thresholds, dtype=float)
        self.max_dets = tuple(sorted(int(m) for m in max_detection_thresholds))
        self.box_format = box_format
        self.num_classes = num_classes
        self.area_ranges = dict(COCO_AREA_RANGES) if style == "coco" else {"all": COCO_AREA_RANGES["all"]}
        self.reset()

    def reset(self) -> None:
        self._images: list[tuple[dict, dict]] = []

    def _boxes(self, b) -> np.ndarray:
        from cbir.metrics.boxes import box_convert  # torch only where a conversion is needed

        arr = to_numpy(b).astype(np.float64).reshape(-1, 4)
        if self.box_format != "xyxy":
            arr = box_convert(arr, self.box_format, "xyxy").numpy()
        return arr

    def update(self, preds, targets) -> None:
        preds, targets = ([x] if isinstance(x, dict) else list(x) for x in (preds, targets))
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} images")
        def vec(d: dict, key: str, dtype: type, default: np.ndarray | None = None) -> np.ndarray:
            return to_numpy(d[key]).reshape(-1).astype(dtype) if key in d else default

        for p, t in zip(preds, targets):
            pb, gb = self._boxes(p["boxes"]), self._boxes(t["boxes"])
            no = np.zeros(gb.shape[0], bool)
            dt = {"boxes": pb, "scores": vec(p, "scores", np.float64), "labels": vec(p, "labels", np.int64)}
            gt = {"boxes": gb, "labels": vec(t, "labels", np.int64), "iscrowd": vec(t, "iscrowd", bool, no),
                  "difficult": vec(t, "difficult", bool, no),
                  "area": vec(t, "area", np.float64, (gb[:, 2] - gb[:, 0]) * (gb[:, 3] - gb[:, 1]))}
            self._images.append((dt, gt))

    # -- per image and class

    def _evaluate_image_class(self, dt: dict, gt: dict, rec: _ClassRecord) -> None:
        top = self.max_dets[-1] if self.style == "coco" else None  # COCO keeps max_det per image
        order = np.argsort(-dt["scores"], kind="mergesort")[:top]
        boxes, scores = dt["boxes"][order], dt["scores"][order]
        ranges = np.asarray(list(self.area_ranges.values()))  # (A, 2)
        crowd = gt["iscrowd"]
        if self.style == "coco":
            area = gt["area"][None, :]
            gt_ignore = crowd | gt["difficult"] | (area < ranges[:, :1]) | (area > ranges[:, 1:])
            ious = _pairwise_iou(boxes, gt["boxes"], crowd)
            tp, ignored = _match_coco(ious, gt_ignore, crowd, self.iou_thresholds)
            # An unmatched detection outside the area range is not counted against the range.
            dt_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :]
            outside = (dt_area < ranges[:, :1]) | (dt_area > ranges[:, 1:])  # (A, D)
            ignored |= ~tp & outside[:, None, :]
            tp &= ~ignored
        else:
            gt_ignore = (crowd | gt["difficult"])[None, :]
            ious = _pairwise_iou(boxes, gt["boxes"], np.zeros_like(crowd))
            tp, ignored = (x[None] for x in _match_voc(ious, gt_ignore[0], self.iou_thresholds))
        rec.scores.append(scores)
        rec.ranks.append(np.arange(scores.size))
        rec.tp.append(tp)
        rec.ignored.append(ignored)
        rec.n_gt += (~gt_ignore).sum(axis=1)

    def _records(self, label: int | None = None) -> dict[int, _ClassRecord]:
        """Every class's matches (or only ``label``'s), collected over the images."""
        records: dict[int, _ClassRecord] = {}
        for dt, gt in self._images:
            for c in np.union1d(dt["labels"], gt["labels"]) if label is None else [label]:
                rec = records.setdefault(int(c), _ClassRecord(np.zeros(len(self.area_ranges), np.int64)))
                d, g = ({k: v[x["labels"] == c] for k, v in x.items()} for x in (dt, gt))
                self._evaluate_image_class(d, g, rec)
        return records

    def compute(self) -> dict:
        n_a, n_t = len(self.area_ranges), self.iou_thresholds.size
        records = self._records()
        classes = np.array(sorted(set(records) | set(range(self.num_classes or 0))), dtype=np.int64)
        max_dets = self.max_dets if self.style == "coco" else (None,)
        # ap/ar: (K, A, T, M), -1 where the class has no ground truth in that area range.
        ap = -np.ones((classes.size, n_a, n_t, len(max_dets)))
        ar = -np.ones_like(ap)
        method = {"coco": "101", "voc2010": "all", "voc2007": "11"}[self.style]
        for k, c in enumerate(classes):
            rec = records.get(int(c))
            if rec is None:
                continue
            scores, ranks = np.concatenate(rec.scores), np.concatenate(rec.ranks)
            tp, ign = np.concatenate(rec.tp, axis=-1), np.concatenate(rec.ignored, axis=-1)
            for m, max_det in enumerate(max_dets):
                sel = ranks < max_det if max_det is not None else slice(None)
                for a, t in itertools.product(np.flatnonzero(rec.n_gt), range(n_t)):  # ranges with GT
                    recall, precision = _pr_curve(scores[sel], tp[a, t, sel], ign[a, t, sel], rec.n_gt[a])
                    ap[k, a, t, m] = interpolated_ap(recall, precision, method)
                    ar[k, a, t, m] = recall[-1] if recall.size else 0.0
        return self._summarize(classes, ap, ar)

    def pr_curve(self, iou_threshold: float = 0.5, label: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) of one class pooled over the images, one point per detection in
        decreasing score order, at one IoU threshold (all areas, every detection kept)."""
        t = int(np.argmin(np.abs(self.iou_thresholds - iou_threshold)))
        rec = self._records(label).get(label)
        if rec is None or rec.n_gt[0] == 0:
            return np.zeros(0), np.zeros(0)
        return _pr_curve(np.concatenate(rec.scores), np.concatenate(rec.tp, axis=-1)[0, t],
                         np.concatenate(rec.ignored, axis=-1)[0, t], int(rec.n_gt[0]))

    def _summarize(self, classes: np.ndarray, ap: np.ndarray, ar: np.ndarray) -> dict:
        def mean(x: np.ndarray) -> float:
            v = x[x > -1]
            return float(v.mean()) if v.size else -1.0

        last = ap.shape[-1] - 1  # the largest max-detections setting
        area_names = list(self.area_ranges)
        out: dict = {
            "map": mean(ap[:, 0, :, last]),
            "classes": classes,
            "iou_thresholds": self.iou_thresholds.copy(),
            "ap": ap[:, 0, :, last].copy(),
            "map_per_class": np.array([mean(ap[k, 0, :, last]) for k in range(classes.size)]),
        }
        for name, thr in (("map_50", 0.5), ("map_75", 0.75)):
            hit = np.flatnonzero(np.isclose(self.iou_thresholds, thr))
            if hit.size:
                out[name] = mean(ap[:, 0, hit[0], last])
        if self.style == "coco":
            for a, name in enumerate(area_names[1:], start=1):
                out[f"map_{name}"] = mean(ap[:, a, :, last])
            for m, max_det in enumerate(self.max_dets):
                out[f"mar_{max_det}"] = mean(ar[:, 0, :, m])
            for a, name in enumerate(area_names[1:], start=1):
                out[f"mar_{name}"] = mean(ar[:, a, :, last])
            per_class = [mean(ar[k, 0, :, last]) for k in range(classes.size)]
            out[f"mar_{self.max_dets[-1]}_per_class"] = np.array(per_class)
        return out


def mean_average_precision(preds, targets, **kwargs) -> dict:
    """One-shot :class:`DetectionMAP`: ``DetectionMAP(**kwargs)`` updated once, computed."""
    metric = DetectionMAP(**kwargs)
    metric.update(preds, targets)
    return metric.compute()
