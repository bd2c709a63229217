"""Name -> constructor registry for the toolbox modules (the timm ``create_model`` idea; example
in docs/toolbox.md).

`MODULES` is a `cbir.registry.Registry`. Every entry records how the module consumes its
input (``entry.input_kind``), so generic tools (the ``cbir flops`` command, the tests) can
build and feed any entry from one ``B x C x H x W`` shape:

* ``"channels"``: one tensor ``(B, C, H, W)``; the constructor's first argument is ``C``.
* ``"none"``: one tensor of any shape; the constructor takes no channel count (activations).
* ``"pyramid"``: a list of maps ordered fine -> coarse, level ``i`` of shape
  ``(B, C_i, H / 2**i, W / 2**i)``; the constructor's first argument is ``[C_0, C_1, ...]``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Literal, TypeVar

from torch import nn

from cbir.registry import Entry, Registry

InputKind = Literal["channels", "none", "pyramid"]

__all__ = ["MODULES", "create_module", "get_entry", "list_modules", "register_module"]

# Registration happens as a side effect of importing the layer modules, on first use.
MODULES = Registry("toolbox module", lazy=("cbir.toolbox.layers",), error=KeyError)
_T = TypeVar("_T", bound=Callable[..., nn.Module])


def register_module(name: str, *, input_kind: InputKind = "channels",
                    summary: str = "") -> Callable[[_T], _T]:
    """Decorator registering a constructor as ``name`` (``summary`` default: docstring's first line)."""
    return MODULES.register(name, summary=summary, input_kind=input_kind)


def list_modules(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern`` (``"rfb*"``)."""
    names = sorted(MODULES.names())
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_entry(name: str) -> Entry:
    """The registry entry for ``name`` (case-insensitive, ``-`` == ``_``); KeyError if unknown."""
    return MODULES.get(name.lower().replace("-", "_"))


def create_module(name: str, *args: object, **kwargs: object) -> nn.Module:
    """Build the registered module ``name`` with the constructor's own arguments."""
    return get_entry(name).build(*args, **kwargs)
