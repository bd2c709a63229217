"""Multi-scale feature fusion necks: FPN, PAN, BiFPN, ASFF.

Conventions shared by every neck here:

* Input: a list of maps ordered **fine -> coarse** (e.g. C3, C4, C5), level ``i`` of shape
  ``(B, C_i, H_i, W_i)`` with ``H_{i+1} ~= H_i / 2`` (any sizes: resampling always targets
  the exact size of the other level, so odd sizes such as 15 -> 8 -> 4 work).
* Output: a list in the same order with the same spatial sizes and ``out_channels`` each
  (ASFF returns the single fused level it was built for).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox.layers.conv import ConvBnAct
from cbir.toolbox.registry import register_module

__all__ = ["ASFF", "BiFPN", "FPN", "FastNormalizedFusion", "PAN", "resize_to"]


def resize_to(x: torch.Tensor, ref: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resample ``x`` to ``ref``'s spatial size (no-op when equal). Nearest, as in FPN."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode=mode)


def _check(features: Sequence[torch.Tensor], n: int) -> None:
    if len(features) != n:
        raise ValueError(f"expected {n} feature maps (fine -> coarse), got {len(features)}")


@register_module("fpn", input_kind="pyramid")
class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017): top-down pathway with lateral connections.

    ``L_i = conv1x1(C_i)``; ``P_top = L_top``; ``P_i = L_i + upsample(P_{i+1})`` (nearest),
    then a 3x3 conv against the upsampling aliasing.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.lateral = nn.ModuleList(ConvBnAct(c, out_channels, 1, act=None) for c in self.in_channels)
        self.output = nn.ModuleList(ConvBnAct(out_channels, out_channels, 3) for _ in self.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        _check(features, len(self.lateral))
        lat = [l(f) for l, f in zip(self.lateral, features)]
        for i in range(len(lat) - 2, -1, -1):  # coarse -> fine: laterals summed top-down
            lat[i] = lat[i] + resize_to(lat[i + 1], lat[i])
        return [conv(p) for conv, p in zip(self.output, lat)]


@register_module("pan", input_kind="pyramid")
class PAN(nn.Module):
    """Path Aggregation Network (Liu et al. 2018): FPN top-down plus a bottom-up path.

    After the FPN outputs ``P_i``: ``N_0 = P_0``; ``N_{i+1} = conv3x3(P_{i+1} +
    conv3x3_stride2(N_i))``, a short path from the well-localised fine levels to the coarse
    ones. ``fuse="concat"`` (YOLOv4's PAN) concatenates instead, then a 1x1 conv.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, fuse: str = "add") -> None:
        super().__init__()
        if fuse not in ("add", "concat"):
            raise ValueError("fuse must be 'add' or 'concat'")
        n = len(in_channels)
        self.fuse = fuse
        self.fpn = FPN(in_channels, out_channels)
        self.down = nn.ModuleList(ConvBnAct(out_channels, out_channels, 3, stride=2) for _ in range(n - 1))
        cat = fuse == "concat"
        self.merge = nn.ModuleList(ConvBnAct(out_channels * (1 + cat), out_channels, 1 if cat else 3)
                                   for _ in range(n - 1))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        p = self.fpn(features)
        outs = [p[0]]
        for i, (down, merge) in enumerate(zip(self.down, self.merge)):
            d = resize_to(down(outs[-1]), p[i + 1])  # stride-2 conv; resize only fixes odd sizes
            outs.append(merge(torch.cat([p[i + 1], d], 1) if self.fuse == "concat" else p[i + 1] + d))
        return outs


class FastNormalizedFusion(nn.Module):
    """EfficientDet's fast normalised fusion of ``n`` same-shape maps:
    ``O = sum_i w_i I_i / (eps + sum_j w_j)``, ``w = relu(raw)`` - a softmax without the exp."""

    def __init__(self, n_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_inputs))

    def normalized_weights(self) -> torch.Tensor:
        """``(n,)`` weights, each in [0, 1), summing to ``sum w / (eps + sum w)`` (<= 1)."""
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return sum(wi * x for wi, x in zip(self.normalized_weights(), inputs))  # type: ignore[return-value]


