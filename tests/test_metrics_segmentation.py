"""Segmentation metrics against torchmetrics (IoU, PA, MPA, Dice) and a naive per-class
boolean-mask reference (FWIoU, and the cases torchmetrics defines differently)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cbir.metrics.segmentation import SegmentationMetrics, segmentation_scores


def naive_scores(pred: np.ndarray, target: np.ndarray, n: int, ignore: int | None) -> dict:
    """Per-class boolean masks; NaN for classes absent where the score needs them."""
    valid = np.ones(target.shape, bool) if ignore is None else target != ignore
    p, t = pred[valid], target[valid]
    iou, acc, dice, freq = [], [], [], []
    for c in range(n):
        pc, tc = p == c, t == c
        inter, union = np.sum(pc & tc), np.sum(pc | tc)
        iou.append(inter / union if union else np.nan)
        acc.append(inter / tc.sum() if tc.sum() else np.nan)
        dice.append(2 * inter / (pc.sum() + tc.sum()) if pc.sum() + tc.sum() else np.nan)
        freq.append(tc.sum() / t.size if t.size else np.nan)
    iou, freq = np.array(iou), np.array(freq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pixel_accuracy": np.mean(p == t) if t.size else np.nan,
            "class_accuracy": np.array(acc),
            "mean_pixel_accuracy": np.nanmean(acc),
            "iou": iou,
            "miou": np.nanmean(iou),
            "fwiou": np.nansum(freq * iou) if t.size else np.nan,
            "dice": np.array(dice),
            "mean_dice": np.nanmean(dice),
        }


def assert_scores(out: dict, ref: dict):
    for k, v in ref.items():
        np.testing.assert_allclose(out[k], v, atol=1e-12, err_msg=k)


def random_batch(r, n_img, n_cls, h=24, w=32, ignore=255, p_ignore=0.1):
    target = r.integers(0, n_cls, (n_img, h, w))
    target[r.random(target.shape) < p_ignore] = ignore
    # Predictions mostly right, so the scores are not all near chance.
    pred = np.where(r.random(target.shape) < 0.6, np.clip(target, 0, n_cls - 1), r.integers(0, n_cls, target.shape))
    return pred, target


def test_matches_torchmetrics_and_naive_on_random_batches():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
    from torchmetrics.segmentation import DiceScore

    r = np.random.default_rng(0)
    n = 6
    m = SegmentationMetrics(n, ignore_index=255)
    tm_iou = MulticlassJaccardIndex(n, average=None, ignore_index=255)
    tm_pa = MulticlassAccuracy(n, average="micro", ignore_index=255)
    tm_mpa = MulticlassAccuracy(n, average="macro", ignore_index=255)
    preds, targets = [], []
    for i in range(4):
        pred, target = random_batch(r, 3, n)
        preds.append(pred), targets.append(target)
        # numpy and torch, labels and logits
        if i % 2:
            logits = torch.nn.functional.one_hot(torch.as_tensor(pred), n).permute(0, 3, 1, 2).float()
            m.update(logits, torch.as_tensor(target))
        else:
            m.update(pred.astype(np.uint8), target.astype(np.uint8))
        tp, tt = torch.as_tensor(pred), torch.as_tensor(target)
        tm_iou.update(tp, tt), tm_pa.update(tp, tt), tm_mpa.update(tp, tt)
    out = m.compute()
    pred, target = np.concatenate(preds), np.concatenate(targets)
    assert_scores(out, naive_scores(pred, target, n, 255))
    np.testing.assert_allclose(out["iou"], tm_iou.compute().numpy(), atol=1e-6)
    assert out["pixel_accuracy"] == pytest.approx(float(tm_pa.compute()), abs=1e-6)
    assert out["mean_pixel_accuracy"] == pytest.approx(float(tm_mpa.compute()), abs=1e-6)
    # Dice over all pixels (torchmetrics has no ignore_index here: give it the valid pixels only).
    valid = target != 255
    dice = DiceScore(n, average="none", aggregation_level="global", input_format="index")
    dice.update(torch.as_tensor(pred[valid])[None], torch.as_tensor(target[valid])[None])
    np.testing.assert_allclose(out["dice"], dice.compute().numpy(), atol=1e-6)


def test_absent_classes_are_nan_and_left_out_of_means():
    # Class 2 never appears; class 3 is predicted but never in the target.
    target = np.array([[0, 0, 1, 1], [0, 1, 1, 255]])
    pred = np.array([[0, 3, 1, 1], [0, 1, 0, 2]])
    m = SegmentationMetrics(4)
    m.update(pred, target)
    out = m.compute()
    assert np.isnan(out["iou"][2]) and out["iou"][3] == 0.0
    assert np.isnan(out["class_accuracy"][2]) and np.isnan(out["class_accuracy"][3])
    assert_scores(out, naive_scores(pred, target, 4, 255))
    # Hand-computed: IoU0 = 2/4, IoU1 = 3/4, IoU3 = 0 -> mIoU 5/12.
    assert out["miou"] == pytest.approx(5 / 12)
    assert out["pixel_accuracy"] == pytest.approx(5 / 7)


def test_all_pixels_ignored():
    m = SegmentationMetrics(3, ignore_index=255)
    m.update(np.zeros((2, 4, 4), int), np.full((2, 4, 4), 255))
    out = m.compute()
    assert out["confusion_matrix"].sum() == 0
    for k in ("pixel_accuracy", "mean_pixel_accuracy", "miou", "fwiou", "mean_dice"):
        assert np.isnan(out[k]), k
    assert np.isnan(out["iou"]).all()


def test_single_class_and_reset():
    m = SegmentationMetrics(1, ignore_index=None)
    m.update(np.zeros((5, 5), int), np.zeros((5, 5), int))
    out = m.compute()
    for k in ("pixel_accuracy", "mean_pixel_accuracy", "miou", "fwiou", "mean_dice"):
        assert out[k] == 1.0
    m.reset()
    assert m.confmat.sum() == 0


def test_ignore_index_inside_class_range_and_validation():
    r = np.random.default_rng(1)
    pred, target = random_batch(r, 2, 5, ignore=0, p_ignore=0.2)
    m = SegmentationMetrics(5, ignore_index=0)
    m.update(pred, target)
    out = m.compute()
    assert out["confusion_matrix"][0].sum() == 0
    assert_scores(out, naive_scores(pred, target, 5, 0))
    with pytest.raises(ValueError):
        m.update(np.full((2, 2), 7), np.zeros((2, 2), int))  # prediction out of range
    with pytest.raises(ValueError):
        m.update(np.zeros((2, 2), int), np.full((2, 2), 9))  # target out of range, not ignored


def test_scores_from_a_matrix_directly():
    cm = np.array([[5, 1], [2, 2]])
    out = segmentation_scores(cm)
    assert out["iou"] == pytest.approx([5 / 8, 2 / 5])
    assert out["fwiou"] == pytest.approx(0.6 * 5 / 8 + 0.4 * 2 / 5)
    assert out["dice"] == pytest.approx([10 / 13, 4 / 7])
