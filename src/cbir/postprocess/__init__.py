"""Post-processing of descriptors: normalisation, PCA, PCA-whitening variants, layer fusion.

The `POSTPROCESS` registry maps pipeline tokens (``L2``, ``PCA128``, ``PCAW128``, ``PCAWR128``,
``PCAWS128``, ``POW0.5``, ``W0.3-0.7``, ``Wlearn``) to transform factories. Adding a step is
one class in `transforms` plus one `register_postprocess` line.
"""

from __future__ import annotations

from collections.abc import Callable

from cbir.postprocess.transforms import (PCA, L2Normalizer, LayerFusion, NotFittedError, PowerNormalizer,
                                         Transform, WhiteningPCA)
from cbir.registry import Registry

POSTPROCESS = Registry("post-processing step")

_NUMBER = r"\d+(?:\.\d+)?"


def register_postprocess(prefix: str, factory: Callable, summary: str, option: str | None = None,
                         default: float | None = None, arg: str | None = None) -> None:
    """Add a step ``<prefix>[<option>]`` (an option without a default must be given); ``factory`` takes
    the token's number (float; the default, or None) or, with an ``arg`` pattern, the text it matched."""
    POSTPROCESS.register(prefix, summary=summary, option=option, default=default, pattern=arg or _NUMBER,
                         text=arg is not None)(factory)


def _shrink(arg: str) -> Transform:
    k, _, s = arg.partition("-")
    return WhiteningPCA(int(k), power=0.5, shrinkage=float(s) if s else 0.5)


register_postprocess("L2", lambda _: L2Normalizer(), "L2 normalisation")
register_postprocess("POW", PowerNormalizer, "signed power normalisation (alpha = 0.5 when not given)", "alpha", 0.5)
register_postprocess("PCA", lambda k: PCA(int(k)), "PCA to <k> dims", "k")
register_postprocess("PCAW", lambda k: PCA(int(k), whiten=True), "PCA-whitening to <k> dims", "k")
register_postprocess("PCAWR", lambda k: WhiteningPCA(int(k), power=0.25),
                     "square-root PCA-whitening (eigenvalue^-1/4)", "k")
register_postprocess("PCAWS", _shrink,
                     "shrinkage PCA-whitening, eigenvalues pulled to their mean by s, PCAWS<k>[-s] (s=0.5)", "k",
                     arg=r"\d+(?:-\d*\.?\d+)?")
register_postprocess("W", lambda a: LayerFusion(None if a == "learn" else tuple(map(float, a.split("-")))),
                     "multi-layer fusion weights, one per layer: W0.3-0.7, or Wlearn (from a labelled set)", "weights",
                     arg=r"learn|\d*\.?\d+(?:-\d*\.?\d+)*")


def parse_postprocess(token: str) -> Transform | None:
    """``"PCAW128"`` -> PCA(128, whiten=True); not a post-processing token -> None."""
    if token in POSTPROCESS:  # the bare name ("L2" is a name, not L with parameter 2)
        step = POSTPROCESS.get(token)
        if step.option is not None and step.default is None:
            raise ValueError(f"{token!r} needs a number, e.g. {token}128")
        return step.build(step.default)
    if (found := POSTPROCESS.match(token)) is None:
        return None
    step, m = found
    return step.build(m.group(0) if step.text else float(m.group(0)))


__all__ = ["PCA", "L2Normalizer", "LayerFusion", "NotFittedError", "POSTPROCESS", "PowerNormalizer",
           "Transform", "WhiteningPCA", "parse_postprocess", "register_postprocess"]
