"""Box operations: format conversions, the IoU family, the box-regression losses and NMS.

All boxes are torch tensors of shape ``(..., 4)``; ``xyxy`` (x1, y1, x2, y2) is the internal
format, ``xywh`` (x1, y1, w, h) and ``cxcywh`` (centre, size) convert to it. Everything is
written with differentiable torch ops, so the losses backpropagate through autograd.

IoU family (Rezatofighi et al. 2019, Zheng et al. 2020), for boxes A and B, C the smallest
box enclosing both, rho the distance of the centres and c the diagonal of C::

    IoU  = |A n B| / |A u B|
    GIoU = IoU - |C \\ (A u B)| / |C|
    DIoU = IoU - rho^2 / c^2
    CIoU = DIoU - alpha * v,  v = 4/pi^2 (atan(w_B/h_B) - atan(w_A/h_A))^2,
                              alpha = v / (1 - IoU + v)

The IoU family takes ``elementwise``: False gives the (N, M) matrix of all pairs, True the
(N,) values of aligned pairs (boxes1[i], boxes2[i]); one implementation over broadcast shapes.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
Reduction = Literal["none", "mean", "sum"]

# The same epsilon as torchvision's box losses, so the two agree to float precision.
_EPS = 1e-7


def _tensor(x) -> Tensor:
    """numpy array / list / tensor -> tensor (a tensor is returned as is)."""
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _as_boxes(boxes) -> Tensor:
    b = _tensor(boxes)
    if not b.is_floating_point():
        b = b.float()
    if b.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(b.shape)}")
    return b


# ---------------------------------------------------------------- conversions

# Every conversion goes through xyxy: two small formulas per format instead of six.
_TO_XYXY = {
    "xyxy": lambda x1, y1, x2, y2: (x1, y1, x2, y2),
    "xywh": lambda x, y, w, h: (x, y, x + w, y + h),
    "cxcywh": lambda cx, cy, w, h: (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
}
_FROM_XYXY = {
    "xyxy": _TO_XYXY["xyxy"],
    "xywh": lambda x1, y1, x2, y2: (x1, y1, x2 - x1, y2 - y1),
    "cxcywh": lambda x1, y1, x2, y2: ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1),
}


def box_convert(boxes, in_fmt: BoxFormat, out_fmt: BoxFormat) -> Tensor:
    """Convert ``(..., 4)`` boxes between ``xyxy``, ``xywh`` and ``cxcywh``."""
    b = _as_boxes(boxes)
    if in_fmt == out_fmt:
        return b
    for fmt in (in_fmt, out_fmt):
        if fmt not in _TO_XYXY:
            raise ValueError(f"unknown box format {fmt!r}")
    return torch.stack(_FROM_XYXY[out_fmt](*_TO_XYXY[in_fmt](*b.unbind(-1))), dim=-1)


def xywh_to_xyxy(boxes) -> Tensor:
    return box_convert(boxes, "xywh", "xyxy")


def cxcywh_to_xyxy(boxes) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_xywh(boxes) -> Tensor:
    return box_convert(boxes, "xyxy", "xywh")


def xyxy_to_cxcywh(boxes) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def box_area(boxes) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes; degenerate (inverted) boxes count as 0."""
    b = _as_boxes(boxes)
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


# ---------------------------------------------------------------- IoU family


