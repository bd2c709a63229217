"""Box ops against torchvision.ops (IoU family, losses, greedy NMS) and against soft-NMS /
DIoU-NMS written naively from the papers' pseudo-code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import ops

from cbir.metrics import boxes as B


def random_boxes(n: int, gen: torch.Generator, dtype=torch.float64, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- conversions


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_convert_matches_torchvision(gen, fmt):
    b = random_boxes(50, gen)
    for a, z in [("xyxy", fmt), (fmt, "xyxy"), (fmt, fmt)]:
        torch.testing.assert_close(B.box_convert(b, a, z), ops.box_convert(b, a, z))
    np.testing.assert_allclose(B.box_convert(b, "xyxy", fmt).numpy(), B.box_convert(b.numpy(), "xyxy", fmt).numpy())
    torch.testing.assert_close(B.xywh_to_xyxy(B.xyxy_to_xywh(b)), b)
    torch.testing.assert_close(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(b)), b)


def test_box_area(gen):
    b = random_boxes(20, gen)
    torch.testing.assert_close(B.box_area(b), ops.box_area(b))


# ---------------------------------------------------------------- IoU family


PAIRWISE = [
    (B.box_iou, ops.box_iou),
    (B.box_giou, ops.generalized_box_iou),
    (B.box_diou, ops.distance_box_iou),
    (B.box_ciou, ops.complete_box_iou),
]


@pytest.mark.parametrize("ours,ref", PAIRWISE, ids=["iou", "giou", "diou", "ciou"])
def test_iou_family_pairwise_and_elementwise(gen, ours, ref):
    a, b = random_boxes(30, gen), random_boxes(20, gen)
    # Include identical, nested, touching and far-apart boxes.
    a[0], b[0] = torch.tensor([10.0, 10, 20, 20]), torch.tensor([10.0, 10, 20, 20])
    a[1], b[1] = torch.tensor([0.0, 0, 40, 40]), torch.tensor([10.0, 10, 20, 20])
    a[2], b[2] = torch.tensor([0.0, 0, 10, 10]), torch.tensor([10.0, 0, 20, 10])
    a[3], b[3] = torch.tensor([0.0, 0, 1, 1]), torch.tensor([500.0, 500, 501, 501])
    expected = ref(a, b)
    torch.testing.assert_close(ours(a, b), expected, atol=1e-6, rtol=1e-6)
    got = ours(a[:20], b, elementwise=True)
    torch.testing.assert_close(got, torch.diagonal(ref(a[:20], b)), atol=1e-6, rtol=1e-6)
    # numpy in, float32 in
    torch.testing.assert_close(ours(a.numpy(), b.numpy()), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(a.float(), b.float()), expected.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fn", [B.box_iou, B.box_giou, B.box_diou, B.box_ciou])
def test_iou_family_empty(fn):
    e, one = torch.zeros(0, 4), torch.tensor([[0.0, 0, 1, 1]])
    assert fn(e, one).shape == (0, 1)
    assert fn(one, e).shape == (1, 0)
    assert fn(e, e, elementwise=True).shape == (0,)


def test_iou_degenerate_is_zero_not_nan():
    pt = torch.tensor([[5.0, 5, 5, 5]])
    assert B.box_iou(pt, pt).item() == 0.0


# ---------------------------------------------------------------- losses


LOSSES = [
    (B.giou_loss, ops.generalized_box_iou_loss),
    (B.diou_loss, ops.distance_box_iou_loss),
    (B.ciou_loss, ops.complete_box_iou_loss),
]


def _pred_target(gen, n=16):
    target = random_boxes(n, gen)
    # Predictions near the targets (overlapping) plus a few disjoint ones.
    pred = target + torch.randn(n, 4, generator=gen, dtype=torch.float64) * 8
    pred = torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2] + 0.5)], dim=1)
    pred[-2:] += 300
    return pred, target


@pytest.mark.parametrize("ours,ref", LOSSES, ids=["giou", "diou", "ciou"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_losses_values_and_gradients_match_torchvision(gen, ours, ref, reduction):
    pred, target = _pred_target(gen)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    l1, l2 = ours(p1, target, reduction=reduction), ref(p2, target, reduction=reduction)
    torch.testing.assert_close(l1, l2, atol=1e-7, rtol=1e-7)
    l1.sum().backward()
    l2.sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, atol=1e-7, rtol=1e-7)


def test_iou_loss_value_and_gradient(gen):
    pred, target = _pred_target(gen)
    torch.testing.assert_close(
        B.iou_loss(pred, target, reduction="none"),
        1 - torch.diagonal(ops.box_iou(pred, target)),
        atol=1e-7,
        rtol=1e-7,
    )
    # Analytic gradient of 1 - I/U for the first coordinate of an overlapping pair,
    # against autograd: d(1-IoU)/dx1 = -(dI U - I dU) / U^2, dU = dA_pred - dI.
    p = torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[5.0, 5, 15, 15]], dtype=torch.float64)
    B.iou_loss(p, t, reduction="sum", eps=0.0).backward()
    inter, union = 25.0, 175.0
    d_inter, d_area = 0.0, -10.0  # x1 moves the left edge: pred area shrinks, overlap unchanged
    expected = -(d_inter * union - inter * (d_area - d_inter)) / union**2
    assert p.grad[0, 0].item() == pytest.approx(expected)


def _ciou_metric_loss(p, t, reduction):
    return (1 - B.box_ciou(p, t, elementwise=True)).sum()


# ciou_loss holds alpha constant on purpose (paper, torchvision), so its gradient is not the
# numerical one: it is checked against torchvision above, and the CIoU metric here.
@pytest.mark.parametrize("fn", [B.iou_loss, B.giou_loss, B.diou_loss, _ciou_metric_loss])
def test_losses_gradcheck(gen, fn):
    pred, target = _pred_target(gen, n=6)
    pred = pred[:-2].clone().requires_grad_(True)  # overlapping pairs: smooth region
    assert torch.autograd.gradcheck(lambda p: fn(p, target[:-2], reduction="sum"), (pred,))


@pytest.mark.parametrize("fn", [B.iou_loss, B.giou_loss, B.diou_loss, B.ciou_loss])
def test_losses_empty_and_perfect(fn):
    e = torch.zeros(0, 4, requires_grad=True)
    out = fn(e, torch.zeros(0, 4))
    assert out.item() == 0.0
    out.backward()  # no NaN, no error on an empty batch
    b = torch.tensor([[1.0, 2, 3, 5], [0, 0, 10, 10]])
    assert fn(b, b, reduction="none").abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        fn(b, b, reduction="avg")


# ---------------------------------------------------------------- NMS


def _clustered(gen, n=200):
    """Boxes in a few clusters, so NMS has real work; continuous scores (no ties)."""
    centres = torch.rand(8, 2, generator=gen, dtype=torch.float64) * 200
    c = centres[torch.randint(0, 8, (n,), generator=gen)] + torch.randn(n, 2, generator=gen, dtype=torch.float64) * 6
    wh = 20 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 20
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    return boxes, scores


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(gen, thr):
    boxes, scores = _clustered(gen)
    assert torch.equal(B.nms(boxes, scores, thr), ops.nms(boxes, scores, thr))
    assert torch.equal(B.nms(boxes.numpy(), scores.numpy(), thr), ops.nms(boxes, scores, thr))
    labels = torch.randint(0, 4, (boxes.shape[0],), generator=gen)
    assert torch.equal(B.batched_nms(boxes, scores, labels, thr), ops.batched_nms(boxes, scores, labels, thr))


def test_nms_edge_cases():
    e = torch.zeros(0, 4)
    assert B.nms(e, torch.zeros(0), 0.5).numel() == 0
    assert B.batched_nms(e, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    one = torch.tensor([[0.0, 0, 1, 1]])
    assert B.nms(one, torch.tensor([0.3]), 0.5).tolist() == [0]
    same = one.repeat(3, 1)
    assert B.nms(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]


def naive_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def naive_soft_nms(boxes, scores, nt, sigma, method, thresh):
    """Algorithm 1 of Bodla et al. (2017), with the reference code's pruning of boxes whose
    score falls below ``thresh``."""
    B_ = [list(map(float, b)) for b in boxes]
    S = [float(s) for s in scores]
    idx = [i for i in range(len(B_)) if S[i] >= thresh]
    keep, kept_scores = [], []
    while idx:
        m = max(idx, key=lambda i: S[i])
        keep.append(m)
        kept_scores.append(S[m])
        idx.remove(m)
        for i in idx:
            ov = naive_iou(B_[m], B_[i])
            if method == "linear":
                w = 1 - ov if ov > nt else 1.0
            else:
                w = math.exp(-(ov * ov) / sigma)
            S[i] *= w
        idx = [i for i in idx if S[i] >= thresh]
    return keep, kept_scores


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("score_threshold", [0.0, 0.05])
def test_soft_nms_matches_paper(gen, method, score_threshold):
    boxes, scores = _clustered(gen, n=80)
    keep, ks = B.soft_nms(boxes, scores, iou_threshold=0.3, sigma=0.5, method=method, score_threshold=score_threshold)
    rk, rs = naive_soft_nms(boxes.tolist(), scores.tolist(), 0.3, 0.5, method, score_threshold)
    assert keep.tolist() == rk
    np.testing.assert_allclose(ks.numpy(), rs, rtol=1e-12)
    if score_threshold == 0.0 and method == "gaussian":
        assert len(rk) == boxes.shape[0]  # nothing is removed, only rescored


def test_batched_soft_nms_equals_per_class(gen):
    boxes, scores = _clustered(gen, n=60)
    labels = torch.randint(0, 3, (60,), generator=gen)
    keep, ks = B.batched_soft_nms(boxes, scores, labels, method="linear", score_threshold=0.01)
    expected = []
    for c in range(3):
        idx = torch.nonzero(labels == c).flatten()
        k, s = naive_soft_nms(boxes[idx].tolist(), scores[idx].tolist(), 0.3, 0.5, "linear", 0.01)
        expected += [(sc, int(idx[i])) for i, sc in zip(k, s)]
    expected.sort(key=lambda x: -x[0])
    assert keep.tolist() == [i for _, i in expected]
    np.testing.assert_allclose(ks.numpy(), [s for s, _ in expected], rtol=1e-12)
    e = B.batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert e[0].numel() == 0 and e[1].numel() == 0


def naive_diou_nms(boxes, scores, thr):
    """DIoU-NMS of Zheng et al. (2020): s_i = 0 if IoU(M, B_i) - rho^2/c^2 >= eps."""

    def diou(a, b):
        cx = ((a[0] + a[2]) - (b[0] + b[2])) / 2
        cy = ((a[1] + a[3]) - (b[1] + b[3])) / 2
        cw = max(a[2], b[2]) - min(a[0], b[0])
        ch = max(a[3], b[3]) - min(a[1], b[1])
        return naive_iou(a, b) - (cx * cx + cy * cy) / (cw * cw + ch * ch)

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    while order:
        m = order.pop(0)
        keep.append(m)
        order = [i for i in order if diou(boxes[m], boxes[i]) <= thr]
    return keep


@pytest.mark.parametrize("thr", [0.3, 0.5])
def test_diou_nms_matches_paper(gen, thr):
    boxes, scores = _clustered(gen, n=150)
    assert B.diou_nms(boxes, scores, thr).tolist() == naive_diou_nms(boxes.tolist(), scores.tolist(), thr)
    # Overlapping boxes with distant centres: IoU 1/3 > 0.3 but DIoU 1/3 - 1/10 < 0.3.
    pair, sc = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 30]]), torch.tensor([0.9, 0.8])
    assert B.nms(pair, sc, 0.3).tolist() == [0]
    assert B.diou_nms(pair, sc, 0.3).tolist() == [0, 1]
    labels = torch.randint(0, 3, (150,), generator=gen)
    expected = []
    for c in range(3):
        idx = torch.nonzero(labels == c).flatten()
        expected += [int(idx[i]) for i in naive_diou_nms(boxes[idx].tolist(), scores[idx].tolist(), thr)]
    expected.sort(key=lambda i: -float(scores[i]))
    assert B.batched_diou_nms(boxes, scores, labels, thr).tolist() == expected


def test_degenerate_pairs_have_finite_gradients():
    pt = torch.tensor([[5.0, 5, 5, 5], [0, 0, 2, 2]], requires_grad=True)
    other = torch.tensor([[5.0, 5, 5, 5], [1, 1, 3, 3]])
    B.box_iou(pt, other).sum().backward()
    assert torch.isfinite(pt.grad).all()
