"""Pooling of conv feature maps into one vector per image: tiny pure functions.

Every function takes ``x`` of shape ``(N, C, H, W)`` (float) and returns ``(N, D)``; D = C
except where the method concatenates several poolings (SPP: 21 C, SCDA: 2 C). No function
normalises its final output (the pipeline's ``L2`` step does); a method whose definition
normalises intermediate parts (R-MAC's regions, SCDA's halves) does so inside. Non-negative
inputs are assumed where the method needs them (GeM, CroW, SCDA), as after a ReLU.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def spoc(x: torch.Tensor) -> torch.Tensor:
    """SUM pooling (SPoC, Babenko & Lempitsky 2015): sum over the spatial positions."""
    return x.sum(dim=(-2, -1))


def ave(x: torch.Tensor) -> torch.Tensor:
    """AVE pooling: mean over the spatial positions (SUM divided by H*W)."""
    return x.mean(dim=(-2, -1))


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAX pooling (MAC, Tolias et al. 2016): maximum activation of each channel."""
    return x.amax(dim=(-2, -1))


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean (GeM, Radenovic et al. 2018): ``(mean(x^p))^(1/p)`` per channel.

    p = 1 is AVE, p -> inf tends to MAX. ``eps`` clamps from below so that x^p is defined."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC's square regions ``(y, x, side_h, side_w)`` on an ``h`` x ``w`` grid (Tolias et al. 2016).

    At level ``l`` (1..levels) the side is ``floor(2 min(h, w) / (l + 1))``; extra regions along the
    longer dimension make neighbours overlap by about ``overlap``; centres are spread uniformly.
    The same grid gives the sliding windows of `cbir.local.regions`."""
    short = min(h, w)
    steps = np.arange(2, 8)
    b = (max(h, w) - short) / (steps - 1)
    extra = int(np.argmin(np.abs(((short**2 - short * b) / short**2) - overlap))) + 1
    extra_w, extra_h = (extra, 0) if h < w else ((0, extra) if h > w else (0, 0))
    boxes = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        nw, nh = level + extra_w, level + extra_h
        bw = 0.0 if nw == 1 else (w - side) / (nw - 1)
        bh = 0.0 if nh == 1 else (h - side) / (nh - 1)
        xs = [int(math.floor(half + i * bw) - half) for i in range(nw)]
        ys = [int(math.floor(half + i * bh) - half) for i in range(nh)]
        boxes += [(y, x_, side, side) for y in ys for x_ in xs]
    return boxes


def rmac(x: torch.Tensor, levels: float = 3, eps: float = 1e-6) -> torch.Tensor:
    """R-MAC (Tolias et al. 2016): MAC of the whole map and of regions at ``levels`` scales
    (~40% overlap), each L2-normalised, summed."""
    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / (v.norm(dim=1, keepdim=True) + eps)

    out = unit(mac(x))
    for y, x0, sh, sw in rmac_regions(x.shape[-2], x.shape[-1], int(levels)):
        out = out + unit(mac(x[..., y:y + sh, x0:x0 + sw]))
    return out


def spp(x: torch.Tensor, levels: float = 4) -> torch.Tensor:
    """Spatial pyramid pooling (He et al., SPPNet 2014): MAX over 1x1, 2x2, 4x4, ... grids
    (up to ``levels`` bins a side), concatenated level by level, bin by bin (row-major) -> (N, 21 C)."""
    grids = [1 << i for i in range(int(levels).bit_length())]  # 1, 2, 4, ... <= levels
    return torch.cat([
        torch.nn.functional.adaptive_max_pool2d(x, n).flatten(2).transpose(1, 2).flatten(1) for n in grids
    ], dim=1)


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """CroW (Kalantidis et al. 2016): cross-dimensional weighting, then SUM pooling.

    Spatial weight: the channel-summed map ``S``, normalised as ``(S / ||S||_a)^(1/b)``.
    Channel weight: ``log(sum_k Q_k / Q_c)`` with ``Q_c`` the fraction of non-zero positions
    of channel c (rare channels weigh more), ``eps`` added to both sums."""
    s = x.sum(dim=1, keepdim=True)
    norm = s.pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    s = (s / (norm + eps)).pow(1.0 / b)
    pooled = (x * s).sum(dim=(-2, -1))
    q = (x > 0).float().mean(dim=(-2, -1))
    beta = torch.log((x.shape[1] * eps + q.sum(dim=1, keepdim=True)) / (eps + q))
    return pooled * beta


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean ``(H, W)`` mask (empty in, empty out)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def scda(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SCDA (Wei et al. 2017): keep the positions where the channel-summed map exceeds its mean,
    take the largest connected component, and concatenate AVE and MAX pooling over it, each
    L2-normalised -> (N, 2 C)."""
    masks = [largest_component((m > m.mean()).cpu().numpy()) for m in x.sum(dim=1)]
    out = []
    for xi, m in zip(x, masks):
        if not m.any():  # a constant map: no position stands out, keep them all
            m = np.ones_like(m)
        sel = xi[:, torch.from_numpy(m)]  # (C, n)
        avg, mx = sel.mean(dim=1), sel.amax(dim=1)
        out.append(torch.cat([avg / (avg.norm() + eps), mx / (mx.norm() + eps)]))
    return torch.stack(out)


def cam(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, k: float = 1,
        eps: float = 1e-6) -> torch.Tensor:
    """Attention pooling with class activation maps (Zhou et al. 2016) of the backbone's own classifier.

    The classifier ``(weight (K, C), bias (K,))`` scores the AVE-pooled map; for the ``k`` top
    classes the CAM ``sum_c weight[k, c] x[c]`` is taken, rectified and scaled to max 1; their
    mean ``A`` weights the positions: ``sum_hw A x / sum_hw A``."""
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"CAM: the classifier takes {weight.shape[1]} channels, the layer has {x.shape[1]}")
    scores = ave(x) @ weight.T + (bias if bias is not None else 0)
    top = scores.topk(int(k), dim=1).indices  # (N, k)
    maps = torch.einsum("nkc,nchw->nkhw", weight[top], x).clamp(min=0)
    maps = maps / (maps.amax(dim=(-2, -1), keepdim=True) + eps)
    att = maps.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    return (x * att).sum(dim=(-2, -1)) / (att.sum(dim=(-2, -1)) + eps)
