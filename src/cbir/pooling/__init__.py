"""Pooling: conv feature maps ``(N, C, H, W)`` -> vectors ``(N, D)``.

`functional` holds the pure functions; the `POOLINGS` registry maps the pipeline tokens
(``SUM``, ``AVE``, ``MAX``, ``GeM3``, ``RMAC3``, ``SPP``, ``CroW``, ``SCDA``, ``CAM``) to them.
Adding a method is one function in `functional` plus one `register_pooling` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cbir.pooling import functional as F
from cbir.registry import Entry, Registry

POOLINGS = Registry("pooling")
PoolingMethod = Entry  # a parsed pooling is its registry entry (``build`` is the function)

# The number glued to the name; [0-9], not \d: other scripts' digits are not a pooling's.
_NUMBER = r"([0-9]+(?:\.[0-9]+)?)?"


def register_pooling(name: str, fn: Callable[..., torch.Tensor], param: str | None = None,
                     default: float | None = None, summary: str = "", needs: tuple[str, ...] = (),
                     combine: str = "mean") -> None:
    """Add ``fn`` as pooling ``name``. ``param``/``default``: the keyword the token's number is
    passed as (``GeM3``: p = 3); ``needs``: context besides the map, supplied by the extractor
    (``"classifier"``: the backbone's classifier ``weight`` and ``bias``, for CAM); ``combine``: how
    descriptors of several input scales merge (``MS``): ``"mean"``, ``"max"``, or ``"power"`` (GeM
    averages ``v^p`` with its own p, then takes the 1/p-th root)."""
    POOLINGS.register(name, summary=summary, option=param, default=default, pattern=_NUMBER,
                      needs=tuple(needs), combine=combine)(fn)


register_pooling("SUM", F.spoc, summary="sum pooling (SPoC)")
register_pooling("AVE", F.ave, summary="average pooling")
register_pooling("MAX", F.mac, combine="max", summary="max pooling (MAC)")
register_pooling("GeM", F.gem, param="p", default=3.0, combine="power", summary="generalised mean")
register_pooling("RMAC", F.rmac, param="levels", default=3, summary="regional MAC over <levels> scales")
register_pooling("SPP", F.spp, param="levels", default=4, combine="max", summary="spatial pyramid of MAX on 1x1,2x2,4x4 grids (21 C dims)")
register_pooling("CroW", F.crow, summary="cross-dimensional (spatial + channel) weighted SUM")
register_pooling("SCDA", F.scda, summary="AVE+MAX over the largest above-mean component (2 C dims)")
register_pooling("CAM", F.cam, param="k", default=1, needs=("classifier",), summary="class-activation-map weighted AVE, top <k> classes")


def parse_pooling(token: str) -> tuple[PoolingMethod, float | None] | None:
    """``"GeM3"`` -> (GeM, 3.0); ``"MAX"`` -> (MAX, None); not a pooling token -> None."""
    if (found := POOLINGS.match(token)) is None:
        return None
    method, value = found[0], found[1].group(1)
    if value is not None and method.option is None:
        raise ValueError(f"pooling {method.name} takes no parameter (got {token!r})")
    return method, (float(value) if value is not None else method.default)


def pool(x: torch.Tensor, method: PoolingMethod, value: float | None, **context) -> torch.Tensor:
    """Apply a parsed pooling method: ``(N, C, H, W)`` -> ``(N, D)``; ``context``: what methods
    with ``needs`` take (e.g. ``weight``/``bias`` for CAM)."""
    if method.option is not None:
        context[method.option] = value
    return method.build(x, **context)


def combine_scales(vectors: Sequence[torch.Tensor], method: PoolingMethod | None,
                   value: float | None) -> torch.Tensor:
    """Merge one image's descriptors at several input scales as the pooling method (None: mean) requires."""
    stack = torch.stack(list(vectors))
    combine = method.combine if method is not None else "mean"
    if combine == "max":
        return stack.amax(dim=0)
    if combine == "power":
        p = float(value if value is not None else 1.0)
        return stack.clamp(min=1e-6).pow(p).mean(dim=0).pow(1.0 / p)
    return stack.mean(dim=0)


__all__ = ["POOLINGS", "PoolingMethod", "combine_scales", "parse_pooling", "pool", "register_pooling", "F"]
