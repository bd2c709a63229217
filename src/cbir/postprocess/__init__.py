"""Post-processing of descriptors: normalisation, PCA, PCA-whitening variants, layer fusion.

The registry maps pipeline tokens (``L2``, ``PCA128``, ``PCAW128``, ``PCAWR128``,
``PCAWS128``, ``POW0.5``, ``W0.3-0.7``, ``Wlearn``) to transform factories. Adding a step is
one class in `transforms` plus one `register_postprocess` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cbir.postprocess.transforms import (
    PCA,
    L2Normalizer,
    LayerFusion,
    NotFittedError,
    PowerNormalizer,
    Transform,
    WhiteningPCA,
)

# token prefix -> (factory, needs a number, summary, argument pattern or None)
# Without a pattern the factory takes the token's number (float) or None; with one, it takes
# the argument text that matched the pattern.
POSTPROCESS: dict[str, tuple[Callable, bool, str, str | None]] = {}


def register_postprocess(prefix: str, factory: Callable, needs_number: bool, summary: str,
                         arg: str | None = None) -> None:
    POSTPROCESS[prefix] = (factory, needs_number, summary, arg)


def _shrink(arg: str) -> Transform:
    k, _, s = arg.partition("-")
    return WhiteningPCA(int(k), power=0.5, shrinkage=float(s) if s else 0.5)


def _fusion(arg: str) -> Transform:
    if arg == "learn":
        return LayerFusion(None)
    return LayerFusion(tuple(float(v) for v in arg.split("-")))


register_postprocess("L2", lambda _: L2Normalizer(), False, "L2 normalisation")
register_postprocess("POW", lambda a: PowerNormalizer(a if a is not None else 0.5), False,
                     "signed power normalisation, POW<alpha> (default 0.5)")
register_postprocess("PCA", lambda k: PCA(int(k)), True, "PCA to <k> dims, PCA<k>")
register_postprocess("PCAW", lambda k: PCA(int(k), whiten=True), True, "PCA-whitening to <k> dims, PCAW<k>")
register_postprocess("PCAWR", lambda k: WhiteningPCA(int(k), power=0.25), True,
                     "square-root PCA-whitening (eigenvalue^-1/4), PCAWR<k>")
register_postprocess("PCAWS", _shrink, True,
                     "shrinkage PCA-whitening, eigenvalues pulled to their mean by s, PCAWS<k>[-s] (s=0.5)",
                     arg=r"\d+(?:-\d*\.?\d+)?")
register_postprocess("W", _fusion, True,
                     "multi-layer fusion weights, one per layer: W0.3-0.7, or Wlearn (from a labelled set)",
                     arg=r"learn|\d*\.?\d+(?:-\d*\.?\d+)*")

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_postprocess(token: str) -> Transform | None:
    """``"PCAW128"`` -> PCA(128, whiten=True); not a post-processing token -> None."""
    if token == "L2":  # "L2" is a name, not L with parameter 2
        return L2Normalizer()
    for prefix in sorted(POSTPROCESS, key=len, reverse=True):
        if not token.startswith(prefix):
            continue
        factory, needs_number, _, arg = POSTPROCESS[prefix]
        rest = token[len(prefix):]
        if not rest:
            if needs_number:
                raise ValueError(f"{token!r} needs a number, e.g. {prefix}128")
            return factory(None)
        if arg is not None:
            if re.fullmatch(arg, rest):
                return factory(rest)
        elif _NUMBER.fullmatch(rest):
            return factory(float(rest))
    return None


__all__ = ["PCA", "L2Normalizer", "LayerFusion", "NotFittedError", "POSTPROCESS", "PowerNormalizer",
           "Transform", "WhiteningPCA", "parse_postprocess", "register_postprocess"]