def _iou_terms(boxes1, boxes2, elementwise: bool, eps: float) -> dict[str, Tensor]:
    """The pieces every member of the IoU family is made from: of all pairs (N, M) or, when
    ``elementwise``, of aligned pairs (N,)."""
    b1, b2 = _as_boxes(boxes1), _as_boxes(boxes2)
    dtype = torch.promote_types(b1.dtype, b2.dtype)
    b1, b2 = b1.to(dtype), b2.to(dtype)
    if not elementwise:
        b1, b2 = b1[:, None, :], b2[None, :, :]  # (N, 1, 4) x (1, M, 4) -> (N, M)
    elif b1.shape != b2.shape:
        raise ValueError(f"elementwise IoU needs equal shapes, got {b1.shape} and {b2.shape}")
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.maximum(b1[..., :2], b2[..., :2])
    rb = torch.minimum(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    # eps as torchvision's losses (so values agree to rounding); a zero union (two degenerate
    # boxes, inter = 0 too) divides by 1 instead: IoU 0 with a finite gradient, never NaN.
    iou = inter / torch.where(union > 0, union + eps, torch.ones_like(union))
    enc_lt = torch.minimum(b1[..., :2], b2[..., :2])
    enc_rb = torch.maximum(b1[..., 2:], b2[..., 2:])
    enc_wh = (enc_rb - enc_lt).clamp(min=0)
    return {"iou": iou, "union": union, "enc_wh": enc_wh, "b1": b1, "b2": b2}


def _diou_penalty(t: dict[str, Tensor], eps: float) -> Tensor:
    """rho^2 / c^2: squared centre distance over squared enclosing diagonal."""
    b1, b2 = t["b1"], t["b2"]
    c2 = (t["enc_wh"] ** 2).sum(-1) + eps
    d = (b1[..., :2] + b1[..., 2:]) / 2 - (b2[..., :2] + b2[..., 2:]) / 2
    return (d**2).sum(-1) / c2


def _ciou_v_alpha(t: dict[str, Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """CIoU's aspect-ratio consistency term v and its weight alpha."""
    b1, b2 = t["b1"], t["b2"]
    w1, h1 = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w2, h2 = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    return v, v / (1 - t["iou"] + v + eps)


def box_iou(boxes1, boxes2, elementwise: bool = False, eps: float = 0.0) -> Tensor:
    """IoU of xyxy boxes: (N,4) x (M,4) -> (N,M), or (N,4) x (N,4) -> (N,) when elementwise;
    0 rather than NaN for pairs with zero union (two degenerate boxes)."""
    return _iou_terms(boxes1, boxes2, elementwise, eps)["iou"]


def box_giou(boxes1, boxes2, elementwise: bool = False, eps: float = _EPS) -> Tensor:
    """Generalized IoU, in [-1, 1]; shapes as :func:`box_iou`."""
    t = _iou_terms(boxes1, boxes2, elementwise, eps)
    area_c = t["enc_wh"][..., 0] * t["enc_wh"][..., 1]
    return t["iou"] - (area_c - t["union"]) / (area_c + eps)


def box_diou(boxes1, boxes2, elementwise: bool = False, eps: float = _EPS) -> Tensor:
    """Distance IoU, in [-1, 1]; shapes as :func:`box_iou`."""
    t = _iou_terms(boxes1, boxes2, elementwise, eps)
    return t["iou"] - _diou_penalty(t, eps)


def box_ciou(boxes1, boxes2, elementwise: bool = False, eps: float = _EPS) -> Tensor:
    """Complete IoU; shapes as :func:`box_iou`. ``alpha`` is differentiated through here
    (this is the metric); :func:`ciou_loss` treats it as a constant, as the paper does."""
    t = _iou_terms(boxes1, boxes2, elementwise, eps)
    v, alpha = _ciou_v_alpha(t, eps)
    return t["iou"] - _diou_penalty(t, eps) - alpha * v


# ---------------------------------------------------------------- losses


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if reduction == "mean" and loss.numel() == 0:
        return loss.sum() * 0.0  # an empty batch: zero loss, not NaN, so a step without matches is a no-op
    return loss if reduction == "none" else getattr(loss, reduction)()


def iou_loss(pred: Tensor, target: Tensor, reduction: Reduction = "mean", eps: float = _EPS) -> Tensor:
    """1 - IoU of aligned xyxy boxes ``pred`` (N,4) and ``target`` (N,4)."""
    return _reduce(1 - box_iou(pred, target, elementwise=True, eps=eps), reduction)


def giou_loss(pred: Tensor, target: Tensor, reduction: Reduction = "mean", eps: float = _EPS) -> Tensor:
    """1 - GIoU of aligned xyxy boxes (N,4); equals torchvision's ``generalized_box_iou_loss``."""
    return _reduce(1 - box_giou(pred, target, elementwise=True, eps=eps), reduction)


def diou_loss(pred: Tensor, target: Tensor, reduction: Reduction = "mean", eps: float = _EPS) -> Tensor:
    """1 - DIoU of aligned xyxy boxes (N,4); equals torchvision's ``distance_box_iou_loss``."""
    return _reduce(1 - box_diou(pred, target, elementwise=True, eps=eps), reduction)


def ciou_loss(pred: Tensor, target: Tensor, reduction: Reduction = "mean", eps: float = _EPS) -> Tensor:
    """1 - IoU + rho^2/c^2 + alpha*v for aligned xyxy boxes (N,4).

    ``alpha`` is held constant in the backward pass (Zheng et al. 2020, and torchvision's
    ``complete_box_iou_loss``): it is a trade-off weight, not something to optimise.
    """
    t = _iou_terms(pred, target, True, eps)
    v, alpha = _ciou_v_alpha(t, eps)
    return _reduce(1 - t["iou"] + _diou_penalty(t, eps) + alpha.detach() * v, reduction)


# ---------------------------------------------------------------- NMS


def _nms_inputs(boxes, scores) -> tuple[Tensor, Tensor]:
    b = _as_boxes(boxes).detach()
    s = _tensor(scores).detach().to(b.dtype)
    if s.shape != b.shape[:1]:
        raise ValueError(f"scores must have shape ({b.shape[0]},), got {tuple(s.shape)}")
    return b, s


def _greedy(boxes, scores, threshold: float, overlap: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Greedy suppression where ``overlap`` (the (N,N) matrix) > threshold, by decreasing
    score: one threshold test for the matrix, then one numpy row-OR per kept box (O(N^2)
    memory, fast for the few thousand boxes a detector keeps before NMS)."""
    b, s = _nms_inputs(boxes, scores)
    order = _descending(s)
    over = (overlap(b, b)[order][:, order] > threshold).cpu().numpy()
    suppressed = np.zeros(order.numel(), dtype=bool)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def _descending(scores: Tensor) -> Tensor:
    # Stable, so equal scores keep their input order (deterministic across runs).
    return torch.sort(scores, descending=True, stable=True).indices


def nms(boxes, scores, iou_threshold: float) -> Tensor:
    """Greedy NMS: keep the highest-scoring box, drop every box with IoU > threshold to it,
    repeat. boxes (N,4) xyxy, scores (N,) -> indices (K,) of the kept boxes, by decreasing score."""
    return _greedy(boxes, scores, iou_threshold, box_iou)


def diou_nms(boxes, scores, iou_threshold: float) -> Tensor:
    """DIoU-NMS (Zheng et al. 2020): greedy NMS suppressing where IoU - rho^2/c^2 > threshold,
    so overlapping boxes whose centres are far apart (occluded neighbours) survive; as :func:`nms`."""
    return _greedy(boxes, scores, iou_threshold, lambda b1, b2: box_diou(b1, b2, eps=0.0))


def soft_nms(boxes, scores, iou_threshold: float = 0.3, sigma: float = 0.5,
             method: Literal["linear", "gaussian"] = "gaussian",
             score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017): decay the score of a neighbour of the selected box by
    ``1 - IoU`` when IoU > ``iou_threshold`` (linear) or by ``exp(-IoU^2 / sigma)``
    (gaussian) instead of removing it; boxes below ``score_threshold`` are dropped.
    boxes (N,4) xyxy, scores (N,) -> (indices (K,), decayed scores (K,)), decreasing.
    """
    b, s = _nms_inputs(boxes, scores)
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    if b.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=b.device), s.new_zeros(0)
    iou = box_iou(b, b)
    s = s.clone()
    alive = s >= score_threshold
    keep, kept_scores = [], []
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype)
    # The selection order depends on decayed scores, so this cannot be a single sort:
    # one argmax per kept box.
    while bool(alive.any()):
        i = int(torch.where(alive, s, neg_inf).argmax())
        keep.append(i)
        kept_scores.append(s[i].clone())
        alive[i] = False
        ov = iou[i]
        if method == "linear":
            decay = torch.where(ov > iou_threshold, 1 - ov, torch.ones_like(ov))
        else:
            decay = torch.exp(-(ov * ov) / sigma)
        s = torch.where(alive, s * decay, s)
        alive &= s >= score_threshold
    return torch.as_tensor(keep, dtype=torch.long, device=b.device), torch.stack(kept_scores)


def _per_class(fn: Callable, boxes, scores, idxs, **kwargs) -> tuple[Tensor, Tensor]:
    """Run a single-class NMS per class of ``idxs`` and merge by decreasing (final) score."""
    b, s = _nms_inputs(boxes, scores)
    labels = _tensor(idxs).long()
    keep_all, score_all = [torch.zeros(0, dtype=torch.long, device=b.device)], [s.new_zeros(0)]
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        out = fn(b[idx], s[idx], **kwargs)
        k, ks = out if isinstance(out, tuple) else (out, s[idx][out])
        keep_all.append(idx[k])
        score_all.append(ks)
    keep, kept = torch.cat(keep_all), torch.cat(score_all)
    order = _descending(kept)
    return keep[order], kept[order]


def batched_nms(boxes, scores, idxs, iou_threshold: float) -> Tensor:
    """Class-aware greedy NMS: boxes of different ``idxs`` (N,) never suppress each other."""
    return _per_class(nms, boxes, scores, idxs, iou_threshold=iou_threshold)[0]


def batched_diou_nms(boxes, scores, idxs, iou_threshold: float) -> Tensor:
    """Class-aware :func:`diou_nms`."""
    return _per_class(diou_nms, boxes, scores, idxs, iou_threshold=iou_threshold)[0]


def batched_soft_nms(boxes, scores, idxs, iou_threshold: float = 0.3, sigma: float = 0.5,
                     method: Literal["linear", "gaussian"] = "gaussian",
                     score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Class-aware :func:`soft_nms`: (indices, decayed scores) by decreasing decayed score."""
    return _per_class(soft_nms, boxes, scores, idxs, iou_threshold=iou_threshold, sigma=sigma, method=method,
                      score_threshold=score_threshold)
