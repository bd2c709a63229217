"""Receptive field: the dilated-conv formula of the notes vs back-propagation from one output pixel."""

from __future__ import annotations

import pytest
from torch import nn

from cbir.toolbox.receptive_field import (
    LayerSpec,
    effective_kernel,
    empirical_receptive_field,
    layers_from_module,
    receptive_field,
)


def test_effective_kernel_formula_of_the_notes() -> None:
    # (rate - 1)(k - 1) + k
    assert [effective_kernel(3, d) for d in (1, 2, 4)] == [3, 5, 9]
    assert effective_kernel(5, 3) == 13


def test_stacked_dilations_reproduce_the_deeplab_figure() -> None:
    # 3x3 rate 1 -> 3x3, then rate 2 -> 7x7, then rate 4 -> 15x15 (the notes' second case).
    rf = receptive_field([(3, 1, 1), (3, 1, 2), (3, 1, 4)])
    assert [r.size for r in rf] == [3, 7, 15]


def test_classic_stack_sizes_and_jumps() -> None:
    # VGG-ish: conv3, conv3, pool2/2, conv3, conv3, pool2/2 -> 16, jump 4.
    rf = receptive_field(
        [
            LayerSpec(3),
            LayerSpec(3),
            LayerSpec(2, 2, padding=0),
            LayerSpec(3),
            LayerSpec(3),
            LayerSpec(2, 2, padding=0),
        ]
    )
    assert [(r.size, r.jump) for r in rf] == [(3, 1), (5, 1), (6, 2), (10, 2), (14, 2), (16, 4)]
    assert rf[2].start == 0.5  # first pooled unit is centred between input pixels 0 and 1


STACKS = [
    nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=2, dilation=2),
        nn.Conv2d(2, 1, 3, padding=4, dilation=4),
    ),
    nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 2, 5, stride=2, padding=4, dilation=2),
    ),
    nn.Sequential(
        nn.Conv2d(2, 2, 7, stride=2, padding=3),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(2, 2, 3, padding=3, dilation=3),
        nn.AvgPool2d(3, 1, 1),
        nn.Conv2d(2, 2, 1),
    ),
    nn.Sequential(nn.Conv2d(1, 1, 3, padding=6, dilation=6), nn.Conv2d(1, 1, 3, padding=12, dilation=12)),
]


@pytest.mark.parametrize("model", STACKS, ids=range(len(STACKS)))
def test_formula_matches_backprop_from_one_output_pixel(model: nn.Module) -> None:
    theory = receptive_field(layers_from_module(model))[-1].size
    assert empirical_receptive_field(model, input_size=161) == (theory, theory)
