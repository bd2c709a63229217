"""Classification metrics, with scikit-learn's definitions.

Two families:

* From a confusion matrix (rows = true class, columns = predicted class, as sklearn):
  accuracy, and precision / recall / F1 per class and averaged ``macro`` (plain mean over
  classes), ``micro`` (from the summed counts; equals accuracy for single-label data) and
  ``weighted`` (mean weighted by support). Segmentation shares the matrix and formulas.
* From scores: the precision-recall curve and its *uninterpolated* AP (step-function
  integral ``sum_k (R_k - R_{k-1}) P_k``, sklearn's ``average_precision_score``), not the
  AP of retrieval or detection (docs/metrics.md).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cbir.metrics._common import safe_divide, to_numpy

Average = Literal["macro", "micro", "weighted"] | None

_CHUNK = 1 << 16  # elements per bincount in confusion_matrix


# ---------------------------------------------------------------- confusion matrix


def confusion_matrix(target, pred, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(C, C) int64 counts of (true, predicted) pairs from integer labels of any shape.

    Elements whose target equals ``ignore_index`` are not counted; any other label outside
    ``[0, C)`` is an error (it would land silently in another cell). A few hundred Mpixel/s
    on one core: ``t * C + p`` and a ``bincount`` chunk by chunk, no mask of ignored pixels.
    """
    t, p = to_numpy(target).reshape(-1), to_numpy(pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"target and pred sizes differ: {t.size} vs {p.size}")
    for name, a in (("target", t), ("pred", p)):
        if a.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integer labels, got dtype {a.dtype}")
    c = int(num_classes)
    if t.size == 0:
        return np.zeros((c, c), dtype=np.int64)
    if p.max() >= c or (p.dtype.kind == "i" and p.min() < 0):
        raise ValueError(f"predicted labels must lie in [0, {c})")
    # Row r of the count table holds target value r + lo: every target value, the ignored one
    # included, gets its own row, so ignoring is dropping a row afterwards.
    lo, hi = min(int(t.min()), 0), max(int(t.max()), c - 1)
    allowed = 0 if ignore_index is None else ignore_index
    if lo < min(0, allowed) or hi > max(c - 1, allowed):  # bounds the table; exact check below
        raise ValueError(f"target labels must lie in [0, {c}) or equal ignore_index")
    n_bins = (hi - lo + 1) * c
    counts = np.zeros(n_bins, dtype=np.int64)
    # Chunks small enough for the index buffer (intp, which bincount wants) to stay in cache:
    # 2-3x faster than one full-size index array, which is memory-bound.
    buf = np.empty(min(_CHUNK, t.size), dtype=np.intp)
    for s in range(0, t.size, _CHUNK):
        tc, pc = t[s : s + _CHUNK], p[s : s + _CHUNK]
        b = buf[: tc.size]
        np.subtract(tc, np.intp(lo), out=b, casting="unsafe")  # in intp: no int8 wrap-around
        b *= c
        np.add(b, pc, out=b, casting="unsafe")  # ranges checked above: no overflow
        counts += np.bincount(b, minlength=n_bins)
    rows = counts.reshape(-1, c)
    if ignore_index is not None and lo <= ignore_index <= hi:
        rows[ignore_index - lo] = 0
    if rows[: -lo].any() or rows[c - lo :].any():
        raise ValueError(f"target labels must lie in [0, {c}) or equal ignore_index")
    return rows[-lo : c - lo].astype(np.int64, copy=False)


def _average(values: np.ndarray, support: np.ndarray, average: Average) -> np.ndarray | float:
    if average is None or average == "none":
        return values
    if average == "macro":
        # nanmean: with zero_division=nan, undefined classes are left out, as sklearn does.
        return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    if average == "weighted":
        ok = ~np.isnan(values)
        w = support[ok].astype(np.float64)
        return float(np.sum(values[ok] * w) / w.sum()) if w.sum() > 0 else 0.0
    raise ValueError(f"average must be None, 'macro', 'micro' or 'weighted', got {average!r}")


