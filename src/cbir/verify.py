"""Spatial verification of a shortlist (Philbin et al., CVPR 2007): the `SV<k>` re-ranking step.

A global descriptor ranks a near-duplicate (the same painter's second version of a picture) or
a crop with too much wall close to the right image; local features with a geometric check tell
them apart. For each of the top ``k`` hits: SIFT keypoints of the query and of the database
image (both resized to ``side`` pixels on the longer side), tentative matches by Lowe's ratio
test, then RANSAC fits an affine map and counts the matches it explains (the inliers). Hits
with at least ``min_inliers`` move to the front, most inliers first; the rest keep their order
behind them. Only the order changes: the shortlist's scores are handed out again in rank order,
so the top-1 score, and with it the "not in the collection" threshold of `cbir.identify`, keeps
its meaning.

Pure functions on `LocalFeatures`, and `SpatialVerifier`, which caches the database side.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.images import ImageError, open_image

SIDE = 384  # the longer side local features are computed at (pixels)
RATIO = 0.8  # Lowe's ratio test
TOLERANCE = 0.02  # RANSAC's inlier distance, as a fraction of SIDE
TRIALS = 300  # RANSAC iterations
MIN_INLIERS = 10  # verified: at least this many inliers (chosen on synthetic validation photos)


@dataclass(frozen=True)
class LocalFeatures:
    """SIFT keypoints of one image: ``points (n, 2)`` as (x, y) in the image resized to
    ``side`` pixels on its longer side, ``descriptors (n, 128)`` L2-normalised float32."""

    points: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


EMPTY = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))


def local_features(image: Image.Image, side: int = SIDE) -> LocalFeatures:
    """SIFT (scikit-image) on the grey image resized to ``side`` on its longer side; an image
    with no keypoint (flat, or tiny) gives `EMPTY`."""
    from skimage.feature import SIFT

    grey = image.convert("L")
    scale = side / max(grey.size)
    grey = grey.resize((max(16, round(grey.width * scale)), max(16, round(grey.height * scale))), Image.BILINEAR)
    sift = SIFT()
    try:
        sift.detect_and_extract(np.asarray(grey, np.float32) / 255.0)
    except RuntimeError:  # "SIFT found no features"
        return EMPTY
    desc = sift.descriptors.astype(np.float32)
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    return LocalFeatures(sift.keypoints[:, ::-1].astype(np.float32), desc)  # (row, col) -> (x, y)


def tentative_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(ia, ib)`` of a's keypoints whose nearest neighbour in b is closer than
    ``ratio`` times the second nearest (Lowe 2004)."""
    if len(a) == 0 or len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d2 = np.maximum(2.0 - 2.0 * a.descriptors @ b.descriptors.T, 0.0)  # unit vectors
    nn = np.argpartition(d2, 1, axis=1)[:, :2]
    two = np.take_along_axis(d2, nn, 1)
    first = np.argmin(two, axis=1)
    best = two[np.arange(len(two)), first]
    second = two[np.arange(len(two)), 1 - first]
    ia = np.flatnonzero(best < ratio ** 2 * second)
    return ia, nn[ia, first[ia]]


def count_inliers(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO, tolerance: float = TOLERANCE * SIDE,
                  trials: int = TRIALS, seed: int = 0, at_least: int = 3) -> int:
    """How many tentative matches one affine map (RANSAC, ``tolerance`` pixels, seeded) explains;
    0 when fewer than ``at_least`` matches exist (the inliers are a subset of the matches, so
    RANSAC is skipped for a pair that cannot reach the verification threshold)."""
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    ia, ib = tentative_matches(a, b, ratio)
    if len(ia) < max(3, at_least):
        return 0
    with warnings.catch_warnings():  # degenerate samples: skimage warns and retries
        warnings.simplefilter("ignore")
        _, inliers = ransac((a.points[ia], b.points[ib]), AffineTransform, min_samples=3,
                            residual_threshold=tolerance, max_trials=trials, rng=seed)
    return 0 if inliers is None else int(inliers.sum())


def reorder_shortlist(scores: np.ndarray, shortlist: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """``scores (N,)`` with the ``shortlist (K,)`` entries re-ordered: those with
    ``inliers >= min_inliers`` first (most inliers first, ties by score), then the others in
    score order; the shortlist's own score values are handed out in that order."""
    out = np.array(scores, copy=True)
    if len(shortlist) == 0:
        return out
    key = np.where(inliers >= min_inliers, inliers, -1)
    order = shortlist[np.lexsort((-scores[shortlist], -key))]
    out[order] = np.sort(scores[shortlist])[::-1]
    return out


class SpatialVerifier:
    """Re-order each query's top ``k`` by RANSAC inliers; a database image's features are
    computed the first time it is a candidate and kept in memory (keyed by its path)."""

    def __init__(self, k: int = 20, min_inliers: int = MIN_INLIERS, side: int = SIDE, ratio: float = RATIO,
                 tolerance: float = TOLERANCE, trials: int = TRIALS, seed: int = 0) -> None:
        self.k = k
        self.min_inliers = min_inliers
        self.side = side
        self.ratio = ratio
        self.tolerance = tolerance
        self.trials = trials
        self.seed = seed
        self._cache: dict[object, LocalFeatures] = {}
        self._lock = threading.Lock()

    def features(self, path: str | Path) -> LocalFeatures:
        """The cached features of the database image at ``path``; one that cannot be read has none."""
        with self._lock:
            found = self._cache.get(str(path))
        if found is None:
            try:
                found = local_features(open_image(path), self.side)
            except ImageError:  # an unreadable or vanished database file is simply never verified
                found = EMPTY
            with self._lock:
                self._cache[str(path)] = found
        return found

    def inliers(self, query: LocalFeatures, candidate: LocalFeatures) -> int:
        return count_inliers(query, candidate, self.ratio, self.tolerance * self.side, self.trials, self.seed,
                             at_least=self.min_inliers)

    def rerank(self, query: Image.Image, scores: np.ndarray, path_of: Callable[[int], str | Path]) -> np.ndarray:
        """``scores (N,)`` of one query (its image, the rectified region that was searched) over
        N candidates -> the same with the top k re-ordered; ``path_of(i)``: candidate i's image."""
        scores = np.asarray(scores, np.float32)
        finite = np.flatnonzero(np.isfinite(scores))
        top = finite[np.argsort(-scores[finite], kind="stable")[:self.k]]
        if len(top) < 2:
            return scores.copy()
        q = local_features(query, self.side)
        counts = np.array([self.inliers(q, self.features(path_of(int(i)))) for i in top])
        return reorder_shortlist(scores, top, counts, self.min_inliers)


def verifier_for(steps: Sequence) -> SpatialVerifier | None:
    """The `SpatialVerifier` a pipeline's re-ranking steps ask for (an ``SV<k>`` token), else None."""
    for s in steps:
        if s.kind == "SV":
            return SpatialVerifier(k=s.k)
    return None


__all__ = ["EMPTY", "LocalFeatures", "SpatialVerifier", "count_inliers", "local_features",
           "reorder_shortlist", "tentative_matches", "verifier_for"]
