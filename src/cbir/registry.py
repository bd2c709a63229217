"""One registry shape for every named, swappable part of cbir (the timm ``create_model`` idea).

A `Registry` maps a name to an `Entry`: the constructor, the one number a token may carry
(``GeM3``: p = 3) with its default, and a one-line summary. ``cbir`` prints its vocabularies,
``--help`` texts and "unknown name" errors from the entries, so they can never drift apart
from what is registered.

    >>> LOCALIZERS = Registry("localizer")
    >>> @LOCALIZERS.register("whole", summary="the whole photo")
    ... class Whole: ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered constructor: ``name``, ``build``, the token's option and its summary."""

    name: str
    build: Callable[..., Any]
    summary: str = ""
    option: str | None = None  # what the token's ``:<value>`` means, e.g. "variant"
    default: Any = None  # the option's default value


class Registry:
    """Name -> `Entry`; entries from modules listed in ``lazy`` load on first use."""

    def __init__(self, kind: str, lazy: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._lazy = list(lazy)

    def register(self, name: str, summary: str = "", option: str | None = None,
                 default: Any = None) -> Callable[[_T], _T]:
        def wrap(fn: _T) -> _T:
            if name in self._entries and self._entries[name].build is not fn:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, summary or (doc[0] if doc else ""), option, default)
            return fn

        return wrap

    def _load(self) -> None:
        while self._lazy:
            importlib.import_module(self._lazy.pop(0))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name is a ValueError that lists the known ones."""
        self._load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]

    def create(self, token: str, **kwargs: Any) -> Any:
        """Build from a token ``name`` or ``name:<option>`` (the option as the entry names it)."""
        name, _, value = token.partition(":")
        entry = self.get(name.strip())
        if value:
            if entry.option is None:
                raise ValueError(f"{self.kind} {name!r} takes no option (got {token!r})")
            kwargs[entry.option] = value
        return entry.build(**kwargs)

    def describe(self) -> list[str]:
        """One line per entry, ``name[:<option>]  summary``, for help texts."""
        return [f"{(e.name + (f':<{e.option}>' if e.option else '')):22s} {e.summary}" for e in self]
