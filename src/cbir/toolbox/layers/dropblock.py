"""DropBlock (Ghiasi et al., NeurIPS 2018): dropout of contiguous square regions.

Dropping independent pixels barely regularises a conv net - neighbours carry the same
information - so DropBlock zeroes ``block_size x block_size`` squares instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox.registry import register_module

__all__ = ["DropBlock2d", "drop_block_2d"]


def drop_block_2d(x: torch.Tensor, drop_prob: float, block_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Functional DropBlock on ``(B, C, H, W)``, always active (the module handles eval).

    Seeds ~ Bernoulli(gamma) at positions where a full block fits, independently per sample
    and channel; each seed zeroes a whole block; kept units are rescaled by
    ``numel / kept`` so the expected activation is unchanged. ``block_size`` is clipped to
    the map size (a 1x1 block is ordinary dropout).
    """
    if drop_prob <= 0.0:
        return x
    b, c, h, w = x.shape
    bs = min(block_size, h, w)
    # Paper eq. 1: each seed drops bs^2 units; the second factor makes up for seeds being
    # sampled only where a whole block fits.
    gamma = drop_prob / bs**2 * (h * w) / ((h - bs + 1) * (w - bs + 1))
    seed_shape = (b, c, h - bs + 1, w - bs + 1)
    seeds = (torch.rand(seed_shape, generator=generator, device=x.device) < gamma).to(x.dtype)
    # Seed (i, j) drops the block with top-left corner (i, j): padding by bs - 1 and a bs x bs
    # max-pool spread each 1 over that block, into an H x W map, for odd and even bs alike.
    seeds = F.pad(seeds, (bs - 1, bs - 1, bs - 1, bs - 1))
    keep = 1.0 - F.max_pool2d(seeds, kernel_size=bs, stride=1)
    scale = keep.numel() / keep.sum().clamp(min=1.0)
    return x * keep * scale


@register_module("dropblock", input_kind="none")
class DropBlock2d(nn.Module):
    """DropBlock for ``(B, C, H, W)`` maps; identity in eval mode or when ``drop_prob == 0``.

    ``drop_prob``: target fraction of dropped units (the paper's ``1 - keep_prob``, 0.1 at the
    end of a linear schedule: set the attribute to schedule it); ``block_size`` 7 as the paper.
    """

    def __init__(self, drop_prob: float = 0.1, block_size: int = 7) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError("drop_prob must be in [0, 1)")
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return drop_block_2d(x, self.drop_prob, self.block_size) if self.training else x

    def extra_repr(self) -> str:  # noqa: D102
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"
