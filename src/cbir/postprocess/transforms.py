"""Post-processing of descriptors, scikit-learn style.

Parameters go in ``__init__``; learned state lives in attributes ending in ``_`` and is set
only by ``fit``. Every transform maps ``(N, D)`` float32 to ``(N, D')`` float32.
"""

from __future__ import annotations

import numpy as np


class NotFittedError(RuntimeError):
    """A learned transform was used before ``fit``."""


class Transform:
    """Base: stateless transforms need no ``fit``; learned ones override ``fit`` and ``learned``."""

    learned = False

    def fit(self, x: np.ndarray) -> "Transform":
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
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(n, 1e-12)).astype(np.float32)


class PowerNormalizer(Transform):
    """Signed power normalisation ``sign(x) |x|^alpha`` (alpha = 0.5: signed square root)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.sign(x) * np.abs(x) ** self.alpha).astype(np.float32)


class PCA(Transform):
    """PCA to ``n_components`` dims, optionally whitened (Jegou & Chum 2012 for retrieval).

    ``whiten=True`` divides each component by ``sqrt(eigenvalue + eps)`` so every direction
    has unit variance, which down-weights the bursty dominant directions of CNN descriptors.
    Fitted attributes: ``mean_`` (D,), ``components_`` (K, D), ``explained_variance_`` (K,).
    """

    learned = True

    def __init__(self, n_components: int, whiten: bool = False, eps: float = 1e-6) -> None:
        self.n_components = n_components
        self.whiten = whiten
        self.eps = eps

    def fit(self, x: np.ndarray) -> "PCA":
        x = np.asarray(x, dtype=np.float64)
        n, d = x.shape
        if self.n_components > min(n, d):
            raise ValueError(
                f"PCA to {self.n_components} dims needs at least {self.n_components} fitting "
                f"images of dimension >= {self.n_components}; got {n} of dimension {d}"
            )
        self.mean_ = x.mean(axis=0)
        cov = np.cov(x - self.mean_, rowvar=False, bias=False)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1][: self.n_components]
        self.components_ = eigvec[:, order].T.astype(np.float32)
        self.explained_variance_ = np.maximum(eigval[order], 0).astype(np.float32)
        self.mean_ = self.mean_.astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "components_"):
            raise NotFittedError("PCA is not fitted: fit it on a separate image set first (--fit-on)")
        y = (np.asarray(x, np.float32) - self.mean_) @ self.components_.T
        if self.whiten:
            y = y / np.sqrt(self.explained_variance_ + self.eps)
        return y.astype(np.float32)
