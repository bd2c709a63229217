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

Pure functions on `LocalFeatures`; `database_features` keeps the database side in memory;
`SpatialVerifier` applies the step to one query's scores.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.images import ImageError, open_image

SIDE = 384  # the longer side local features are computed at (pixels)
RATIO = 0.8  # Lowe's ratio test
TOLERANCE = 0.02  # RANSAC's inlier distance, as a fraction of SIDE
TRIALS = 300  # RANSAC hypotheses
MAX_SCALE = 4.0  # an affine map's singular values must lie in [1/MAX_SCALE, MAX_SCALE]
MIN_INLIERS = 8  # verified: at least this many inliers (chosen on synthetic photos, docs/multi-object.md)


@dataclass(frozen=True)
class LocalFeatures:
    """SIFT keypoints of one image: ``points (n, 2)`` as (x, y) in the image resized to
    ``side`` pixels on its longer side, ``descriptors (n, 128)`` L2-normalised (float16: half
    the memory of a cached database image; matching computes in float32)."""

    points: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


EMPTY = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float16))


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
    return LocalFeatures(sift.keypoints[:, ::-1].astype(np.float32), desc.astype(np.float16))  # (row, col) -> (x, y)


def tentative_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(ia, ib)`` of a's keypoints whose nearest neighbour in b is closer than
    ``ratio`` times the second nearest (Lowe 2004), each keypoint of b used once."""
    if len(a) == 0 or len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d2 = np.maximum(2.0 - 2.0 * a.descriptors.astype(np.float32) @ b.descriptors.astype(np.float32).T, 0.0)
    nn = np.argpartition(d2, 1, axis=1)[:, :2]
    two = np.take_along_axis(d2, nn, 1)
    first = np.argmin(two, axis=1)
    best = two[np.arange(len(two)), first]
    second = two[np.arange(len(two)), 1 - first]
    ia = np.flatnonzero(best < ratio ** 2 * second)
    ib = nn[ia, first[ia]]
    if len(ia) < 2:
        return ia, ib
    # One-to-one: of the keypoints of a that chose the same keypoint of b, the closest keeps it.
    # Many-to-one matches let a collapsed (near-zero) affine map "explain" them all.
    order = np.lexsort((best[ia], ib))
    keep = order[np.r_[True, ib[order][1:] != ib[order][:-1]]]
    return ia[keep], ib[keep]


def affine_inliers(src: np.ndarray, dst: np.ndarray, tolerance: float, trials: int = TRIALS, seed: int = 0) -> int:
    """RANSAC for an affine map ``dst ~ [src, 1] @ M`` over matched points ``src, dst (n, 2)``:
    ``trials`` minimal samples of 3 (seeded), all fitted and scored at once; the most matches
    within ``tolerance`` pixels of any one plausible hypothesis. Degenerate (collinear) samples
    and implausible maps (mirrored, or scaled beyond `MAX_SCALE` along an axis) count 0."""
    n = len(src)
    if n < 3:
        return 0
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((trials, n)), axis=1)[:, :3] if n <= 64 else \
        np.stack([rng.choice(n, 3, replace=False) for _ in range(trials)])
    ones = np.ones((n, 1), np.float64)
    x = np.concatenate([src.astype(np.float64), ones], axis=1)  # (n, 3)
    a = x[picks]  # (T, 3, 3)
    ok = np.abs(np.linalg.det(a)) > 1e-6
    if not ok.any():
        return 0
    m = np.linalg.solve(a[ok], dst.astype(np.float64)[picks[ok]])  # (T', 3, 2)
    # A picture seen from the front: no mirror image, and no squeeze or stretch beyond 4x
    # (both images are at the same size); a collapsed map would "explain" clustered matches.
    sv = np.linalg.svd(m[:, :2, :], compute_uv=False)  # (T', 2)
    plausible = (np.linalg.det(m[:, :2, :]) > 0) & (sv[:, 1] >= 1 / MAX_SCALE) & (sv[:, 0] <= MAX_SCALE)
    if not plausible.any():
        return 0
    m = m[plausible]
    err = np.einsum("nk,tkd->tnd", x, m) - dst[None]
    return int(((err ** 2).sum(axis=2) <= tolerance ** 2).sum(axis=1).max())


def count_inliers(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO, tolerance: float = TOLERANCE * SIDE,
                  trials: int = TRIALS, seed: int = 0, at_least: int = 3) -> int:
    """How many tentative matches one affine map explains (`affine_inliers`); 0 when fewer than
    ``at_least`` matches exist (the inliers are a subset of the matches, so RANSAC is skipped
    for a pair that cannot reach the verification threshold)."""
    ia, ib = tentative_matches(a, b, ratio)
    if len(ia) < max(3, at_least):
        return 0
    return affine_inliers(a.points[ia], b.points[ib], tolerance, trials, seed)


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


def database_features(path: str | Path, side: int = SIDE) -> LocalFeatures:
    """`local_features` of a database image, computed the first time it is a candidate and kept
    in memory (the last `CACHE_SIZE` images, keyed by the file's identity, size and modification
    time, so an edited file is read again); a file that cannot be read has none: it is never verified."""
    try:
        st = os.stat(path)
    except OSError:
        return EMPTY
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, side)  # one file under any of its names
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    try:
        found = local_features(open_image(path), side)
    except ImageError:
        found = EMPTY
    with _CACHE_LOCK:
        _CACHE[key] = found
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return found


CACHE_SIZE = 2048  # database images whose features stay in memory (~0.2 MB each at SIDE 384)
_CACHE: OrderedDict[tuple, LocalFeatures] = OrderedDict()
_CACHE_LOCK = threading.Lock()


class SpatialVerifier:
    """Re-order each query's top ``k`` by RANSAC inliers (database features: `database_features`)."""

    def __init__(self, k: int = 50, min_inliers: int = MIN_INLIERS, side: int = SIDE, ratio: float = RATIO,
                 tolerance: float = TOLERANCE, trials: int = TRIALS, seed: int = 0) -> None:
        self.k = k
        self.min_inliers = min_inliers
        self.side = side
        self.ratio = ratio
        self.tolerance = tolerance
        self.trials = trials
        self.seed = seed

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
        counts = np.array([self.inliers(q, database_features(path_of(int(i)), self.side)) for i in top])
        return reorder_shortlist(scores, top, counts, self.min_inliers)


def verifier_for(steps: Sequence) -> SpatialVerifier | None:
    """The `SpatialVerifier` a pipeline's re-ranking steps ask for (an ``SV<k>`` token), else None."""
    for s in steps:
        if s.kind == "SV":
            return SpatialVerifier(k=s.k)
    return None


__all__ = ["EMPTY", "LocalFeatures", "SpatialVerifier", "CACHE_SIZE", "MAX_SCALE", "affine_inliers", "count_inliers", "database_features", "local_features",
           "reorder_shortlist", "tentative_matches", "verifier_for"]
