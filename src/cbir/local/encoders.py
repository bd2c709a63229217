"""Encoders of a set of local descriptors into one vector: BoW, VLAD, Fisher vectors.

Each encoder is learned on the region descriptors of a separate image set (`fit`) and its
state (attributes ending in ``_``) is saved with the index, like the post-processing steps.
Before encoding, the local descriptors are L2-normalised, reduced by PCA to ``d`` dims
(64 unless the token says ``d<dims>``; learned with the vocabulary) and L2-normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbir.postprocess.transforms import PCA, NotFittedError, Transform, l2_normalize
from cbir.registry import Registry


def kmeans(x: np.ndarray, k: int, niter: int = 25, seed: int = 0) -> np.ndarray:
    """k centroids of the rows of ``x`` (faiss k-means, deterministic for a seed)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    if len(x) < k:
        raise ValueError(f"a vocabulary of {k} words needs at least {k} local descriptors to learn from; got {len(x)}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=100000)
    km.train(x)
    return km.centroids.copy()


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) of each row."""
    d = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.argmin(d, axis=1)


ENCODERS = Registry("encoder")
_K_DIMS = r"(\d+)(?:d(\d+))?"  # <k>[d<dims>]


class LocalEncoder(Transform):
    """Base: local PCA + a learned vocabulary; ``encode(list of (R_i, D)) -> (N, E)``. Subclasses
    define ``_fit_vocabulary(x, sets)`` and ``encode_one(x)`` (one image's prepared locals)."""

    learned = True

    def __init__(self, k: int, d: int = 64) -> None:
        self.k = k
        self.d = d

    def prepare(self, locals_: np.ndarray) -> np.ndarray:
        x = l2_normalize(np.asarray(locals_, np.float32))
        if hasattr(self, "pca_components_"):
            x = l2_normalize((x - self.pca_mean_) @ self.pca_components_.T)
        return x.astype(np.float32)

    def fit(self, sets: Sequence[np.ndarray]) -> "LocalEncoder":
        x = l2_normalize(np.concatenate(list(sets)).astype(np.float32))
        if x.shape[1] > self.d:
            pca = PCA(self.d).fit(x)
            self.pca_mean_, self.pca_components_ = pca.mean_, pca.components_
        self._fit_vocabulary(self.prepare(x), [self.prepare(s) for s in sets])
        return self

    def encode(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        if not self.fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: learn it on a separate image set first (--fit-on)")
        return np.stack([self.encode_one(self.prepare(s)) for s in sets]).astype(np.float32)

    @property
    def fitted(self) -> bool:
        return any(k.endswith("_") and not k.startswith("pca") for k in vars(self))


@ENCODERS.register("BoW", summary="bag of words, k-means vocabulary of <k> words, tf-idf, BoW<k>[d<dims>]",
                   option="k", pattern=_K_DIMS)
class BoW(LocalEncoder):
    """Bag of visual words: k-means vocabulary, hard assignment, tf-idf weighting (tf = count /
    number of regions, idf = log(N images / images containing the word)), L2."""

    def _fit_vocabulary(self, x: np.ndarray, sets: list[np.ndarray]) -> None:
        self.centroids_ = kmeans(x, self.k)
        df = np.zeros(self.k)
        for s in sets:
            df[np.unique(assign(s, self.centroids_))] += 1
        self.idf_ = np.log(len(sets) / np.maximum(df, 1)).astype(np.float32)

    def encode_one(self, x: np.ndarray) -> np.ndarray:
        tf = np.bincount(assign(x, self.centroids_), minlength=self.k) / max(len(x), 1)
        return l2_normalize(tf * self.idf_)


@ENCODERS.register("VLAD", summary="VLAD over <k> centroids, power + intra-normalised, VLAD<k>[d<dims>]",
                   option="k", pattern=_K_DIMS)
class VLAD(LocalEncoder):
    """VLAD: the residuals ``x - c`` summed per k-means centroid; power normalisation (signed
    square root), intra-normalisation (L2 per centroid block), then L2."""

    def _fit_vocabulary(self, x: np.ndarray, sets: list[np.ndarray]) -> None:
        self.centroids_ = kmeans(x, self.k)

    def encode_one(self, x: np.ndarray) -> np.ndarray:
        a = assign(x, self.centroids_)
        v = np.zeros_like(self.centroids_, dtype=np.float64)
        np.add.at(v, a, x - self.centroids_[a])
        v = np.sign(v) * np.sqrt(np.abs(v))
        return l2_normalize(l2_normalize(v).ravel())  # intra-normalised, then L2


@ENCODERS.register("FV", summary="Fisher vector over a <k>-component diagonal GMM, FV<k>[d<dims>]",
                   option="k", pattern=_K_DIMS)
class FisherVector(LocalEncoder):
    """Improved Fisher vector over a diagonal GMM of k components (EM from a k-means start): the
    gradients for the means and variances (Perronnin et al. 2010, 2 k d dims), signed sqrt, L2."""

    def _fit_vocabulary(self, x: np.ndarray, sets: list[np.ndarray]) -> None:
        self.weights_, self.means_, self.vars_ = fit_gmm(x, self.k)

    def encode_one(self, x: np.ndarray) -> np.ndarray:
        return fisher_vector(x, self.weights_, self.means_, self.vars_)


def gmm_posteriors(x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Responsibilities ``gamma (T, K)`` of the diagonal GMM's components for each row of x."""
    x = x.astype(np.float64)
    log_det = np.log(variances).sum(1)  # (K,)
    diff2 = ((x[:, None, :] - means[None]) ** 2 / variances[None]).sum(-1)  # (T, K)
    logp = np.log(weights)[None] - 0.5 * (diff2 + log_det[None] + x.shape[1] * np.log(2 * np.pi))
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def fit_gmm(x: np.ndarray, k: int, iters: int = 30, var_floor: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonal GMM by EM, started from k-means: (weights (K,), means (K, D), variances (K, D))."""
    x = x.astype(np.float64)
    means = kmeans(x, k).astype(np.float64)
    a = assign(x, means)
    variances = np.stack([x[a == j].var(axis=0) if (a == j).sum() > 1 else x.var(axis=0) for j in range(k)])
    variances = np.maximum(variances, var_floor)
    weights = np.maximum(np.bincount(a, minlength=k) / len(x), 1e-6)
    weights /= weights.sum()
    for _ in range(iters):
        g = gmm_posteriors(x, weights, means, variances)
        nk = g.sum(0) + 1e-10
        weights = nk / len(x)
        means = (g.T @ x) / nk[:, None]
        variances = np.maximum((g.T @ (x**2)) / nk[:, None] - means**2, var_floor)
    return weights.astype(np.float32), means.astype(np.float32), variances.astype(np.float32)


def fisher_vector(x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Improved Fisher vector (means and variances gradients, signed sqrt, L2) of the rows of x."""
    x = x.astype(np.float64)
    w, mu, var = weights.astype(np.float64), means.astype(np.float64), variances.astype(np.float64)
    t = len(x)
    g = gmm_posteriors(x, w, mu, var)  # (T, K)
    z = (x[:, None, :] - mu[None]) / np.sqrt(var)[None]  # (T, K, D)
    g_mu = (g[..., None] * z).sum(0) / (t * np.sqrt(w)[:, None])
    g_sig = (g[..., None] * (z**2 - 1)).sum(0) / (t * np.sqrt(2 * w)[:, None])
    fv = np.concatenate([g_mu.ravel(), g_sig.ravel()])
    fv = np.sign(fv) * np.sqrt(np.abs(fv))
    return l2_normalize(fv)


def parse_encoder(token: str) -> LocalEncoder | None:
    """``"VLAD64"`` -> VLAD(k=64, d=64); ``"FV16d32"`` -> FisherVector(16, d=32); else None."""
    if (found := ENCODERS.match(token)) is None:
        return None
    cls, m = found[0].build, found[1]
    return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else 64)
