"""CSP blocks (Cross Stage Partial, Wang et al. 2020) as YOLOv5 uses them: ``Bottleneck`` and ``C3``.

``C3``: the input is split into two 1x1-conv branches of ``c_ = e * c_out`` channels; one
goes through ``n`` bottlenecks, the other is kept as is; the two are concatenated and fused
by a third 1x1 conv. Half of the channels skip the bottleneck stack, so the gradient has a
short path and the block costs about half of a plain stack of the same width.
Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.toolbox.layers.conv import ConvBnAct
from cbir.toolbox.registry import register_module

__all__ = ["Bottleneck", "C3"]


@register_module("bottleneck")
class Bottleneck(nn.Module):
    """YOLOv5's residual bottleneck: 1x1 conv to ``e * c_out``, 3x3 conv back, plus the input
    when ``shortcut`` and the channel counts match. ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, shortcut: bool = True,
                 expansion: float = 0.5, act: str = "silu") -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        hidden = max(1, int(out_channels * expansion))
        self.cv1 = ConvBnAct(in_channels, hidden, 1, act=act)
        self.cv2 = ConvBnAct(hidden, out_channels, 3, act=act)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register_module("c3")
class C3(nn.Module):
    """CSP bottleneck with three convs (YOLOv5's C3): ``n`` bottlenecks on half the channels."""

    def __init__(self, in_channels: int, out_channels: int | None = None, n: int = 1, shortcut: bool = True,
                 expansion: float = 0.5, act: str = "silu") -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        hidden = max(1, int(out_channels * expansion))
        self.cv1 = ConvBnAct(in_channels, hidden, 1, act=act)
        self.cv2 = ConvBnAct(in_channels, hidden, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, 1.0, act) for _ in range(n)))
        self.cv3 = ConvBnAct(2 * hidden, out_channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))