def precision_recall_fscore(cm: np.ndarray, average: Average = None, zero_division: float = 0.0) -> tuple:
    """(precision, recall, F1, support) from a confusion matrix, as sklearn's
    ``precision_recall_fscore_support(labels=range(C))``.

    Per class: P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN); ``zero_division`` where
    the denominator is 0. ``average`` None gives (C,) arrays and per-class support; 'macro',
    'micro' or 'weighted' give floats and the total support.
    """
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    pred_pos = cm.sum(axis=0).astype(np.float64)  # TP + FP
    support = true_pos = cm.sum(axis=1)  # TP + FN
    if average == "micro":
        tp, pred_pos, true_pos = tp.sum(), pred_pos.sum(), float(support.sum())
    prf = (safe_divide(tp, pred_pos, zero_division), safe_divide(tp, true_pos, zero_division),
           safe_divide(2 * tp, pred_pos + true_pos, zero_division))
    if average is None or average == "none":
        return (*prf, support)
    if average == "micro":
        return (*(float(x) for x in prf), int(support.sum()))
    return (*(_average(x, support, average) for x in prf), int(support.sum()))


class ClassificationMetrics:
    """Streaming confusion matrix and the metrics derived from it.

    ``update(preds, target)``: target (N,) integer labels; preds (N,) labels, (N, C) scores
    or logits (argmax taken), or (N,) probabilities for ``num_classes=2``.
    ``compute()`` returns a dict: ``confusion_matrix`` (C, C), ``accuracy``, ``support`` (C,),
    and ``precision``, ``recall``, ``f1`` per class (C,) plus ``*_macro``, ``*_micro``,
    ``*_weighted``.
    """

    def __init__(self, num_classes: int, zero_division: float = 0.0, threshold: float = 0.5):
        self.num_classes = int(num_classes)
        self.zero_division = zero_division
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.confmat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, preds, target) -> None:
        preds = preds if hasattr(preds, "ndim") else np.asarray(preds)
        if preds.ndim == 2:
            preds = preds.argmax(1)  # before the numpy conversion: only labels leave the GPU
        p = to_numpy(preds)
        if p.dtype.kind == "f":
            if self.num_classes != 2:
                raise ValueError("1-D float predictions are binary probabilities: num_classes must be 2")
            p = (p >= self.threshold).astype(np.int64)
        self.confmat += confusion_matrix(target, p, self.num_classes)

    def compute(self) -> dict:
        cm = self.confmat
        out: dict = {
            "confusion_matrix": cm.copy(),
            "accuracy": float(safe_divide(np.trace(cm), cm.sum(), float("nan"))),
            "support": cm.sum(axis=1),
        }
        for avg in (None, "macro", "micro", "weighted"):
            p, r, f, _ = precision_recall_fscore(cm, avg, self.zero_division)
            sfx = f"_{avg}" if avg else ""  # per class: no suffix
            out.update({f"precision{sfx}": p, f"recall{sfx}": r, f"f1{sfx}": f})
        return out


# ---------------------------------------------------------------- ranking: PR curve and AP


def _binary_clf_curve(target: np.ndarray, scores: np.ndarray, weight: np.ndarray | None = None):
    """Cumulative (FP, TP) counts at each distinct score, highest score first; ``weight`` (N,)
    counts each sample that many times, so a histogram of scores can stand for the samples."""
    if weight is not None:
        nz = weight != 0
        target, scores, weight = target[nz], scores[nz], weight[nz].astype(np.float64)
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], target[order].astype(np.float64)
    w = 1.0 if weight is None else weight[order]
    # The last element of each run of equal scores: ties form one threshold.
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    return np.cumsum((1 - y) * w)[last], np.cumsum(y * w)[last], s[last]


