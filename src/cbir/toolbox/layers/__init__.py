"""Toolbox layers: one concept per file (attention, receptive_field, fusion, activations,
dropblock, conv, csp), every module registered by name (table in docs/toolbox.md)."""

from cbir.toolbox.layers.activations import FRN, HardSwish, Mish, Swish, hard_swish, mish, swish
from cbir.toolbox.layers.attention import CBAM, ECA, SE, ChannelAttention, SpatialAttention, eca_kernel_size
from cbir.toolbox.layers.conv import ConvBnAct, make_act
from cbir.toolbox.layers.csp import C3, Bottleneck
from cbir.toolbox.layers.dropblock import DropBlock2d, drop_block_2d
from cbir.toolbox.layers.fusion import ASFF, FPN, PAN, BiFPN, FastNormalizedFusion, resize_to
from cbir.toolbox.layers.receptive_field import ASPP, PPM, RFB, SPP, SPPF, RFBs

__all__ = [
    "ASFF", "ASPP", "Bottleneck", "C3", "CBAM", "ECA", "FPN", "FRN", "PAN", "PPM", "RFB", "SE",
    "SPP", "SPPF", "BiFPN", "ChannelAttention", "ConvBnAct", "DropBlock2d", "FastNormalizedFusion",
    "HardSwish", "Mish", "RFBs", "SpatialAttention", "Swish", "drop_block_2d", "eca_kernel_size",
    "hard_swish", "make_act", "mish", "resize_to", "swish",
]