class _SeparableConv(nn.Sequential):
    """EfficientDet's fusion conv: swish -> depthwise 3x3 -> pointwise 1x1 -> BN."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )


@register_module("bifpn", input_kind="pyramid")
class BiFPN(nn.Module):
    """One BiFPN layer (Tan et al., EfficientDet 2020): weighted bidirectional fusion.

    Top-down ``P_i^td = conv(fuse(P_i, up(P_{i+1}^td)))``, the finest being its own output;
    bottom-up ``P_i^out = conv(fuse(P_i, P_i^td, down(P_{i-1}^out)))``, without ``P_i^td``
    at the coarsest level. ``fuse``: :class:`FastNormalizedFusion`; ``down``: 3x3 stride-2
    max-pool. Stack layers (``nn.Sequential``: lists in and out) for the full BiFPN.
    ``in_channels`` (one int, or per level) other than ``channels`` get a 1x1 conv/BN.
    """

    def __init__(self, in_channels: Sequence[int] | int, channels: int | None = None,
                 n_levels: int | None = None) -> None:
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = [in_channels] * (n_levels or 5)
        in_channels = list(in_channels)
        self.n_levels = n = len(in_channels)
        if n < 2:
            raise ValueError("BiFPN needs at least two levels")
        self.channels = channels = channels or in_channels[0]
        self.project = nn.ModuleList(nn.Identity() if c == channels else ConvBnAct(c, channels, 1, act=None)
                                     for c in in_channels)
        self.td_fuse = nn.ModuleList(FastNormalizedFusion(2) for _ in range(n - 1))  # levels n-2 .. 0
        self.td_conv = nn.ModuleList(_SeparableConv(channels) for _ in range(n - 1))
        self.bu_fuse = nn.ModuleList(FastNormalizedFusion(3 if i < n - 1 else 2) for i in range(1, n))
        self.bu_conv = nn.ModuleList(_SeparableConv(channels) for _ in range(n - 1))

    def fusion_modules(self) -> list[FastNormalizedFusion]:
        """All fusion nodes (top-down then bottom-up), e.g. to inspect their weights."""
        return [*self.td_fuse, *self.bu_fuse]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: D102
        _check(features, self.n_levels)
        p = [proj(f) for proj, f in zip(self.project, features)]
        n = self.n_levels
        td = [torch.empty(0)] * (n - 1) + [p[n - 1]]
        for k, i in enumerate(range(n - 2, -1, -1)):
            td[i] = self.td_conv[k](self.td_fuse[k]([p[i], resize_to(td[i + 1], p[i])]))
        out = [td[0]]
        for k, i in enumerate(range(1, n)):
            down = resize_to(F.max_pool2d(out[-1], 3, stride=2, padding=1), p[i])
            inputs = [p[i], td[i], down] if i < n - 1 else [p[i], down]
            out.append(self.bu_conv[k](self.bu_fuse[k](inputs)))
        return out


@register_module("asff", input_kind="pyramid")
class ASFF(nn.Module):
    """Adaptively Spatial Feature Fusion (Liu et al. 2019) of three levels into ``level``
    (0 = the finest). ``[3 x (B, C_i, H_i, W_i)] -> (B, out, H_level, W_level)``.

    Coarser levels get a 1x1 conv and nearest upsampling, finer ones a 3x3 stride-2 conv
    (after a 3x3 stride-2 max-pool for a 4x step). Per-pixel softmax weights over the levels
    (1x1 convs to ``compress`` channels, concatenated, 1x1 conv to 3 logits) give
    ``y = a x0 + b x1 + c x2``, ``a + b + c = 1``; then a 3x3 conv to ``out_channels``.
    """

    def __init__(self, in_channels: Sequence[int], level: int = 0, out_channels: int | None = None,
                 compress: int = 16) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 3 or level not in (0, 1, 2):
            raise ValueError("ASFF fuses exactly three levels; level must be 0, 1 or 2")
        self.level = level
        c = in_channels[level]
        resize: list[nn.Module] = []
        for i, ci in enumerate(in_channels):
            if i == level:
                resize.append(nn.Identity())
            elif i > level:  # coarser: fix channels, upsample in forward
                resize.append(ConvBnAct(ci, c, 1, act="leaky_relu"))
            else:  # finer: downsample 2x per level step
                pools = [nn.MaxPool2d(3, stride=2, padding=1) for _ in range(level - i - 1)]
                resize.append(nn.Sequential(*pools, ConvBnAct(ci, c, 3, stride=2, act="leaky_relu")))
        self.resize = nn.ModuleList(resize)
        self.weight_convs = nn.ModuleList(ConvBnAct(c, compress, 1, act="leaky_relu") for _ in range(3))
        self.weight_logits = nn.Conv2d(3 * compress, 3, 1)
        self.expand = ConvBnAct(c, out_channels or c, 3, act="leaky_relu")

    def _levels(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The three maps resized to ``level``, and their per-pixel weights."""
        _check(features, 3)
        resized = [resize_to(r(f), features[self.level]) for r, f in zip(self.resize, features)]
        logits = self.weight_logits(torch.cat([wc(r) for wc, r in zip(self.weight_convs, resized)], 1))
        return resized, logits.softmax(dim=1)

    def fusion_weights(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, 3, H_level, W_level)`` per-pixel level weights: softmax, sum 1 over dim 1."""
        return self._levels(features)[1]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:  # noqa: D102
        resized, w = self._levels(features)
        return self.expand(sum(w[:, i : i + 1] * r for i, r in enumerate(resized)))
