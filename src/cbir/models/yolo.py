"""YOLOv5 (Jocher et al., ultralytics, v6 layout) for one or a few classes: architecture,
anchors, decoding, target assignment and loss.

Backbone -> neck -> head, outputs on P3/P4/P5 (strides 8, 16, 32), three anchors each:

* ``CSPDarknet``: the yolov5 backbone (6x6 stride-2 stem, Conv + C3 stages, SPPF), scaled by
  the depth / width multipliers (``n``: 0.33 / 0.25).
* ``Lite0Backbone``: the packaged ImageNet EfficientNet-Lite0 tapped at strides 8 / 16 / 32
  (40 / 112 / 320 channels), with an SPPF on its last map as CSPDarknet ends with one.
* ``YoloPAN``: yolov5's PAN neck: FPN top-down (1x1 conv, upsample, concat, C3) then
  bottom-up (3x3 stride-2 conv, concat, C3).
* ``Detect``: one 1x1 conv per level to ``na * (5 + nc)`` maps; decoding
  ``xy = (2 sigmoid - 0.5 + grid) * stride``, ``wh = (2 sigmoid)^2 * anchor``.

`build_targets` and `YoloLoss` follow yolov5's ``ComputeLoss``; `kmean_anchors` is autoanchor
(k-means on the training boxes' sizes). Images go in as RGB in [0, 1], ``(B, 3, S, S)``; each
backbone normalises its own input, so the exported graph takes plain pixels / 255.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.metrics.boxes import box_iou, ciou_loss, cxcywh_to_xyxy
from cbir.toolbox.layers import C3, SPPF, ConvBnAct

STRIDES = (8, 16, 32)
# yolov5's COCO anchors (P3, P4, P5), in pixels of a 640 input: replaced by autoanchor.
COCO_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
VARIANTS = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75)}


def _width(c: int, w: float) -> int:
    return max(8, int(math.ceil(c * w / 8) * 8))


def _depth(n: int, d: float) -> int:
    return max(round(n * d), 1) if n > 1 else n


def _conv(c1: int, c2: int, k: int = 1, s: int = 1) -> ConvBnAct:
    return ConvBnAct(c1, c2, k, s, act="silu")


class CSPDarknet(nn.Module):
    """yolov5 v6 backbone; ``(B, 3, H, W)`` in [0, 1] -> P3, P4, P5 (strides 8, 16, 32)."""

    def __init__(self, depth: float = 0.33, width: float = 0.25) -> None:
        super().__init__()
        c = [_width(x, width) for x in (64, 128, 256, 512, 1024)]
        self.stem = _conv(3, c[0], 6, 2)  # padding 2, as yolov5's (replaces the Focus layer)
        self.stage2 = nn.Sequential(_conv(c[0], c[1], 3, 2), C3(c[1], c[1], _depth(3, depth)))
        self.stage3 = nn.Sequential(_conv(c[1], c[2], 3, 2), C3(c[2], c[2], _depth(6, depth)))
        self.stage4 = nn.Sequential(_conv(c[2], c[3], 3, 2), C3(c[3], c[3], _depth(9, depth)))
        self.stage5 = nn.Sequential(_conv(c[3], c[4], 3, 2), C3(c[4], c[4], _depth(3, depth)), SPPF(c[4], c[4]))
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.stage2(self.stem(x))
        p3 = self.stage3(x)
        p4 = self.stage4(p3)
        return [p3, p4, self.stage5(p4)]


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 (ImageNet, the packaged weights) tapped after blocks 2, 4 and 6:
    ``(B, 3, H, W)`` in [0, 1] -> maps of 40, 112, 320 channels at strides 8, 16, 32."""

    taps = (2, 4, 6)
    out_channels = (40, 112, 320)

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        if pretrained:
            from cbir.models.backbones import get_backbone

            import copy

            net = copy.deepcopy(get_backbone("efficientnet_lite0").model())
        else:
            import timm

            net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.Sequential(*list(net.blocks)[: self.taps[-1] + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.bn1(self.conv_stem((x - 0.5) / 0.5))  # the TF-Lite models' input scaling
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        return outs


class YoloPAN(nn.Module):
    """yolov5's neck: FPN top-down then PAN bottom-up, C3 blocks (no shortcut) after each concat.

    ``[P3, P4, P5]`` of ``in_channels`` -> ``[N3, N4, N5]`` of ``channels`` (c3, c4, c5).
    ``sppf``: an SPPF on P5 first (for a backbone that does not end with one).
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], depth: float = 0.33,
                 sppf: bool = False) -> None:
        super().__init__()
        i3, i4, i5 = in_channels
        c3, c4, c5 = channels
        n = _depth(3, depth)
        self.sppf = SPPF(i5, c5) if sppf else nn.Identity()
        i5 = c5 if sppf else i5
        self.lat5 = _conv(i5, c4, 1)
        self.td4 = C3(c4 + i4, c4, n, shortcut=False)
        self.lat4 = _conv(c4, c3, 1)
        self.td3 = C3(c3 + i3, c3, n, shortcut=False)
        self.down3 = _conv(c3, c3, 3, 2)
        self.bu4 = C3(c3 + c3, c4, n, shortcut=False)
        self.down4 = _conv(c4, c4, 3, 2)
        self.bu5 = C3(c4 + c4, c5, n, shortcut=False)
        self.out_channels = (c3, c4, c5)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        p3, p4, p5 = feats
        h5 = self.lat5(self.sppf(p5))
        h4 = self.lat4(self.td4(torch.cat([F.interpolate(h5, size=p4.shape[-2:], mode="nearest"), p4], 1)))
        n3 = self.td3(torch.cat([F.interpolate(h4, size=p3.shape[-2:], mode="nearest"), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), h4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), h5], 1))
        return [n3, n4, n5]


class Detect(nn.Module):
    """yolov5's head: per level a 1x1 conv to ``na * (5 + nc)``; raw output ``(B, na, H, W, 5 + nc)``.

    ``anchors``: ``(nl, na, 2)`` in pixels (a buffer, so it travels with the weights).
    """

    def __init__(self, in_channels: Sequence[int], anchors, nc: int = 1, strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        a = torch.as_tensor(anchors, dtype=torch.float32).reshape(len(in_channels), -1, 2)
        self.nl, self.na, self.nc, self.no = a.shape[0], a.shape[1], nc, 5 + nc
        self.register_buffer("anchors", a)
        self.register_buffer("stride", torch.as_tensor(strides, dtype=torch.float32))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in in_channels)
        self.init_bias()

    def init_bias(self, image_size: int = 640) -> None:
        """yolov5's prior: ~8 objects per image for objectness, 0.6 / nc for classes."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.view(self.na, -1)
            with torch.no_grad():
                b[:, 4] = math.log(8 / (image_size / s) ** 2)
                b[:, 5:] = math.log(0.6 / (self.nc - 0.99))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        out = []
        for conv, x in zip(self.m, feats):
            b, _, h, w = x.shape
            out.append(conv(x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw level outputs -> ``(B, N, 5 + nc)``: cx, cy, w, h in pixels, objectness, class
        probabilities (all after the sigmoid)."""
        z = []
        for i, p in enumerate(raw):
            b, na, h, w, no = p.shape
            ys = torch.arange(h, dtype=p.dtype, device=p.device)
            xs = torch.arange(w, dtype=p.dtype, device=p.device)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2)
            y = p.sigmoid()
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, na, 1, 1, 2)
            z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, -1, no))
        return torch.cat(z, 1)


class YOLO(nn.Module):
    """Backbone + neck + head. ``variant``: ``n`` / ``s`` / ``m`` (CSPDarknet scaled) or ``lite0``.

    ``forward(x)`` -> raw level outputs (what the loss takes); ``predict(x)`` -> decoded
    ``(B, N, 5 + nc)``. ``head_forward(feats)`` runs neck + head on backbone features (the
    cached-features training of the frozen-backbone variant).
    """

    def __init__(self, variant: str = "n", nc: int = 1, anchors=COCO_ANCHORS, pretrained: bool = True) -> None:
        super().__init__()
        self.variant, self.nc = variant, nc
        if variant == "lite0":
            depth, width = VARIANTS["n"]
            self.backbone = Lite0Backbone(pretrained=pretrained)
            sppf = True
        elif variant in VARIANTS:
            depth, width = VARIANTS[variant]
            self.backbone = CSPDarknet(depth, width)
            sppf = False
        else:
            raise ValueError(f"unknown YOLO variant {variant!r}; choose from {sorted(VARIANTS) + ['lite0']}")
        channels = tuple(_width(c, width) for c in (256, 512, 1024))
        self.neck = YoloPAN(self.backbone.out_channels, channels, depth, sppf=sppf)
        self.head = Detect(self.neck.out_channels, anchors, nc)

    def head_forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.head(self.neck(feats))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        return self.head_forward(self.backbone(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.decode(self(x))

    def trainable_state(self) -> dict:
        """The weights worth shipping: everything, or all but the (frozen, packaged) lite0 backbone."""
        sd = self.state_dict()
        if self.variant == "lite0":
            sd = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        return sd


# ------------------------------------------------------------------ targets and loss


def build_targets(targets: torch.Tensor, anchors: torch.Tensor, shapes: Sequence[tuple[int, int]],
                  strides: Sequence[float] = STRIDES, anchor_t: float = 4.0, g: float = 0.5):
    """yolov5's target assignment.

    ``targets``: ``(nt, 6)`` rows ``[image, class, cx, cy, w, h]``, box in pixels of the input.
    ``anchors``: ``(nl, na, 2)`` in pixels; ``shapes``: each level's ``(H, W)`` grid, of
    stride ``strides[i]``. A target goes to every anchor whose width and height ratios to it
    (either way) are under ``anchor_t``, in its own cell and in the two neighbouring cells
    whose sides its centre is nearest to (fractional part under ``g``, not in the grid's
    first or last cell), so 3 cells per matched anchor.

    Returns per level: ``tcls (n,)``, ``tbox (n, 4)`` (x, y offsets from the assigned cell's
    corner, w, h; in cells), ``indices (b, a, gj, gi)``, ``anch (n, 2)`` in cells.
    """
    na, nt = anchors.shape[1], targets.shape[0]
    dev = targets.device
    tcls, tbox, indices, anch = [], [], [], []
    ai = torch.arange(na, device=dev, dtype=torch.float32).view(na, 1).repeat(1, nt)
    t_all = torch.cat((targets.float().reshape(-1, 6).repeat(na, 1, 1), ai[..., None]), 2)  # (na, nt, 7)
    off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=dev, dtype=torch.float32) * g
    for i, (h, w) in enumerate(shapes):
        s = float(strides[i])
        anc = anchors[i].float().to(dev) / s  # (na, 2) in cells
        t = t_all.clone()
        t[..., 2:6] = t[..., 2:6] / s
        if nt:
            r = t[..., 4:6] / anc[:, None]
            t = t[torch.max(r, 1 / r).max(2)[0] < anchor_t]  # (m, 7)
            gxy = t[:, 2:4]
            gxi = torch.tensor([w, h], device=dev, dtype=torch.float32) - gxy
            j, k = ((gxy % 1 < g) & (gxy > 1)).T
            l, m = ((gxi % 1 < g) & (gxi > 1)).T
            sel = torch.stack((torch.ones_like(j), j, k, l, m))
            t = t.repeat((5, 1, 1))[sel]
            offsets = (torch.zeros_like(gxy)[None] + off[:, None])[sel]
        else:
            t = t[0]
            offsets = torch.zeros(0, 2, device=dev)
        b, c = t[:, 0].long(), t[:, 1].long()
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        gij = (gxy - offsets).long()
        gi, gj = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
        a = t[:, 6].long()
        indices.append((b, a, gj, gi))
        tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1).float(), gwh), 1))
        anch.append(anc[a])
        tcls.append(c)
    return tcls, tbox, indices, anch


class YoloLoss:
    """yolov5's ``ComputeLoss``: CIoU box loss on the matched predictions, objectness BCE
    against the detached CIoU (clamped at 0) with per-level balance 4.0 / 1.0 / 0.4, class
    BCE only when ``nc > 1``. Gains are yolov5's hyp.scratch-low (box 0.05, obj 1.0,
    cls 0.5), scaled by the input size and the number of levels as yolov5 does; the total is
    multiplied by the batch size. ``__call__(raw, targets)`` -> ``(total, parts (3,))``.
    """

    balance = (4.0, 1.0, 0.4)

    def __init__(self, head: Detect, image_size: int, box: float = 0.05, obj: float = 1.0, cls: float = 0.5,
                 anchor_t: float = 4.0) -> None:
        nl = head.nl
        self.head = head
        self.box_gain = box * 3 / nl
        self.obj_gain = obj * (image_size / 640) ** 2 * 3 / nl
        self.cls_gain = cls * head.nc / 80 * 3 / nl
        self.anchor_t = anchor_t

    def __call__(self, raw: Sequence[torch.Tensor], targets: torch.Tensor):
        dev = raw[0].device
        shapes = [tuple(p.shape[2:4]) for p in raw]
        tcls, tbox, indices, anch = build_targets(targets.to(dev), self.head.anchors, shapes, self.head.stride.tolist(), self.anchor_t)
        lbox = torch.zeros((), device=dev)
        lobj = torch.zeros((), device=dev)
        lcls = torch.zeros((), device=dev)
        bce = nn.BCEWithLogitsLoss()
        for i, p in enumerate(raw):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(p.shape[:4], dtype=p.dtype, device=dev)
            if b.shape[0]:
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch[i]
                pbox = cxcywh_to_xyxy(torch.cat((pxy, pwh), 1))
                l = ciou_loss(pbox, cxcywh_to_xyxy(tbox[i]), reduction="none")
                lbox = lbox + l.mean()
                iou = (1.0 - l).detach().clamp(0).to(tobj.dtype)
                # the best IoU wins where several targets share a cell (yolov5's sort_obj_iou)
                order = iou.argsort()
                tobj[b[order], a[order], gj[order], gi[order]] = iou[order]
                if self.head.nc > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(b.shape[0], device=dev), tcls[i]] = 1.0
                    lcls = lcls + bce(ps[:, 5:], tc)
            lobj = lobj + bce(p[..., 4], tobj) * self.balance[i]
        bs = raw[0].shape[0]
        parts = torch.stack((lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain))
        return parts.sum() * bs, parts.detach()


# ------------------------------------------------------------------ autoanchor


def anchor_fitness(anchors: np.ndarray, wh: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """yolov5's autoanchor metrics: best possible recall (share of boxes with some anchor within
    ratio ``thr``) and the mean best-anchor ratio fitness."""
    r = wh[:, None] / anchors[None]
    x = np.minimum(r, 1 / r).min(2)
    best = x.max(1)
    return float((best > 1 / thr).mean()), float((best * (best > 1 / thr)).mean())


def kmean_anchors(wh: np.ndarray, n: int = 9, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Autoanchor: k-means on the boxes' ``(w, h)`` (pixels of the training input), as yolov5
    runs it (each axis divided by its std first), then sorted by area -> ``(n, 2)``.
    Tiny boxes (< 2 px) are left out; with fewer boxes than ``n`` the clusters repeat."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    wh = wh[(wh >= 2.0).all(1)]
    if len(wh) == 0:
        raise ValueError("autoanchor needs at least one box of 2 px or more")
    s = wh.std(0)
    s[s == 0] = 1.0
    x = wh / s
    rng = np.random.default_rng(seed)
    k = min(n, len(np.unique(x, axis=0)))
    centres = x[rng.choice(len(x), k, replace=False)] if len(x) >= k else x.copy()
    # k-means++-style spread start for stability
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.asarray(centres)
    for _ in range(iters):
        lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    a = c * s
    a = a[np.argsort(a.prod(1))]
    if len(a) < n:
        a = a[np.linspace(0, len(a) - 1, n).round().astype(int)]
    return a.astype(np.float32)


# ------------------------------------------------------------------ NMS (torch path and ONNX op)


class _NMS(torch.autograd.Function):
    """Greedy NMS that exports as ONNX ``NonMaxSuppression`` (same rule: suppress IoU > thr)."""

    @staticmethod
    def forward(ctx, boxes, scores, iou_thr, max_det):  # noqa: D102
        from cbir.metrics.boxes import nms

        keep = nms(boxes, scores, float(iou_thr))
        return keep[: int(max_det)]

    @staticmethod
    def symbolic(g, boxes, scores, iou_thr, max_det):  # noqa: D102
        from torch.onnx import symbolic_helper as sh

        b = sh._unsqueeze_helper(g, boxes, [0])  # (1, N, 4)
        s = sh._unsqueeze_helper(g, sh._unsqueeze_helper(g, scores, [0]), [0])  # (1, 1, N)
        mo = g.op("Constant", value_t=torch.tensor([int(max_det)], dtype=torch.long))
        it = g.op("Constant", value_t=torch.tensor([float(iou_thr)], dtype=torch.float))
        sel = g.op("NonMaxSuppression", b, s, mo, it, center_point_box_i=0)  # (K, 3)
        idx = g.op("Gather", sel, g.op("Constant", value_t=torch.tensor(2, dtype=torch.long)), axis_i=1)
        return idx


def nms_op(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float, max_det: int) -> torch.Tensor:
    """Kept indices by decreasing score (the toolbox's greedy NMS; ONNX NonMaxSuppression when exported)."""
    return _NMS.apply(boxes, scores, iou_thr, max_det)


class YoloInference(nn.Module):
    """Image ``(1, 3, S, S)`` in [0, 1] -> final detections ``(K, 6)``: x0, y0, x1, y1, score,
    class. Decoding, the score threshold and NMS are inside, so the exported ONNX graph
    gives final boxes. Score = objectness x class probability (objectness alone for nc = 1);
    only the ``pre_nms`` best-scored candidates enter the NMS (yolov5 caps them too)."""

    def __init__(self, model: YOLO, conf: float = 0.25, iou: float = 0.45, max_det: int = 100,
                 pre_nms: int = 1000) -> None:
        super().__init__()
        self.model, self.conf, self.iou, self.max_det, self.pre_nms = model, conf, iou, max_det, pre_nms

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p = self.model.predict(x)[0]  # (N, 5 + nc)
        if p.shape[1] > 6:
            cls_p, cls = p[:, 5:].max(1)
            score = p[:, 4] * cls_p
        else:
            score, cls = p[:, 4], torch.zeros_like(p[:, 4], dtype=torch.long)
        # the best pre_nms candidates only (N is fixed by the input size, so k is a constant)
        top = torch.topk(score, min(self.pre_nms, p.shape[0])).indices
        p, score, cls = p[top], score[top], cls[top]
        keep = torch.nonzero(score > self.conf).view(-1)
        boxes = cxcywh_to_xyxy(p[keep, :4])
        score, cls = score[keep], cls[keep]
        # class-aware NMS by offsetting each class's boxes (one class: no offset)
        off = cls.to(boxes.dtype)[:, None] * 4096.0
        sel = nms_op(boxes + off, score, self.iou, self.max_det)
        return torch.cat((boxes[sel], score[sel, None], cls[sel, None].to(boxes.dtype)), 1)


def matched_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Best IoU of each ground-truth box over ``pred`` (xyxy); zeros when nothing predicted."""
    if pred.numel() == 0:
        return torch.zeros(gt.shape[0])
    return box_iou(gt, pred).max(1).values
