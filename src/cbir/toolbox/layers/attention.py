"""Attention modules: SE, CBAM (channel attention + spatial attention module, SAM), ECA.

Each module multiplies its input by a gate in (0, 1) and keeps the shape
``(B, C, H, W) -> (B, C, H, W)``. ``gate(x)`` returns the gate alone so it can be inspected:
``(B, C, 1, 1)`` for the channel gates (SE, ECA, CAM) and ``(B, 1, H, W)`` for SAM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cbir.toolbox.layers.conv import make_act
from cbir.toolbox.registry import register_module

__all__ = ["CBAM", "ECA", "SE", "ChannelAttention", "SpatialAttention", "eca_kernel_size"]


class _Gate(nn.Module):
    """``forward(x) = x * gate(x)``; subclasses define ``gate`` (shapes in the module docstring)."""

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover  # noqa: D102
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * self.gate(x)


@register_module("se")
class SE(_Gate):
    """Squeeze-and-Excitation (Hu et al. 2018): ``s = sigmoid(W2 relu(W1 avgpool(x)))``,
    ``W1: C -> C/r``, ``W2: C/r -> C`` (the paper's FC layers as 1x1 convs); output ``x * s``."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8, act: str = "relu") -> None:
        super().__init__()
        hidden = max(min_channels, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(dim=(2, 3), keepdim=True)  # squeeze
        return torch.sigmoid(self.fc2(self.act(self.fc1(s))))  # excitation


@register_module("channel_attention")
class ChannelAttention(_Gate):
    """CBAM channel attention (CAM): ``s = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, one
    shared MLP; max pooling adds the "most distinctive" cue SE's average misses."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8) -> None:
        super().__init__()
        hidden = max(min_channels, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


@register_module("sam", input_kind="channels", summary="Spatial attention module (CBAM's SAM), any C")
class SpatialAttention(_Gate):
    """CBAM spatial attention (SAM): ``s = sigmoid(conv7x7([mean_c(x); max_c(x)]))``.
    ``channels`` is accepted (and ignored) so every attention module is built the same way."""

    def __init__(self, channels: int | None = None, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd to keep the spatial size")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))


@register_module("cbam")
class CBAM(nn.Module):
    """CBAM (Woo et al. 2018): ``y = x * Mc(x); out = y * Ms(y)``, channel attention first as
    the paper found best."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7,
                 min_channels: int = 8) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, min_channels)
        self.spatial = SpatialAttention(channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.spatial(self.channel(x))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive 1-D kernel ``k = |log2(C)/gamma + b/gamma|_odd`` (nearest odd above).

    C = 64 -> 3, 128 -> 5, 256 -> 5, 512 -> 5, 1024 -> 5, 2048 -> 7 (paper's defaults gamma=2, b=1).
    """
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_module("eca")
class ECA(_Gate):
    """Efficient Channel Attention (Wang et al. 2020): ``s = sigmoid(conv1d_k(avgpool(x)))``,
    cross-channel interaction without SE's bottleneck; ``k`` from :func:`eca_kernel_size`."""

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: int = 2, b: int = 1) -> None:
        super().__init__()
        self.kernel_size = kernel_size or eca_kernel_size(channels, gamma, b)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(dim=(2, 3))  # (B, C)
        s = self.conv(s.unsqueeze(1)).squeeze(1)  # channels as a 1-D sequence: (B, 1, C)
        return torch.sigmoid(s)[:, :, None, None]
