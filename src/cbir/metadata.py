"""The shape of an image's catalog metadata: a flat JSON object of string keys to scalars.

Metadata is shown with every search result, so one row that cannot be serialised (nested
thousands of levels deep, NaN, megabytes of text) would break every search that finds it.
`parse_meta` refuses such input before anything is written; `displayable_meta` is the
read-side guard for rows an older version (or a hand-edited catalog) already holds.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_META_BYTES = 8192  # the JSON text, checked before parsing so that no parse is unbounded
MAX_META_KEYS = 64
MAX_KEY_CHARS = 100
MAX_VALUE_CHARS = 2000
INT_LIMIT = 2**63  # what SQLite and most JSON clients hold exactly

SHAPE = (f"a flat JSON object of at most {MAX_META_KEYS} string keys (up to {MAX_KEY_CHARS} characters) to "
         f"strings (up to {MAX_VALUE_CHARS} characters), numbers, true, false or null, at most {MAX_META_BYTES} bytes")


class MetaError(ValueError):
    """Metadata that does not have the catalog's shape; ``str(e)`` is one line saying why."""


def _refuse_constant(name: str) -> None:
    raise MetaError(f"meta holds {name}, which is not JSON; use a string or null")


def parse_meta(text: str) -> dict[str, Any]:
    """JSON text -> metadata dict, or `MetaError` naming what is wrong with it."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_META_BYTES:
        raise MetaError(f"meta is over {MAX_META_BYTES} bytes; it must be {SHAPE}")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except MetaError:
        raise
    except (ValueError, RecursionError):  # RecursionError: '[[[[...' within the byte limit
        raise MetaError(f'meta is not valid JSON; it must be {SHAPE}, e.g. {{"title": "..."}}') from None
    if not isinstance(obj, dict):
        raise MetaError(f'meta must be a JSON object, e.g. {{"title": "..."}}: {SHAPE}')
    if len(obj) > MAX_META_KEYS:
        raise MetaError(f"meta has {len(obj)} keys; at most {MAX_META_KEYS} are accepted")
    for key, value in obj.items():
        problem = _problem(key, value)
        if problem:
            raise MetaError(f"meta {str(key)[:40]!r}: {problem}; meta must be {SHAPE}")
    return obj


def _problem(key: object, value: object) -> str | None:
    """Why one (key, value) pair does not fit, or None. Never recurses into ``value``."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        return f"keys must be 1 to {MAX_KEY_CHARS} characters"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -INT_LIMIT < value < INT_LIMIT else "integer out of range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "numbers must be finite"
    if isinstance(value, str):
        return None if len(value) <= MAX_VALUE_CHARS else f"strings are at most {MAX_VALUE_CHARS} characters"
    return "values must be strings, numbers, true, false or null, not objects or arrays"


def displayable_meta(obj: object) -> dict[str, Any]:
    """The pairs of a stored ``obj`` that have the metadata shape (all of them for a good row).
    Never raises and never recurses, so that a bad row in the catalog cannot break a search."""
    if not isinstance(obj, dict):
        return {}
    good = {k: v for k, v in obj.items() if _problem(k, v) is None}
    return obj if len(good) == len(obj) <= MAX_META_KEYS else dict(list(good.items())[:MAX_META_KEYS])
