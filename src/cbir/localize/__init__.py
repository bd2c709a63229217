"""Localization: a photo -> the objects in it, each searched on its own.

A `Localizer` turns one RGB photo into `Region` s (a box, optionally a 4-point polygon and a
mask, and a score). The query path is::

    photo -> localize -> regions -> rectify (polygon -> upright rectangle) -> extract -> search

Localizers are registered in `LOCALIZERS` and built from a token ``name`` or
``name:<option>`` (``cbir localizers`` lists them):

- ``whole``: the photo itself, one region (what searching a photo did before localization).
- ``saliency``: the img-focus package's ViT saliency model, thresholded into components.
- ``pspnet``, ``yolo``, ``tscam``: trained models (their own modules register them).

``gt`` (the ground-truth objects of a benchmark) is not a localizer a photo can have; the
evaluation supplies it (`cbir.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cbir.registry import Registry

LOCALIZERS = Registry("localizer", lazy=("cbir.localize.builtin", "cbir.localize.pspnet", "cbir.localize.yolo",
                                         "cbir.localize.tscam"))


class LocalizerError(ValueError):
    """A localizer that cannot be built or run; the message names it and what is missing."""


@dataclass
class Region:
    """One object found in a photo, in the photo's pixel coordinates.

    ``polygon``: ``(4, 2)`` float corners, clockwise from top-left, when the object is tilted
    or seen in perspective (it is rectified to an upright rectangle before extraction).
    ``mask``: bool ``(H, W)`` of the whole photo, when the localizer segments.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float = 1.0
    polygon: np.ndarray | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box],
                "polygon": None if self.polygon is None else [[round(float(x), 1), round(float(y), 1)]
                                                              for x, y in self.polygon],
                "score": round(float(self.score), 4)}


class Localizer:
    """Base class: ``localize(photo) -> regions``, best first.

    ``name`` is the token it was built from (stored in an index, printed in results).
    Subclasses keep their parameters in ``__init__`` and load models lazily.
    """

    name: str = "?"

    def localize(self, image: Image.Image) -> list[Region]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, image: Image.Image) -> list[Region]:
        w, h = image.size
        regions = [r for r in self.localize(image) if _valid_box(r.box, w, h)]
        return regions


def _valid_box(box, w: int, h: int) -> bool:
    x0, y0, x1, y1 = box
    return np.isfinite([x0, y0, x1, y1]).all() and min(x1, w) - max(x0, 0) >= 2 and min(y1, h) - max(y0, 0) >= 2


def create_localizer(token: str | None, **kwargs) -> Localizer:
    """Build a localizer from ``name`` or ``name:<option>``; ``None`` -> ``whole``."""
    token = (token or "whole").strip()
    try:
        loc = LOCALIZERS.create(token, **kwargs)
    except ValueError as e:
        raise LocalizerError(str(e)) from None
    loc.name = token
    return loc


def list_localizers() -> list[str]:
    return LOCALIZERS.names()


__all__ = ["LOCALIZERS", "Localizer", "LocalizerError", "Region", "create_localizer", "list_localizers"]
