"""Semantic-segmentation metrics from one confusion matrix accumulated over images.

With n_ij the number of pixels of true class i predicted as j, t_i = sum_j n_ij (support)
and p_j = sum_i n_ij (predicted), over the pixels whose target is not ``ignore_index``::

    PA     = sum_i n_ii / sum_i t_i                      pixel accuracy
    MPA    = mean_i n_ii / t_i                           mean pixel (per-class) accuracy
    IoU_i  = n_ii / (t_i + p_i - n_ii),  mIoU = mean_i IoU_i
    FWIoU  = sum_i (t_i / sum_k t_k) IoU_i               frequency-weighted IoU
    Dice_i = 2 n_ii / (t_i + p_i)                        (= per-class F1), mean Dice

A class that never occurs in the target (for MPA), or in neither target nor prediction
(IoU, Dice), has an undefined score: NaN, left out of the means (``nanmean``, as the FCN
reference code). With no counted pixel at all every score is NaN. The matrix, per-class
accuracy and Dice come from :mod:`cbir.metrics.classification` (its recall and F1).
"""

from __future__ import annotations

import numpy as np

from cbir.metrics._common import safe_divide
from cbir.metrics.classification import confusion_matrix, precision_recall_fscore

_NAN = float("nan")


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else _NAN


def segmentation_scores(cm: np.ndarray) -> dict:
    """All the scores of the module docstring from a (C, C) confusion matrix (rows = truth)."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    total = support.sum()
    _, class_acc, dice, _ = precision_recall_fscore(cm, None, zero_division=_NAN)
    iou = safe_divide(tp, support + predicted - tp, _NAN)
    freq = safe_divide(support, total, _NAN)
    present = support > 0  # a class in the target has a defined IoU
    return {
        "confusion_matrix": cm.copy(),
        "pixel_accuracy": float(safe_divide(tp.sum(), total, _NAN)),
        "class_accuracy": class_acc,
        "mean_pixel_accuracy": _nanmean(class_acc),
        "iou": iou,
        "miou": _nanmean(iou),
        "fwiou": float(np.sum(freq[present] * iou[present])) if total > 0 else _NAN,
        "dice": dice,
        "mean_dice": _nanmean(dice),
    }


class SegmentationMetrics:
    """Streaming PA, MPA, IoU / mIoU, FWIoU and Dice over a dataset. ``update(preds, target)``:
    target (N, H, W) or (H, W) integer labels (``ignore_index`` pixels skipped); preds labels
    of that shape, or scores with a class axis at dim 1 ((N, C, H, W) or (C, H, W)), argmaxed.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confmat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, preds, target) -> None:
        preds, target = (x if hasattr(x, "ndim") else np.asarray(x) for x in (preds, target))
        if preds.ndim == target.ndim + 1:
            # argmax before the numpy conversion: on a GPU, only labels cross to the host.
            preds = preds.argmax(0 if target.ndim == 2 else 1)
        self.confmat += confusion_matrix(target, preds, self.num_classes, self.ignore_index)

    def compute(self) -> dict:
        return segmentation_scores(self.confmat)
