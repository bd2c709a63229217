"""Activations and normalisation of the YOLOv4 "bag of specials": Mish, Swish/SiLU,
hard-swish, and Filter Response Normalisation with its Thresholded Linear Unit.

All activations are element-wise: any shape in, same shape out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox.registry import register_module

__all__ = ["FRN", "HardSwish", "Mish", "Swish", "hard_swish", "mish", "swish"]


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish (Misra 2019): ``x * tanh(softplus(x))``; smooth, non-monotonic, unbounded above."""
    # F.softplus switches to the identity for x > 20, so large inputs do not overflow exp.
    return x * torch.tanh(F.softplus(x))


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Swish (Ramachandran 2017): ``x * sigmoid(beta * x)``; ``beta = 1`` is SiLU."""
    return x * torch.sigmoid(beta * x)


def hard_swish(x: torch.Tensor) -> torch.Tensor:
    """Hard-swish (MobileNetV3): ``x * relu6(x + 3) / 6``, a piecewise-polynomial swish."""
    return x * F.relu6(x + 3.0) / 6.0


@register_module("mish", input_kind="none")
class Mish(nn.Module):
    """Mish activation ``x * tanh(softplus(x))``; any shape -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return mish(x)


@register_module("swish", input_kind="none")
class Swish(nn.Module):
    """Swish ``x * sigmoid(beta x)``; ``beta=1`` (default) is SiLU; ``learnable`` makes beta a parameter."""

    def __init__(self, beta: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        if learnable:
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.register_buffer("beta", torch.tensor(float(beta)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not isinstance(self.beta, nn.Parameter) and float(self.beta) == 1.0:
            return F.silu(x)  # fused kernel, same values
        return swish(x, self.beta)


register_module("silu", input_kind="none", summary="SiLU = Swish with beta = 1")(Swish)


@register_module("hard_swish", input_kind="none")
class HardSwish(nn.Module):
    """Hard-swish ``x * relu6(x + 3) / 6`` (MobileNetV3); any shape -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return hard_swish(x)


@register_module("frn")
class FRN(nn.Module):
    """Filter Response Normalisation + TLU (Singh & Krishnan 2019); ``(B, C, H, W)`` -> same.

    Per sample and channel, with ``nu2 = mean_{H,W}(x^2)``::

        y = gamma * x / sqrt(nu2 + |eps|) + beta        # FRN: no mean subtraction, no batch stats
        z = max(y, tau)                                  # TLU: a learned ReLU threshold

    Without batch statistics it behaves the same at batch size 1 and in eval; without mean
    centring a plain ReLU could kill a channel, hence the TLU. ``learnable_eps``: for 1x1 maps.
    """

    def __init__(self, channels: int, eps: float = 1e-6, learnable_eps: bool = False,
                 tlu: bool = True) -> None:
        super().__init__()
        shape = (1, channels, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.tau = nn.Parameter(torch.zeros(shape)) if tlu else None
        eps_t = torch.full(shape, float(eps))
        if learnable_eps:
            self.eps = nn.Parameter(eps_t)
        else:
            self.register_buffer("eps", eps_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        y = self.gamma * x * torch.rsqrt(nu2 + self.eps.abs()) + self.beta
        return torch.maximum(y, self.tau) if self.tau is not None else y
