"""cbir.toolbox: the detector / segmenter building blocks of the notes, separate from retrieval.

* :mod:`cbir.toolbox.layers` - attention, receptive-field, fusion, activation, DropBlock modules
* :mod:`cbir.toolbox.registry` - ``create_module("cbam", channels=64)``, ``list_modules()``
* :mod:`cbir.toolbox.augment` - bag-of-freebies augmentations keeping boxes/masks consistent
* :mod:`cbir.toolbox.losses` - focal, label-smoothing CE, Dice (+ IoU-family re-exported)
* :mod:`cbir.toolbox.flops` - per-module FLOPs / MACs / params table
* :mod:`cbir.toolbox.receptive_field` - theoretical and empirical receptive fields

``augment``, ``losses``, ``flops`` and ``receptive_field`` are imported on demand.
"""

from cbir.toolbox import layers
from cbir.toolbox.registry import MODULES, create_module, get_entry, list_modules, register_module

__all__ = ["MODULES", "create_module", "get_entry", "layers", "list_modules", "register_module"]
