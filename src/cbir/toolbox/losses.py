"""Bag-of-freebies losses: focal loss (binary and multi-class), label-smoothing cross-entropy,
Dice loss, and the IoU family re-exported from :mod:`cbir.metrics.boxes` (one copy only).

Every loss takes ``reduction`` = ``"none" | "mean" | "sum"`` like ``torch.nn.functional``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.metrics.boxes import ciou_loss, diou_loss, giou_loss, iou_loss  # noqa: F401 - re-exported

__all__ = [
    "DiceLoss", "FocalLoss", "LabelSmoothingCrossEntropy", "ciou_loss", "dice_loss", "diou_loss",
    "giou_loss", "iou_loss", "label_smoothing_cross_entropy", "sigmoid_focal_loss",
    "softmax_focal_loss",
]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return loss if reduction == "none" else getattr(loss, reduction)()


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.25,
                       gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Binary focal loss (Lin et al., RetinaNet 2017) on logits; any shape, targets in [0, 1].

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``, ``p_t = p`` for positives and ``1 - p`` for
    negatives: easy (mostly background) examples weigh less, so the rare hard ones dominate.
    ``alpha`` weighs positives (``1 - alpha`` negatives); ``alpha=None, gamma=0`` is BCE.
    Soft targets (smoothed, IoU-valued) interpolate ``p_t``.
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # stable log
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def softmax_focal_loss(logits: torch.Tensor, target: torch.Tensor,
                       alpha: torch.Tensor | float | None = None, gamma: float = 2.0,
                       reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Multi-class focal loss: ``-alpha_y (1 - p_y)^gamma log p_y`` with a softmax over dim 1.

    ``logits (N, K)`` or ``(N, K, d1, ...)`` (e.g. ``(B, K, H, W)`` for segmentation),
    ``target (N)`` / ``(N, d1, ...)`` class indices. ``alpha``: a ``(K,)`` per-class weight,
    a scalar, or None. Positions with ``ignore_index`` give 0 and are left out of the mean.
    ``gamma=0, alpha=None`` is ``F.cross_entropy``. ``"none"`` returns the target's shape.
    """
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss = -((1 - logp_t.exp()).pow(gamma)) * logp_t
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        loss = loss * (a[safe_t] if a.ndim else a)
    loss = loss * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return _reduce(loss, reduction)


class FocalLoss(nn.Module):
    """Focal loss module: ``mode="binary"`` (sigmoid, per element) or ``"multiclass"`` (softmax)."""

    def __init__(self, mode: str = "binary", alpha: float | torch.Tensor | None = 0.25, gamma: float = 2.0,
                 reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        if mode not in ("binary", "multiclass"):
            raise ValueError("mode must be 'binary' or 'multiclass'")
        self.mode, self.alpha, self.gamma = mode, alpha, gamma
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode == "binary":
            return sigmoid_focal_loss(logits, target, self.alpha, self.gamma, self.reduction)  # type: ignore[arg-type]
        return softmax_focal_loss(logits, target, self.alpha, self.gamma, self.reduction, self.ignore_index)


def label_smoothing_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against ``q = (1 - eps) onehot(y) + eps / K`` (Szegedy et al. 2016).

    ``logits (N, K)`` (or ``(N, K, d1, ...)``), ``target (N)`` class indices. Smoothing bounds
    the logit gap that one-hot targets push to infinity. Equals ``F.cross_entropy(...,
    label_smoothing=eps)``: ``(1 - eps) * NLL + eps * mean_k(-log p_k)``.
    """
    logp = F.log_softmax(logits, dim=1)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    uniform = -logp.mean(dim=1)
    return _reduce((1 - smoothing) * nll + smoothing * uniform, reduction)


class LabelSmoothingCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothing_cross_entropy`."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing, self.reduction = smoothing, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return label_smoothing_cross_entropy(logits, target, self.smoothing, self.reduction)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mode: str = "binary", smooth: float = 1.0,
              from_logits: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2 |X n Y| + s) / (|X| + |Y| + s)`` per sample (and class).

    * ``mode="binary"``: ``logits (B, 1, H, W)`` or ``(B, H, W)``, ``target`` of the same
      shape with values in {0, 1}; probabilities by sigmoid.
    * ``mode="multiclass"``: ``logits (B, K, H, W)``, ``target (B, H, W)`` class indices;
      softmax probabilities against one-hot targets, Dice averaged over the K classes.

    ``"none"`` returns ``(B,)``. Ignoring the true negatives suits very unbalanced
    foreground/background; ``smooth`` keeps it finite when both sets are tiny.
    """
    if mode == "binary":
        probs = torch.sigmoid(logits) if from_logits else logits
        probs = probs.reshape(probs.shape[0], 1, -1)
        tgt = target.reshape(target.shape[0], 1, -1).to(probs.dtype)
    elif mode == "multiclass":
        probs = logits.softmax(dim=1) if from_logits else logits
        k = probs.shape[1]
        probs = probs.reshape(probs.shape[0], k, -1)
        tgt = F.one_hot(target.reshape(target.shape[0], -1).long(), k).permute(0, 2, 1).to(probs.dtype)
    else:
        raise ValueError("mode must be 'binary' or 'multiclass'")
    inter = (probs * tgt).sum(-1)
    denom = probs.sum(-1) + tgt.sum(-1)
    dice = (2 * inter + smooth) / (denom + smooth)  # (B, K)
    return _reduce(1 - dice.mean(dim=1), reduction)


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`."""

    def __init__(self, mode: str = "binary", smooth: float = 1.0, from_logits: bool = True,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.mode, self.smooth, self.from_logits, self.reduction = mode, smooth, from_logits, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return dice_loss(logits, target, self.mode, self.smooth, self.from_logits, self.reduction)
