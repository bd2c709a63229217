"""Name -> constructor registry for the toolbox modules (the timm ``create_model`` idea).

    >>> from cbir.toolbox import create_module, list_modules
    >>> cbam = create_module("cbam", channels=64)
    >>> "aspp" in list_modules()
    True

Every entry records how the module consumes its input, so generic tools (the ``cbir
flops`` command, the tests) can build and feed any entry from one ``B x C x H x W`` shape:

* ``"channels"``: one tensor ``(B, C, H, W)``; the constructor's first argument is ``C``.
* ``"none"``: one tensor of any shape; the constructor takes no channel count (activations).
* ``"pyramid"``: a list of maps ordered fine -> coarse, level ``i`` of shape
  ``(B, C_i, H / 2**i, W / 2**i)``; the constructor's first argument is ``[C_0, C_1, ...]``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from torch import nn

InputKind = Literal["channels", "none", "pyramid"]

__all__ = ["ModuleEntry", "create_module", "get_entry", "list_modules", "register_module"]


@dataclass(frozen=True)
class ModuleEntry:
    """One registered module: its name, constructor, input kind and one-line summary."""

    name: str
    constructor: Callable[..., nn.Module]
    input_kind: InputKind
    summary: str


_REGISTRY: dict[str, ModuleEntry] = {}
_T = TypeVar("_T", bound=Callable[..., nn.Module])


def register_module(
    name: str | None = None, *, input_kind: InputKind = "channels", summary: str | None = None
) -> Callable[[_T], _T]:
    """Class/function decorator adding a constructor to the registry under ``name``.

    ``name`` defaults to the lower-cased class name; ``summary`` to the docstring's first line.
    """

    def wrap(fn: _T) -> _T:
        key = (name or fn.__name__).lower()
        if key in _REGISTRY and _REGISTRY[key].constructor is not fn:
            raise KeyError(f"toolbox module {key!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModuleEntry(key, fn, input_kind, summary or (doc[0] if doc else ""))
        return fn

    return wrap


def _populate() -> None:
    # Registration happens as a side effect of importing the layer modules; importing here
    # (not at the top) keeps registry.py free of import cycles.
    import cbir.toolbox.layers  # noqa: F401


def list_modules(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern`` (``"rfb*"``)."""
    _populate()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_entry(name: str) -> ModuleEntry:
    """The registry entry for ``name`` (case-insensitive, ``-`` == ``_``); KeyError if unknown."""
    _populate()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise KeyError(f"unknown toolbox module {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def create_module(name: str, *args: object, **kwargs: object) -> nn.Module:
    """Build the registered module ``name`` with the constructor's own arguments."""
    return get_entry(name).constructor(*args, **kwargs)
