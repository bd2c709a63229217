"""Receptive-field enlarging blocks: SPP / SPPF (YOLO), ASPP (DeepLabv3), RFB / RFB-s, PPM (PSPNet).

All keep the spatial size: ``(B, C_in, H, W) -> (B, C_out, H, W)`` for any ``H, W``
(``C_out`` defaults to ``C_in``). They enlarge the receptive field in parallel branches -
large max-pools (SPP), dilated convs (ASPP, RFB) or coarse average-pooling bins (PPM) - and
fuse the branches by concatenation and a 1x1 (or 3x3) conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox.layers.conv import ConvBnAct
from cbir.toolbox.registry import register_module

__all__ = ["ASPP", "PPM", "RFB", "RFBs", "SPP", "SPPF"]


@register_module("spp")
class SPP(nn.Module):
    """YOLO-style SPP: parallel stride-1 max-pools (5, 9, 13) with ``k // 2`` padding.

    ``1x1 conv (C_in -> C_hid = C_in // 2) -> concat[x, pool5(x), pool9(x), pool13(x)] -> 1x1
    conv (4 C_hid -> C_out)``. Unlike SPP-net's fixed bins (-> a vector), the padding keeps
    ``H x W``, so it fits in a fully convolutional neck (YOLOv3-SPP, v4, v5).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None,
                 kernel_sizes: Sequence[int] = (5, 9, 13), hidden_channels: int | None = None,
                 act: str = "silu") -> None:
        super().__init__()
        if any(k % 2 != 1 for k in kernel_sizes):
            raise ValueError("SPP kernels must be odd to keep the spatial size")
        hidden = hidden_channels or max(1, in_channels // 2)
        self.cv1 = ConvBnAct(in_channels, hidden, 1, act=act)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.cv2 = ConvBnAct(hidden * (len(kernel_sizes) + 1), out_channels or in_channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(p(x) for p in self.pools)], dim=1))


