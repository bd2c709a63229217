"""Weakly supervised object localization (WSOL) metrics (Zhou et al. 2016; Choe et al. 2020).

Box level: GT-known localization accuracy is the fraction of images whose predicted box has
IoU >= delta (0.5) with some ground-truth box of the image (the class assumed known); top-1
also needs the top-1 class right. With one box per CAM threshold (N, T, 4) both are reported
at the threshold with the best GT-known accuracy (``MaxBoxAcc`` of Choe et al.).

Pixel level: the CAM, normalised to [0, 1], is thresholded at tau in {0, 1/K, ..., (K-1)/K};
mask IoU at the best threshold is max_tau TP/(TP+FP+FN), pixels pooled over the dataset, and
PxAP the AP of the pixel-wise precision-recall curve. The pixels are kept as two histograms
of the quantised CAM (GT foreground and background), one ``bincount`` each per batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cbir.metrics._common import safe_divide, to_numpy
from cbir.metrics.boxes import box_iou
from cbir.metrics.classification import average_precision_score


def max_box_iou(pred_boxes, gt_boxes: Sequence) -> np.ndarray:
    """Best IoU of each predicted box with its image's ground-truth boxes: pred_boxes (N, 4) or
    (N, T, 4) xyxy; gt_boxes a length-N sequence of (M_i, 4), or an (N, 4) / (N, M, 4) array
    -> (N,) or (N, T); 0 for an image without ground truth."""
    pred = to_numpy(pred_boxes).astype(np.float64)
    squeeze = pred.ndim == 2
    pred = pred[:, None, :] if squeeze else pred
    gts = to_numpy(gt_boxes) if not isinstance(gt_boxes, (list, tuple)) else gt_boxes
    if len(gts) != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions for {len(gts)} images")
    out = np.zeros(pred.shape[:2])
    for i, g in enumerate(gts):
        g = to_numpy(g).astype(np.float64).reshape(-1, 4)
        if g.shape[0]:
            out[i] = box_iou(pred[i], g).max(dim=1).values.numpy()
    return out[:, 0] if squeeze else out


class LocalizationAccuracy:
    """Streaming GT-known and top-1 localization accuracy.

    ``update(pred_boxes, gt_boxes, pred_labels=None, gt_labels=None)``: pred_boxes (N, 4) or
    (N, T, 4) (one box per CAM threshold), gt_boxes a length-N sequence of (M_i, 4);
    labels (N,) (top-1 predicted class, true class) are needed for top-1 accuracy.
    ``compute()`` -> ``gt_known``, ``top1`` (at the best threshold), ``best_threshold_index``
    and the per-threshold curves ``gt_known_per_threshold``, ``top1_per_threshold`` (T,).
    """

    def __init__(self, iou_threshold: float = 0.5):
        self.iou_threshold = iou_threshold
        self.reset()

    def reset(self) -> None:
        self._hits: list[np.ndarray] = []
        self._correct: list[np.ndarray] = []

    def update(self, pred_boxes, gt_boxes, pred_labels=None, gt_labels=None) -> None:
        iou = max_box_iou(pred_boxes, gt_boxes)
        hits = (iou >= self.iou_threshold).reshape(iou.shape[0], -1)  # (N, T)
        self._hits.append(hits)
        if pred_labels is None or gt_labels is None:
            correct = np.full(hits.shape[0], np.nan)  # unknown: top-1 stays undefined
        else:
            correct = (to_numpy(pred_labels).reshape(-1) == to_numpy(gt_labels).reshape(-1)).astype(float)
        self._correct.append(correct)

    def compute(self) -> dict:
        if not self._hits:
            raise ValueError("no data: call update() first")
        hits = np.concatenate(self._hits).astype(np.float64)
        correct = np.concatenate(self._correct)
        gt_known = hits.mean(axis=0)
        top1 = (hits * correct[:, None]).mean(axis=0)  # NaN if any label was missing
        best = int(np.argmax(gt_known))
        return {
            "gt_known": float(gt_known[best]),
            "top1": float(top1[best]),
            "best_threshold_index": best,
            "gt_known_per_threshold": gt_known,
            "top1_per_threshold": top1,
        }


class MaskLocalization:
    """Streaming pixel-level WSOL scores: mask IoU at the best CAM threshold, and PxAP.

    ``update(cams, gt_masks, ignore=None)``: cams (N, H, W) in [0, 1] (values outside are
    clipped), gt_masks (N, H, W) boolean foreground, optional ignore (N, H, W) boolean.
    A pixel is foreground at threshold k/K when ``floor(cam * K) >= k``.
    """

    def __init__(self, num_thresholds: int = 100):
        self.num_thresholds = int(num_thresholds)
        self.thresholds = np.arange(self.num_thresholds) / self.num_thresholds
        self.reset()

    def reset(self) -> None:
        self.hist_fg = np.zeros(self.num_thresholds, dtype=np.int64)
        self.hist_bg = np.zeros(self.num_thresholds, dtype=np.int64)

    def update(self, cams, gt_masks, ignore=None) -> None:
        k = self.num_thresholds
        cam = to_numpy(cams).astype(np.float64).reshape(-1)
        fg = to_numpy(gt_masks).astype(bool).reshape(-1)
        if cam.shape != fg.shape:
            raise ValueError(f"cams and masks sizes differ: {cam.size} vs {fg.size}")
        bins = np.clip(np.floor(cam * k), 0, k - 1).astype(np.intp)
        if ignore is not None:
            keep = ~to_numpy(ignore).astype(bool).reshape(-1)
            bins, fg = bins[keep], fg[keep]
        self.hist_fg += np.bincount(bins[fg], minlength=k)
        self.hist_bg += np.bincount(bins[~fg], minlength=k)

    def compute(self) -> dict:
        # Pixels at or above threshold k: reversed cumulative histograms.
        tp = self.hist_fg[::-1].cumsum()[::-1]
        fp = self.hist_bg[::-1].cumsum()[::-1]
        fn = self.hist_fg.sum() - tp
        iou = safe_divide(tp, tp + fp + fn, float("nan"))
        best = int(np.nanargmax(iou)) if np.any(~np.isnan(iou)) else 0
        # PxAP is the uninterpolated AP of pixels scored by their bin: the histograms are the
        # pixels, weighted by count, so the classification AP is reused as is.
        k = np.arange(self.num_thresholds)
        pxap = float("nan")
        if self.hist_fg.sum() > 0:
            target, scores = np.r_[np.ones_like(k), np.zeros_like(k)], np.r_[k, k].astype(np.float64)
            weight = np.r_[self.hist_fg, self.hist_bg]
            pxap = float(average_precision_score(target, scores, sample_weight=weight))
        return {
            "mask_iou": float(iou[best]),
            "best_threshold": float(self.thresholds[best]),
            "iou_per_threshold": iou,
            "pxap": pxap,
        }


def cam_boxes(cam, thresholds: Sequence[float], connectivity: int = 1) -> list[np.ndarray]:
    """One ``(K_t, 4)`` array per threshold: the xyxy box of each connected component of
    ``cam >= t`` (pixel edges: a component spanning columns 3..5 has x0 = 3, x1 = 6)."""
    from scipy import ndimage

    cam = to_numpy(cam).astype(np.float64)
    structure = ndimage.generate_binary_structure(2, connectivity)
    out = []
    for t in thresholds:
        objects = ndimage.find_objects(ndimage.label(cam >= t, structure)[0])
        boxes = [(cols.start, rows.start, cols.stop, rows.stop) for rows, cols in filter(None, objects)]
        out.append(np.asarray(boxes, np.float64).reshape(-1, 4))
    return out


def max_box_acc_v2(cams: Sequence, gt_boxes: Sequence, iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
                   cam_thresholds: Sequence[float] | None = None) -> dict:
    """MaxBoxAccV2 (Choe et al. 2020) over a set of images.

    ``cams``: per image a ``(H_i, W_i)`` map in [0, 1]; ``gt_boxes``: per image ``(M_i, 4)``
    xyxy in the CAM's pixel coordinates. At CAM threshold tau an image is correct at IoU delta
    when the box of some connected component of ``cam >= tau`` (the multi-contour variant) has
    IoU >= delta with some ground-truth box. Returns ``box_acc`` (T, D) (fraction correct),
    ``max_box_acc`` (D,) and ``best_threshold`` (D,) (best over tau per delta),
    ``max_box_acc_v2`` (their mean), ``thresholds`` (T,).
    """
    if len(cams) != len(gt_boxes):
        raise ValueError(f"{len(cams)} CAMs for {len(gt_boxes)} images")
    taus = np.arange(100) / 100 if cam_thresholds is None else np.asarray(cam_thresholds, np.float64)
    deltas = np.asarray(iou_thresholds, np.float64)
    best_iou = np.zeros((len(cams), len(taus)))
    for i, (cam, gt) in enumerate(zip(cams, gt_boxes)):
        g = to_numpy(gt).astype(np.float64).reshape(-1, 4)
        if not len(g):
            continue
        for k, boxes in enumerate(cam_boxes(cam, taus)):
            if len(boxes):
                best_iou[i, k] = box_iou(boxes, g).max().item()
    hits = best_iou[:, :, None] >= deltas[None, None, :]  # (N, T, D)
    acc = hits.mean(axis=0) if len(cams) else np.zeros(hits.shape[1:])
    best = acc.argmax(axis=0)
    mba = acc[best, np.arange(len(deltas))]
    return {"box_acc": acc, "max_box_acc": mba, "best_threshold": taus[best],
            "max_box_acc_v2": float(mba.mean()), "thresholds": taus, "iou_thresholds": deltas}


def pxap(cams: Sequence, gt_masks: Sequence, num_thresholds: int = 100) -> dict:
    """PxAP and the best-threshold mask IoU of per-image CAMs (in [0, 1]) against boolean
    masks of the same sizes (images of different sizes allowed); see `MaskLocalization`."""
    if len(cams) != len(gt_masks):
        raise ValueError(f"{len(cams)} CAMs for {len(gt_masks)} masks")
    m = MaskLocalization(num_thresholds)
    for cam, mask in zip(cams, gt_masks):
        m.update(to_numpy(cam)[None], to_numpy(mask)[None])
    return m.compute()
