"""Pooling: conv feature maps ``(N, C, H, W)`` -> vectors ``(N, C)``.

`functional` holds the pure functions; this module's registry maps the names used in pipeline
strings (``SUM``, ``AVE``, ``MAX``, ``GeM3``) to them. Adding a method is one function in
`functional` plus one `register_pooling` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cbir.pooling import functional as F


@dataclass(frozen=True)
class PoolingMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    param: str | None = None  # name of the one numeric parameter the token may carry
    default: float | None = None
    summary: str = ""


POOLINGS: dict[str, PoolingMethod] = {}


def register_pooling(name: str, fn: Callable[..., torch.Tensor], param: str | None = None,
                     default: float | None = None, summary: str = "") -> None:
    POOLINGS[name] = PoolingMethod(name, fn, param, default, summary)


register_pooling("SUM", F.spoc, summary="sum pooling (SPoC)")
register_pooling("AVE", F.ave, summary="average pooling")
register_pooling("MAX", F.mac, summary="max pooling (MAC)")
register_pooling("GeM", F.gem, param="p", default=3.0, summary="generalised mean, GeM<p>")

_TOKEN = re.compile(r"^([A-Za-z][A-Za-z\-]*?)([0-9]+(?:\.[0-9]+)?)?$")


def parse_pooling(token: str) -> tuple[PoolingMethod, float | None] | None:
    """``"GeM3"`` -> (GeM, 3.0); ``"MAX"`` -> (MAX, None); not a pooling token -> None."""
    m = _TOKEN.match(token)
    if not m or m.group(1) not in POOLINGS:
        return None
    method = POOLINGS[m.group(1)]
    value = m.group(2)
    if value is not None and method.param is None:
        raise ValueError(f"pooling {method.name} takes no parameter (got {token!r})")
    return method, (float(value) if value is not None else method.default)


def pool(x: torch.Tensor, method: PoolingMethod, value: float | None) -> torch.Tensor:
    """Apply a parsed pooling method: ``(N, C, H, W)`` -> ``(N, C)``."""
    if method.param is None:
        return method.fn(x)
    return method.fn(x, **{method.param: value})


__all__ = ["POOLINGS", "PoolingMethod", "parse_pooling", "pool", "register_pooling", "F"]