@register_module("sppf")
class SPPF(nn.Module):
    """SPP-Fast (YOLOv5): three *sequential* 5x5 max-pools, concatenated; two stacked 5x5
    pools equal one 9x9 and three a 13x13, so this is exactly SPP(5, 9, 13), cheaper."""

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 5,
                 n_pools: int = 3, hidden_channels: int | None = None, act: str = "silu") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("SPPF kernel must be odd to keep the spatial size")
        hidden = hidden_channels or max(1, in_channels // 2)
        self.n_pools = n_pools
        self.cv1 = ConvBnAct(in_channels, hidden, 1, act=act)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.cv2 = ConvBnAct(hidden * (n_pools + 1), out_channels or in_channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        outs = [self.cv1(x)]
        for _ in range(self.n_pools):
            outs.append(self.pool(outs[-1]))
        return self.cv2(torch.cat(outs, dim=1))


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool -> 1x1 conv/BN/ReLU -> upsample to H x W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBnAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register_module("aspp")
class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling, DeepLabv3 version (Chen et al. 2017).

    Five parallel ``conv -> BN -> ReLU`` branches of ``C_hid`` (256) channels: ``branches[0]``
    a 1x1 conv, ``branches[1:4]`` 3x3 convs dilated by ``rates`` (6, 12, 18 at output stride
    16; double them at 8), ``branches[4]`` image pooling, whose BN sees one value per channel
    and sample (train with a batch of at least 2). Concatenated ``(B, 5 C_hid, H, W)``, then
    1x1 conv/BN/ReLU (+ dropout) to ``C_out``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, rates: Sequence[int] = (6, 12, 18),
                 hidden_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBnAct(in_channels, hidden_channels, 1)]
        branches += [ConvBnAct(in_channels, hidden_channels, 3, dilation=r) for r in rates]
        branches.append(_ImagePooling(in_channels, hidden_channels))
        self.branches = nn.ModuleList(branches)
        project = ConvBnAct(hidden_channels * len(branches), out_channels or in_channels, 1)
        self.project = nn.Sequential(project, nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class _RFBase(nn.Module):
    """Shared RFB forward: concat(branches) -> 1x1 linear conv; ``relu(scale * y + shortcut(x))``."""

    branches: nn.ModuleList

    def __init__(self, in_channels: int, out_channels: int | None, cat_channels: int, scale: float) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.scale = scale
        self.fuse = ConvBnAct(cat_channels, out_channels, 1, act=None)  # linear, as in the paper
        self.shortcut = ConvBnAct(in_channels, out_channels, 1, act=None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        return self.act(y * self.scale + self.shortcut(x))


@register_module("rfb")
class RFB(_RFBase):
    """Receptive Field Block (Liu et al., ECCV 2018, Fig. 4a): Inception branches + dilation.

    Each branch ends in a 3x3 conv dilated in step with its kernel size (small kernel <->
    small eccentricity, as in human pRFs); width ``C_in // 8`` (x2 in the dilated layers)::

        1x1 -> 3x3 (rate r0)
        1x1 -> 3x3 -> 3x3 (rate r1)
        1x1 -> 3x3 -> 3x3 -> 3x3 (rate r2)    # the 5x5 as two 3x3s, as in the authors' code

    Then ``relu(scale * conv1x1(concat) + shortcut(x))``, the 1x1 fuse without ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, rates: Sequence[int] = (1, 3, 5),
                 scale: float = 1.0) -> None:
        c = max(1, in_channels // 8)
        r0, r1, r2 = rates
        super().__init__(in_channels, out_channels, 6 * c, scale)
        c15 = c // 2 * 3 or 1
        self.branches = nn.ModuleList([
            nn.Sequential(ConvBnAct(in_channels, 2 * c, 1),
                          ConvBnAct(2 * c, 2 * c, 3, dilation=r0, act=None)),
            nn.Sequential(ConvBnAct(in_channels, c, 1), ConvBnAct(c, 2 * c, 3),
                          ConvBnAct(2 * c, 2 * c, 3, dilation=r1, act=None)),
            nn.Sequential(ConvBnAct(in_channels, c, 1), ConvBnAct(c, c15, 3), ConvBnAct(c15, 2 * c, 3),
                          ConvBnAct(2 * c, 2 * c, 3, dilation=r2, act=None)),
        ])


@register_module("rfb_s")
class RFBs(_RFBase):
    """RFB-s (Fig. 4b), the shallow-layer RFB: 3x3 replaces 5x5, 1x3 / 3x1 replace 3x3::

        1x1 -> 3x3 (rate r0)
        1x1 -> 3x1 -> 3x3 (rate r1)
        1x1 -> 1x3 -> 3x3 (rate r1)
        1x1 -> 1x3 -> 3x1 -> 3x3 (rate r2)

    Branch width ``C_in // 4``; fused like :class:`RFB`.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, rates: Sequence[int] = (1, 3, 5),
                 scale: float = 1.0) -> None:
        c = max(2, in_channels // 4)
        r0, r1, r2 = rates
        super().__init__(in_channels, out_channels, 4 * c, scale)
        half, three_q = c // 2, c // 4 * 3 or 1
        self.branches = nn.ModuleList([
            nn.Sequential(ConvBnAct(in_channels, c, 1), ConvBnAct(c, c, 3, dilation=r0, act=None)),
            nn.Sequential(ConvBnAct(in_channels, c, 1), ConvBnAct(c, c, (3, 1)),
                          ConvBnAct(c, c, 3, dilation=r1, act=None)),
            nn.Sequential(ConvBnAct(in_channels, c, 1), ConvBnAct(c, c, (1, 3)),
                          ConvBnAct(c, c, 3, dilation=r1, act=None)),
            nn.Sequential(ConvBnAct(in_channels, half, 1), ConvBnAct(half, three_q, (1, 3)),
                          ConvBnAct(three_q, c, (3, 1)), ConvBnAct(c, c, 3, dilation=r2, act=None)),
        ])


@register_module("ppm")
class PPM(nn.Module):
    """Pyramid Pooling Module (PSPNet, Zhao et al. 2017).

    Per bin size ``b`` in ``bins``: average pooling to ``b x b``, 1x1 conv/BN/ReLU to
    ``C_in / len(bins)`` channels, bilinear upsampling to ``H x W``; concatenated with the
    input ``(B, 2 C_in, H, W)``, fused by a 3x3 conv/BN/ReLU to ``C_out``. Bin 1's BN sees one
    value per channel: train with a batch of at least 2.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, bins: Sequence[int] = (1, 2, 3, 6),
                 align_corners: bool = False) -> None:
        super().__init__()
        branch = max(1, in_channels // len(bins))
        self.bins = tuple(bins)
        self.align_corners = align_corners
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBnAct(in_channels, branch, 1))
                                    for b in self.bins)
        self.bottleneck = ConvBnAct(in_channels + branch * len(self.bins), out_channels or in_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        size = x.shape[-2:]
        pyramid = [x] + [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=self.align_corners)
                         for stage in self.stages]
        return self.bottleneck(torch.cat(pyramid, dim=1))
