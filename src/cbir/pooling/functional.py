"""Pooling of conv feature maps into one vector per image: tiny pure functions.

Every function takes ``x`` of shape ``(N, C, H, W)`` (float) and returns ``(N, C)``; none
normalises its output (the pipeline's ``L2`` step does). Non-negative inputs are assumed where
the method needs them (GeM), as after a ReLU.
"""

from __future__ import annotations

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

    p = 1 is AVE, p -> inf tends to MAX. ``eps`` clamps from below so that x^p is defined.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
