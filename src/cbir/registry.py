"""One registry shape for every named, swappable part of cbir (the timm ``create_model`` idea).

A `Registry` maps a name to an `Entry`: the constructor, the one number a token may carry
(``GeM3``: p = 3) with its default, a one-line summary, and what else its kind needs. ``cbir``
prints its vocabularies, ``--help`` texts and "unknown name" errors from the entries, so they
never drift apart from what is registered. A token is ``name`` or ``name:<option>``
(`Registry.create`; localizers, ``timm:<model>``), or the name with its argument glued on
(``GeM3``, ``PCAWS64-0.5``; `Registry.match`, by the entry's ``pattern``).

    >>> LOCALIZERS = Registry("localizer")
    >>> @LOCALIZERS.register("whole", summary="the whole photo")
    ... class Whole: ...
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered constructor; ``extra`` holds the fields only one kind has (pooling's
    ``needs``/``combine``, a backbone's ``package``), read as attributes: ``entry.needs``."""

    name: str
    build: Callable[..., Any]
    summary: str = ""
    option: str | None = None  # what the token's number or ``:<value>`` means, e.g. "p", "variant"
    default: Any = None  # the option's default value
    pattern: str | None = None  # regex the text glued after the name must match ("64-0.5" of PCAWS64-0.5)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __getattr__(self, key: str) -> Any:
        # Only called for names that are not fields; "extra" itself is excluded so that
        # copying or unpickling (which look attributes up before the fields exist) cannot recurse.
        if key != "extra" and not key.startswith("__") and key in self.extra:
            return self.extra[key]
        raise AttributeError(key)

    @property
    def usage(self) -> str:
        """How a token names it: ``GeM<p>``, ``yolo:<variant>``, ``MAX``."""
        if self.option is None:
            return self.name
        return f"{self.name}<{self.option}>" if self.pattern is not None else f"{self.name}:<{self.option}>"


class Registry:
    """Name -> `Entry`; entries from modules listed in ``lazy`` load on first use. Listing order:
    entries registered outside the lazy modules, then each lazy module's in the order ``lazy``
    lists them, each in registration order (not import order). Unknown names raise ``error``."""

    def __init__(self, kind: str, lazy: tuple[str, ...] = (), error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, Entry] = {}
        self._modules = tuple(lazy)
        self._lazy = list(lazy)

    def register(self, name: str, *, summary: str = "", option: str | None = None, default: Any = None,
                 pattern: str | None = None, **extra: Any) -> Callable[[_T], _T]:
        """Decorator adding ``fn`` under ``name``; the summary defaults to its docstring's first line."""

        def wrap(fn: _T) -> _T:
            if name in self._entries and self._entries[name].build is not fn:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, summary or (doc[0] if doc else ""), option, default,
                                        pattern, extra)
            return fn

        return wrap

    def _load(self) -> None:
        while self._lazy:
            importlib.import_module(self._lazy.pop(0))

    def _rank(self, entry: Entry) -> int:
        module = getattr(entry.build, "__module__", None)
        return self._modules.index(module) if module in self._modules else -1

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(sorted(self._entries.values(), key=self._rank))  # stable: registration order within a module

    def names(self) -> list[str]:
        return [e.name for e in self]

    def get(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name is an ``error`` that lists the known ones."""
        self._load()
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(e.usage for e in self)}")
        return self._entries[name]

    __getitem__ = get

    def create(self, token: str, **kwargs: Any) -> Any:
        """Build from a token ``name`` or ``name:<option>`` (the option as the entry names it)."""
        name, _, value = token.partition(":")
        entry = self.get(name.strip())
        if value:
            if entry.option is None:
                raise self.error(f"{self.kind} {name!r} takes no option (got {token!r})")
            kwargs[entry.option] = value
        return entry.build(**kwargs)

    def match(self, token: str) -> tuple[Entry, re.Match] | None:
        """The entry whose name starts ``token`` and whose ``pattern`` matches the rest, longest
        name first (``PCAWS64`` is PCAWS, not PCAW or PCA); None when no entry fits."""
        self._load()
        for entry in sorted(self._entries.values(), key=lambda e: len(e.name), reverse=True):
            if entry.pattern is not None and token.startswith(entry.name) and (
                    m := re.fullmatch(entry.pattern, token[len(entry.name):])):
                return entry, m
        return None

    def choices(self) -> str:
        """``a (summary), b (summary)``: the vocabulary on one line, for ``--help`` texts."""
        return ", ".join(f"{e.usage} ({e.summary})" for e in self)

    def describe(self, width: int = 22) -> list[str]:
        """One line per entry, ``usage  summary``, for help texts and ``cbir`` listings."""
        return [f"{e.usage:{width}s} {e.summary}" for e in self]
