"""Post-processing of descriptors: normalisation, PCA, PCA-whitening.

The registry maps pipeline tokens (``L2``, ``PCA128``, ``PCAW128``, ``POW0.5``) to transform
factories. Adding a step is one class in `transforms` plus one `register_postprocess` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cbir.postprocess.transforms import (
    PCA,
    L2Normalizer,
    NotFittedError,
    PowerNormalizer,
    Transform,
)

# token prefix -> (factory taking the token's number or None, needs a number, summary)
POSTPROCESS: dict[str, tuple[Callable[[float | None], Transform], bool, str]] = {}


def register_postprocess(prefix: str, factory: Callable[[float | None], Transform],
                         needs_number: bool, summary: str) -> None:
    POSTPROCESS[prefix] = (factory, needs_number, summary)


register_postprocess("L2", lambda _: L2Normalizer(), False, "L2 normalisation")
register_postprocess("POW", lambda a: PowerNormalizer(a if a is not None else 0.5), False,
                     "signed power normalisation, POW<alpha> (default 0.5)")
register_postprocess("PCA", lambda k: PCA(int(k)), True, "PCA to <k> dims, PCA<k>")
register_postprocess("PCAW", lambda k: PCA(int(k), whiten=True), True, "PCA-whitening to <k> dims, PCAW<k>")

_TOKEN = re.compile(r"^([A-Z][A-Z0-9]*?)([0-9]+(?:\.[0-9]+)?)?$")


def parse_postprocess(token: str) -> Transform | None:
    """``"PCAW128"`` -> PCA(128, whiten=True); not a post-processing token -> None."""
    if token == "L2":  # "L2" is a name, not L with parameter 2
        return L2Normalizer()
    m = _TOKEN.match(token)
    if not m or m.group(1) not in POSTPROCESS:
        return None
    factory, needs_number, _ = POSTPROCESS[m.group(1)]
    if needs_number and m.group(2) is None:
        raise ValueError(f"{token!r} needs a number, e.g. {m.group(1)}128")
    return factory(float(m.group(2)) if m.group(2) else None)


__all__ = ["PCA", "L2Normalizer", "NotFittedError", "POSTPROCESS", "PowerNormalizer",
           "Transform", "parse_postprocess", "register_postprocess"]
