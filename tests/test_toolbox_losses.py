"""Bag-of-freebies losses: focal, label smoothing, Dice, and the re-exported IoU family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbir.toolbox import losses as L


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_binary_focal_reduces_to_bce_and_downweights_easy_examples() -> None:
    logits = torch.randn(64) * 3
    targets = (torch.rand(64) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(
        L.sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0, reduction="none"), bce
    )
    fl = L.sigmoid_focal_loss(logits, targets, alpha=None, gamma=2.0, reduction="none")
    p_t = torch.where(targets > 0, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
    torch.testing.assert_close(fl, (1 - p_t) ** 2 * bce)
    # Easy examples (p_t > 0.9) lose > 99 % of their loss; hard ones far less.
    easy, hard = p_t > 0.9, p_t < 0.3
    assert (fl[easy] < 0.01 * bce[easy]).all() and (fl[hard] > 0.49 * bce[hard]).all()
    a = L.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(a, fl * torch.where(targets > 0, 0.25, 0.75))
    assert L.FocalLoss("binary")(logits, targets).ndim == 0


def test_multiclass_focal_reduces_to_cross_entropy_with_ignore_index() -> None:
    logits = torch.randn(2, 5, 4, 4, requires_grad=True)
    target = torch.randint(0, 5, (2, 4, 4))
    target[0, 0, 0] = -100
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(L.softmax_focal_loss(logits, target, gamma=0.0), ce)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(
        L.softmax_focal_loss(logits, target, alpha=w, gamma=0.0, reduction="sum"),
        F.cross_entropy(logits, target, weight=w, reduction="sum"),
    )
    fl = L.FocalLoss("multiclass", alpha=None, gamma=2.0, reduction="none")(logits, target)
    assert fl.shape == target.shape and fl[0, 0, 0] == 0
    fl.sum().backward()
    assert logits.grad is not None


def test_label_smoothing_matches_torch() -> None:
    logits = torch.randn(16, 7)
    target = torch.randint(0, 7, (16,))
    for eps in (0.0, 0.1, 0.3):
        torch.testing.assert_close(
            L.label_smoothing_cross_entropy(logits, target, eps),
            F.cross_entropy(logits, target, label_smoothing=eps),
        )
    assert L.LabelSmoothingCrossEntropy(0.1, reduction="none")(logits, target).shape == (16,)
    # Smoothing keeps the optimum finite: loss of a huge-margin prediction grows with the margin.
    big = torch.zeros(1, 7)
    big[0, 0] = 50.0
    assert L.label_smoothing_cross_entropy(big, torch.tensor([0]), 0.1) > 1.0


def test_dice_loss_values() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1
    target[1, :, :4, :] = 1
    assert L.dice_loss(target, target, from_logits=False, smooth=0.0).item() == pytest.approx(0.0)
    # Hard masks: Dice = 2 IoU / (1 + IoU).
    pred = torch.zeros_like(target)
    pred[0, :, 3:7, 3:7] = 1
    pred[1, :, 2:6, :] = 1
    d = 1 - L.dice_loss(pred, target, from_logits=False, smooth=0.0, reduction="none")
    inter = (pred * target).flatten(1).sum(1)
    union = ((pred + target) > 0).float().flatten(1).sum(1)
    iou = inter / union
    torch.testing.assert_close(d, 2 * iou / (1 + iou))


def test_multiclass_dice_loss_gradients_and_perfect_score() -> None:
    target = torch.randint(0, 3, (2, 6, 6))
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert L.dice_loss(
        perfect, target, mode="multiclass", from_logits=False, smooth=0.0
    ).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    loss = L.DiceLoss("multiclass")(logits, target)
    assert 0 < loss.item() < 1
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_iou_family_is_reexported_not_copied() -> None:
    boxes = pytest.importorskip("cbir.metrics.boxes")
    from cbir.toolbox.losses import ciou_loss, diou_loss, giou_loss, iou_loss

    assert iou_loss is boxes.iou_loss and giou_loss is boxes.giou_loss
    assert diou_loss is boxes.diou_loss and ciou_loss is boxes.ciou_loss
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert ciou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(AttributeError):
        L.no_such_loss  # noqa: B018
