"""Post-processing of descriptors, scikit-learn style.

Parameters go in ``__init__``; learned state lives in attributes ending in ``_`` and is set
only by ``fit``. Every transform maps ``(N, D)`` float32 to ``(N, D')`` float32.
"""

from __future__ import annotations

import itertools

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Each row (vector along the last axis) divided by its L2 norm; rows of zeros stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class NotFittedError(RuntimeError):
    """A learned transform was used before ``fit``."""


class Transform:
    """Base: stateless transforms need no ``fit``; learned ones override ``fit`` and ``learned``
    (``y``: labels, used by the ``supervised`` ones only)."""

    learned = False

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> "Transform":
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def state(self) -> dict[str, np.ndarray]:
        """Learned attributes (the ones ending in ``_``), for saving with an index."""
        return {k: v for k, v in vars(self).items() if k.endswith("_")}

    def load_state(self, state: dict[str, np.ndarray]) -> "Transform":
        for k, v in state.items():
            setattr(self, k, v)
        return self


class L2Normalizer(Transform):
    """Divide each row by its L2 norm (rows of zeros stay zero)."""

    def transform(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x).astype(np.float32)


class PowerNormalizer(Transform):
    """Signed power normalisation ``sign(x) |x|^alpha`` (alpha = 0.5: signed square root)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.sign(x) * np.abs(x) ** self.alpha).astype(np.float32)


class PCA(Transform):
    """PCA to ``n_components`` dims, optionally whitened (Jegou & Chum 2012 for retrieval):
    ``whiten=True`` divides each component by ``sqrt(eigenvalue + eps)`` (unit variance), which
    down-weights the bursty dominant directions of CNN descriptors.
    Fitted attributes: ``mean_`` (D,), ``components_`` (K, D), ``explained_variance_`` (K,)."""

    learned = True

    def __init__(self, n_components: int, whiten: bool = False, eps: float = 1e-6) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.eps = eps

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> "PCA":
        x = np.asarray(x, dtype=np.float64)
        n, d = x.shape
        if self.n_components > min(n, d):
            raise ValueError(f"PCA to {self.n_components} dims needs at least {self.n_components} fitting "
                             f"images of dimension >= {self.n_components}; got {n} of dimension {d}")
        mean = x.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov(x - mean, rowvar=False, bias=False))
        order = np.argsort(eigval)[::-1][: self.n_components]
        self.mean_ = mean.astype(np.float32)
        self.components_ = eigvec[:, order].T.astype(np.float32)
        self.explained_variance_ = np.maximum(eigval[order], 0).astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "components_"):
            raise NotFittedError("PCA is not fitted: fit it on a separate image set first (--fit-on)")
        y = (np.asarray(x, np.float32) - self.mean_) @ self.components_.T
        if self.whiten:
            y = y / np.sqrt(self.explained_variance_ + self.eps)
        return y.astype(np.float32)


class WhiteningPCA(PCA):
    """PCA-whitening variants: each component divided by ``(eigenvalue')^power``; 0.5: plain whitening,
    0.25: square-root (power-law, alpha = 0.5) whitening, dominant directions damped, not flattened.
    ``shrinkage`` s in [0, 1] first pulls the eigenvalues towards their mean, ``(1 - s) eigenvalue + s mean``,
    so that weak, noisily estimated directions are not blown up when the fitting set is small."""

    def __init__(self, n_components: int, power: float = 0.5, shrinkage: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__(n_components, whiten=False, eps=eps)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"whitening shrinkage must be in [0, 1], got {shrinkage}")
        self.power = power
        self.shrinkage = shrinkage

    def transform(self, x: np.ndarray) -> np.ndarray:
        y = super().transform(x)
        lam = self.explained_variance_.astype(np.float64)
        lam = (1.0 - self.shrinkage) * lam + self.shrinkage * lam.mean()
        return (y / (lam + self.eps) ** self.power).astype(np.float32)


class LayerFusion(Transform):
    """Multi-layer fusion of the raw descriptor, the concatenation of per-layer pooled vectors: each
    layer's block (sizes ``dims_``, set by the extractor) L2-normalised and scaled by ``sqrt(w_i / sum w)``
    (unit norm; inner product: the weighted mean of the per-layer cosines). ``weights=None``: learned
    by `fit` from a labelled set ``y`` (docs/methods.md, "Learned layer weights")."""

    supervised = True

    def __init__(self, weights: tuple[float, ...] | None = None) -> None:
        self.weights = weights
        self.learned = weights is None
        if weights is not None:
            self.weights_ = np.asarray(weights, np.float32)
        self.dims_ = np.zeros(0, np.int64)

    def blocks(self, x: np.ndarray) -> list[np.ndarray]:
        dims = [int(d) for d in self.dims_]
        if sum(dims) != x.shape[1]:
            raise ValueError(f"layer fusion: block sizes {dims} do not add up to {x.shape[1]}")
        return [l2_normalize(b) for b in np.split(x, np.cumsum(dims)[:-1], axis=1)]

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> "LayerFusion":
        if not self.learned:
            return self
        if y is None or len(set(np.asarray(y).tolist())) < 2:
            raise ValueError("learned layer weights (Wlearn) need a labelled fitting set: "
                             "a benchmark folder or a folder per class given with --fit-on")
        self.weights_ = learn_layer_weights(self.blocks(x), np.asarray(y))
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "weights_"):
            raise NotFittedError("learned layer weights are not fitted: give a labelled set with --fit-on")
        w = np.asarray(self.weights_, np.float64)
        blocks = self.blocks(np.asarray(x, np.float32))
        if len(w) != len(blocks):
            raise ValueError(f"{len(w)} layer weights for {len(blocks)} layers")
        w = w / w.sum()
        return np.concatenate([np.sqrt(wi) * b for wi, b in zip(w, blocks)], axis=1).astype(np.float32)


def loo_map(sims: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out retrieval mAP on a labelled set: each item queries all the others."""
    aps = []
    for i in range(len(y)):
        s = np.delete(sims[i], i)
        rel = np.delete(y == y[i], i)
        if not rel.any():
            continue
        ranks = np.flatnonzero(rel[np.argsort(-s, kind="stable")])  # where the relevant items rank
        aps.append(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1)))
    return float(np.mean(aps)) if aps else 0.0


def learn_layer_weights(blocks: list[np.ndarray], y: np.ndarray, step: float = 0.1) -> np.ndarray:
    """Grid search on the simplex for per-layer weights maximising leave-one-out mAP."""
    sims = [b @ b.T for b in blocks]
    n = len(blocks)
    m = int(round(1 / step))
    best, best_w = -1.0, None
    uniform = np.full(n, 1.0 / n)
    simplex = (c for c in itertools.product(range(m + 1), repeat=n) if sum(c) == m)  # in steps of 1/m
    for combo in simplex:
        w = np.asarray(combo, np.float64) / m
        score = loo_map(sum(wi * s for wi, s in zip(w, sims)), y)
        if score > best + 1e-9 or (abs(score - best) <= 1e-9 and np.abs(w - uniform).sum() < np.abs(best_w - uniform).sum()):
            best, best_w = score, w
    return best_w.astype(np.float32)