def precision_recall_curve(target, scores, sample_weight=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary precision-recall curve, as sklearn's ``precision_recall_curve``.

    target (N,) in {0, 1}, scores (N,), optional sample_weight (N,) ->
    (precision (K+1,), recall (K+1,), thresholds (K,)), K distinct scores in increasing
    order; the last point is (P=1, R=0) by convention. Without positives recall is 1
    everywhere (sklearn's convention).
    """
    y = to_numpy(target).reshape(-1)
    s = to_numpy(scores).reshape(-1).astype(np.float64)
    w = None if sample_weight is None else to_numpy(sample_weight).reshape(-1)
    if y.size == 0 or (w is not None and not np.any(w)):
        raise ValueError("precision_recall_curve needs at least one sample")
    fps, tps, thresholds = _binary_clf_curve(y, s, w)
    precision = safe_divide(tps, tps + fps, 0.0)
    recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def _binary_ap(target: np.ndarray, scores: np.ndarray, sample_weight=None) -> float:
    precision, recall, _ = precision_recall_curve(target, scores, sample_weight)
    # Step integral; the max() turns the -0.0 of rounding into 0.
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _one_hot_target(target: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) class labels with (N, C) scores -> (N, C) indicator; an indicator passes through."""
    if target.ndim == 2:
        return target
    n_classes = scores.shape[1]
    if target.size and (target.min() < 0 or target.max() >= n_classes):
        raise ValueError(f"target labels must lie in [0, {n_classes})")
    return np.eye(n_classes, dtype=np.int64)[target.astype(np.int64)]


def average_precision_score(target, scores, average: Average = "macro",
                            sample_weight=None) -> float | np.ndarray:
    """Uninterpolated AP, as sklearn's ``average_precision_score``.

    Binary: target (N,) in {0, 1}, scores (N,). Multi-class / multi-label: scores (N, C) with
    target (N,) class labels or an (N, C) indicator, one-vs-rest per class, then ``average``:
    None -> (C,) per class, 'macro' -> mean, 'weighted' -> mean weighted by positives,
    'micro' -> AP of all (sample, class) pairs pooled. A class without positives has AP 0
    (sklearn's convention). ``sample_weight`` (N,) counts samples that many times.
    """
    y, s = to_numpy(target), to_numpy(scores).astype(np.float64)
    w = None if sample_weight is None else to_numpy(sample_weight).reshape(-1)
    if s.ndim == 1:
        return _binary_ap(y.reshape(-1), s, w)
    y = _one_hot_target(y, s)
    if average == "micro":
        return _binary_ap(y.ravel(), s.ravel(), None if w is None else np.repeat(w, s.shape[1]))
    per_class = np.array([_binary_ap(y[:, c], s[:, c], w) for c in range(s.shape[1])])
    support = y.sum(axis=0) if w is None else (y * w[:, None]).sum(axis=0)
    return _average(per_class, support, average)


class AveragePrecision:
    """Streaming :func:`average_precision_score` and :func:`precision_recall_curve`; AP does
    not decompose over batches, so ``update`` stores scores and targets for ``compute``."""

    def __init__(self, average: Average = "macro"):
        self.average = average
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def update(self, scores, target) -> None:
        """scores (N,) or (N, C); target (N,) labels or (N, C) indicator."""
        self._scores.append(to_numpy(scores))
        self._targets.append(to_numpy(target))

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._scores:
            raise ValueError("no data: call update() first")
        return np.concatenate(self._targets), np.concatenate(self._scores)

    def compute(self) -> float | np.ndarray:
        return average_precision_score(*self._data(), average=self.average)

    def curve(self, class_index: int | None = None):
        """PR curve of the binary problem, or of one class (one-vs-rest)."""
        y, s = self._data()
        if s.ndim == 2:
            if class_index is None:
                raise ValueError("multi-class data: pass class_index")
            y, s = _one_hot_target(y, s)[:, class_index], s[:, class_index]
        return precision_recall_curve(y, s)
