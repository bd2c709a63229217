"""Receptive field of a stack of conv / pool layers: the formula and an empirical check.

Per layer (kernel ``k``, dilation ``d``; ``j``: input pixels between neighbouring units, the
product of the strides so far; docs/toolbox.md)::

    k_eff = (d - 1)(k - 1) + k      r_out = r_in + (k_eff - 1) * j_in      j_out = j_in * stride

The DeepLab figure's stack 3x3/d1, 3x3/d2, 3x3/d4 sees 3, 7 and 15 pixels (the notes'
``2 (d - 1)(k - 1) + k``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LayerSpec", "RFInfo", "effective_kernel", "empirical_receptive_field", "layers_from_module",
    "receptive_field",
]


@dataclass(frozen=True)
class LayerSpec:
    """One layer along one axis: ``kernel``, ``stride``, ``dilation``, ``padding``
    (``None`` = "same"-style ``dilation (kernel - 1) // 2``, only used for ``start``)."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int | None = None


@dataclass(frozen=True)
class RFInfo:
    """After a layer: receptive field ``size``, ``jump`` (effective stride in input pixels)
    and ``start``: the input coordinate of the centre of output unit 0 (pixel centres are
    integers; may be negative, i.e. inside the padding)."""

    size: int
    jump: int
    start: float


def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """``(dilation - 1)(kernel - 1) + kernel``: 3x3 at rates 1, 2, 4 -> 3, 5, 9."""
    return (dilation - 1) * (kernel - 1) + kernel


def receptive_field(layers: Iterable[LayerSpec | tuple[int, ...]]) -> list[RFInfo]:
    """The receptive field after each layer (``(kernel, stride, dilation[, padding])`` tuples
    are accepted). ``result[-1].size`` is the receptive field of the whole stack."""
    size, jump, start = 1, 1, 0.0
    out: list[RFInfo] = []
    for layer in layers:
        spec = layer if isinstance(layer, LayerSpec) else LayerSpec(*layer)
        k_eff = effective_kernel(spec.kernel, spec.dilation)
        pad = spec.dilation * (spec.kernel - 1) // 2 if spec.padding is None else spec.padding
        size += (k_eff - 1) * jump
        start += ((k_eff - 1) / 2 - pad) * jump
        jump *= spec.stride
        out.append(RFInfo(size, jump, start))
    return out


def _first(v: int | Sequence[int]) -> int:
    return int(v if isinstance(v, int) else v[0])


def layers_from_module(model: nn.Module) -> list[LayerSpec]:
    """The conv / pool layers of ``model`` in registration order, as height-axis specs; valid
    for plain chains only (branches and skips have no single receptive field)."""
    specs = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            pad = _first(m.padding) if not isinstance(m.padding, str) else None
            specs.append(LayerSpec(_first(m.kernel_size), _first(m.stride), _first(m.dilation), pad))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            specs.append(LayerSpec(_first(m.kernel_size), _first(m.stride or m.kernel_size),
                                   _first(getattr(m, "dilation", 1)), _first(m.padding)))  # avg: no dilation
    return specs


def _linearise(model: nn.Module) -> nn.Module:
    """A copy in which every input pixel in the receptive field provably gets a gradient:
    conv weights 1 and biases 0 (no cancellation), max-pools replaced by average pools
    (a max-pool passes the gradient to one pixel per window), eval mode."""
    m = copy.deepcopy(model).eval()
    for name, child in list(m.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.MaxPool2d):
                if _first(sub.dilation) != 1:
                    raise ValueError(f"{name}.{attr}: a dilated max-pool has no average-pool stand-in")
                setattr(child, attr, nn.AvgPool2d(sub.kernel_size, sub.stride, sub.padding, sub.ceil_mode))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
    return m


def empirical_receptive_field(model: nn.Module, input_size: int = 128,
                              channels: int | None = None) -> tuple[int, int]:
    """Measure ``(height, width)`` of the input region that one central output unit depends on:
    the extent of the non-zero gradient of a ``(1, C, S, S)`` input through a linearised copy.

    ``input_size`` S must be well above the receptive field (the border would clip it);
    ``channels`` defaults to the input channels of the first ``Conv2d`` registered in ``model``.
    """
    if channels is None:
        conv = next((mm for mm in model.modules() if isinstance(mm, nn.Conv2d)), None)
        channels = conv.in_channels if conv is not None else 1
    lin = _linearise(model)
    x = torch.ones(1, channels, input_size, input_size, requires_grad=True)
    y = lin(x)
    h, w = y.shape[-2:]
    y[0, :, h // 2, w // 2].sum().backward()
    nz = (x.grad[0].abs().sum(0) > 0).nonzero()
    if nz.numel() == 0:
        return 0, 0
    return int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)
