"""Conv -> BatchNorm -> activation, the unit most toolbox modules are built from.

Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')`` with ``H' = ceil(H / stride)`` for odd
kernels (padding is chosen as ``dilation * (k - 1) // 2`` so stride 1 keeps the size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_Pair = int | tuple[int, int]

__all__ = ["ConvBnAct", "make_act"]


def make_act(act: str | Callable[[], nn.Module] | None) -> nn.Module:
    """An activation from a short name (``relu``, ``silu``, ``mish``, ...), a factory or None."""
    if act is None or act is False:
        return nn.Identity()
    if callable(act) and not isinstance(act, str):
        return act()
    from cbir.toolbox.layers.activations import HardSwish, Mish, Swish  # local: avoids a cycle

    table: dict[str, Callable[[], nn.Module]] = {
        "relu": lambda: nn.ReLU(inplace=True),
        "relu6": lambda: nn.ReLU6(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),  # darknet's slope
        "silu": Swish,
        "swish": Swish,
        "hard_swish": HardSwish,
        "mish": Mish,
        "sigmoid": nn.Sigmoid,
        "identity": nn.Identity,
    }
    try:
        return table[act]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(table)}") from None


class ConvBnAct(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` (BN would cancel a bias); "same" padding
    for odd kernels, per axis for non-square ones (``(1, 3)``, ``(3, 1)`` in RFB-s)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair = 1, stride: int = 1,
                 dilation: int = 1, groups: int = 1, act: str | Callable[[], nn.Module] | None = "relu",
                 bn: bool = True) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else map(int, kernel_size)
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(out_channels) if bn else nn.Identity()
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - shapes in class doc
        return self.act(self.bn(self.conv(x)))
