"""Re-ranking after the first search: query expansion, database augmentation, k-reciprocal, diffusion.

Pure functions on L2-normalised descriptors, queries ``q (Q, D)`` and database ``db (N, D)``;
inner products are the similarities. The pipeline tokens (after the post-processing steps) are
`RERANKERS`: average / alpha query expansion (Chum et al. 2007, Radenovic et al. 2018),
database-side augmentation (Arandjelovic & Zisserman 2012), k-reciprocal re-ranking (Zhong et
al. 2017), diffusion (Iscen et al. 2017). Steps run in order: the vector steps (``DBA``, ``QE``,
``aQE``) change the query or database vectors; a score step (``KRR``, ``DIFF``) replaces the
similarities and must come last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cbir.registry import Registry


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _topk(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first."""
    k = min(k, sims.shape[1])
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, idx, 1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1)


def _weighted_sum(sims: np.ndarray, vecs: np.ndarray, alpha: float) -> np.ndarray:
    """``sum_k w_k vecs[:, k]`` over neighbours ``vecs (M, k, D)`` with similarities ``sims (M, k)``:
    ``alpha = 0``: all w = 1; ``alpha > 0``: ``w = max(sim, 0)^alpha``."""
    w = np.ones(sims.shape, np.float32) if alpha == 0 else np.clip(sims, 0, None) ** alpha
    return np.einsum("mk,mkd->md", w, vecs)


def _neighbour_sum(x: np.ndarray, db: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """The `_weighted_sum` of each row of ``x``'s top-k neighbours in ``db``."""
    sims = x @ db.T
    nn = _topk(sims, k)
    return _weighted_sum(np.take_along_axis(sims, nn, 1), db[nn], alpha)


def query_expansion(q: np.ndarray, db: np.ndarray, k: int, alpha: float = 0.0) -> np.ndarray:
    """Expanded queries: ``q + sum_i w_i db[n_i]`` over the top-k neighbours, L2-normalised
    (``w`` as in `_weighted_sum`: ``alpha = 0`` average QE, ``alpha > 0`` alpha-QE)."""
    if k <= 0 or len(db) == 0:
        return q
    return _unit(q + _neighbour_sum(q, db, k, alpha))


def database_augmentation(db: np.ndarray, k: int, alpha: float = 0.0) -> np.ndarray:
    """DBA: each database vector becomes the weighted sum of its top-k neighbours (itself first)."""
    if k <= 1 or len(db) == 0:
        return db
    return _unit(_neighbour_sum(db, db, k, alpha))


def k_reciprocal(q: np.ndarray, db: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. CVPR 2017) -> similarities ``-distance`` (Q, N).

    On queries and database together: squared Euclidean distances (rows scaled by their maximum);
    each item's k-reciprocal neighbours R(i, k1), expanded with the R(j, k1/2) of its members that
    overlap it by more than 2/3, as Gaussian-weighted vectors V averaged over the k2 nearest (local
    query expansion); the V's Jaccard distance is mixed with the original: ``(1 - lam) d_J + lam d``."""
    nq = len(q)
    allx = np.concatenate([q, db]).astype(np.float64)
    n = len(allx)
    k1 = min(k1, n - 1)
    dist = np.maximum(2.0 - 2.0 * allx @ allx.T, 0.0)
    dist = (dist / np.maximum(dist.max(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[(backward == i).any(axis=1)]

    V = np.zeros((n, n), np.float32)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = [r]
        for c in r:
            rc = reciprocal(int(c), half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion.append(rc)
        e = np.unique(np.concatenate(expansion))
        w = np.exp(-dist[i, e])
        V[i, e] = w / w.sum()
    if k2 > 1:
        V = V[rank[:, :k2]].mean(axis=1)
    jaccard = np.empty((nq, n - nq), np.float32)
    for i in range(nq):
        inter = np.minimum(V[i][None, :], V[nq:]).sum(axis=1)
        jaccard[i] = 1.0 - inter / (2.0 - inter)
    return -((1 - lam) * jaccard + lam * dist[:nq, nq:])


def diffusion(q: np.ndarray, db: np.ndarray, k: int = 10, alpha: float = 0.99, gamma: float = 3.0,
              iters: int = 50, tol: float = 1e-6) -> np.ndarray:
    """Diffusion (Iscen et al. CVPR 2017) -> ranking scores ``f`` (Q, N).

    Affinities ``a_ij = max(0, <x_i, x_j>)^gamma`` between mutual k-nearest database neighbours,
    ``S = D^-1/2 A D^-1/2``; the query's own top-k give ``y``; ``(I - alpha S) f = y`` is solved
    by conjugate gradient (the matrix is symmetric positive definite)."""
    from scipy.sparse import csr_matrix, diags, identity
    from scipy.sparse.linalg import cg

    n = len(db)
    if n == 0:
        return np.zeros((len(q), 0), np.float32)
    sims = db @ db.T
    nn = _topk(sims, k + 1)  # itself (dropped below) and k neighbours; `_topk` caps it at n
    rows = np.repeat(np.arange(n), nn.shape[1])
    cols = nn.ravel()
    vals = np.clip(sims[rows, cols], 0, None) ** gamma
    A = csr_matrix((vals, (rows, cols)), shape=(n, n))
    A = A.minimum(A.T)  # mutual neighbours only
    A.setdiag(0)
    A.eliminate_zeros()
    d = np.asarray(A.sum(axis=1)).ravel()
    dinv = diags(1.0 / np.sqrt(np.maximum(d, 1e-12)))
    L = identity(n) - alpha * (dinv @ A @ dinv)
    qs = q @ db.T
    qn = _topk(qs, k)
    out = np.zeros((len(q), n), np.float32)
    for i in range(len(q)):
        y = np.zeros(n)
        y[qn[i]] = np.clip(qs[i, qn[i]], 0, None) ** gamma
        out[i] = cg(L, y, rtol=tol, maxiter=iters)[0]
    return out


@dataclass(frozen=True)
class Reranker:
    """One parsed re-ranking token."""

    token: str
    kind: str  # its entry in `RERANKERS`: "QE" | "aQE" | "DBA" | "KRR" | "DIFF"
    k: int
    alpha: float = 0.0
    k2: int = 6
    lam: float = 0.3

    @property
    def scores(self) -> bool:
        """True for the steps that produce the final similarities (must be last)."""
        return RERANKERS.get(self.kind).scores

    @property
    def images(self) -> bool:
        """True for a step that needs the images, not the vectors (``SV``, `cbir.verify`): the
        functions here pass it by; the callers that hold the images apply it, last."""
        return RERANKERS.get(self.kind).extra.get("images", False)


# Each entry's ``build(q, db, step)`` applies a step: a vector step returns the new ``(q, db)``,
# a score step (``scores=True``) the final similarities. The pattern's named groups are
# `Reranker` fields; ``default`` (k's) and ``defaults`` fill those a token leaves out.
RERANKERS = Registry("re-ranking step")
_FIELD_TYPE = {"k": int, "k2": int, "alpha": float, "lam": float}
_ALPHA = r"(?:a(?P<alpha>\d*\.?\d+))?"


# Decorators apply bottom-up: QE registers (and is listed) before aQE.
@RERANKERS.register("aQE", option="k", pattern=r"(?P<k>\d+)" + _ALPHA, scores=False, defaults={"alpha": 3.0},
                    summary="alpha query expansion, neighbours weighted by sim^alpha: aQE<k>a<alpha> (alpha=3)")
@RERANKERS.register("QE", option="k", pattern=r"(?P<k>\d+)", scores=False,
                    summary="average query expansion over the top k (Chum et al. 2007)")
def _expand_queries(q: np.ndarray, db: np.ndarray, s: Reranker) -> tuple[np.ndarray, np.ndarray]:
    return query_expansion(q, db, s.k, s.alpha), db


RERANKERS.register("DBA", option="k", pattern=r"(?P<k>\d+)" + _ALPHA, scores=False,
                   summary="database-side augmentation with the top k: DBA<k>[a<alpha>]")(
    lambda q, db, s: (q, database_augmentation(db, s.k, s.alpha)))
RERANKERS.register("KRR", option="k1", pattern=r"(?P<k>\d+)(?:-(?P<k2>\d+)-(?P<lam>\d*\.?\d+))?", scores=True,
                   summary="k-reciprocal re-ranking (Jaccard + original distance): KRR<k1>[-k2-lam] (6, 0.3)")(
    lambda q, db, s: k_reciprocal(q, db, s.k, s.k2, s.lam))
RERANKERS.register("DIFF", option="k", default=10, pattern=r"(?P<k>\d+)?" + _ALPHA, scores=True,
                   defaults={"alpha": 0.99}, summary="diffusion on the mutual k-NN graph: DIFF[<k>][a<alpha>] (10, 0.99)")(
    lambda q, db, s: diffusion(q, db, s.k, s.alpha))
RERANKERS.register("SV", option="k", default=50, pattern=r"(?P<k>\d+)?", scores=False, images=True,
                   summary="spatial verification: the top k re-ordered by SIFT + RANSAC inliers (cbir.verify): SV[<k>] (50)")(
    lambda q, db, s: (q, db))


def parse_rerank(token: str) -> Reranker | None:
    """``"aQE10a3"`` -> Reranker(aQE, k=10, alpha=3); not a re-ranking token -> None."""
    if (found := RERANKERS.match(token)) is None:
        return None
    entry, m = found
    given = {name: text for name, text in m.groupdict().items() if text}
    values = {"k": entry.default, **entry.extra.get("defaults", {}), **given}
    return Reranker(token, entry.name, **{name: _FIELD_TYPE[name](v) for name, v in values.items()})


def check_order(steps: Sequence[Reranker]) -> None:
    """A score step (KRR, DIFF) may only be the last re-ranking step, or come just before
    spatial verification (``SV``), which re-orders the final ranking and is always last."""
    for i, s in enumerate(steps[:-1]):
        if s.images:
            raise ValueError(f"re-ranking step {s.token!r} re-orders the final ranking: it must come last")
        if s.scores and not steps[i + 1].images:
            raise ValueError(f"re-ranking step {s.token!r} produces the final scores: it must come last")


def rerank(q: np.ndarray, db: np.ndarray, steps: Sequence[Reranker]) -> np.ndarray:
    """Apply the steps in order -> similarities ``(Q, N)`` (higher is better); an image step
    (``SV``) is left to the caller that holds the images."""
    check_order(steps)
    q, db = np.asarray(q, np.float32), np.asarray(db, np.float32)
    for s in steps:
        if s.images:
            continue
        out = RERANKERS.get(s.kind).build(q, db, s)
        if s.scores:
            return out
        q, db = out
    return q @ db.T


SHORTLIST = 100  # how many first-search hits a search re-ranks


def rerank_shortlist(q: np.ndarray, cand_vecs: np.ndarray, steps: Sequence[Reranker],
                     neighbours=None) -> np.ndarray:
    """Re-rank one query's shortlist ``cand_vecs (M, D)`` -> the candidates' scores ``(M,)``.

    DBA augments each candidate with its neighbours in the whole database, found by
    ``neighbours(vecs, k) -> (sims (M, k), vectors (M, k, D))`` (an index search); the other
    steps (QE, k-reciprocal, diffusion) work on the shortlist alone."""
    check_order(steps)
    vecs = np.asarray(cand_vecs, np.float32)
    rest = []
    for s in steps:
        if s.kind == "DBA" and s.k > 1:
            vecs = _unit(_weighted_sum(*neighbours(vecs, s.k), s.alpha))
        else:
            rest.append(s)
    return rerank(np.asarray(q, np.float32)[None], vecs, rest)[0]


def rerank_hits(index, vector: np.ndarray, ids: np.ndarray, steps: Sequence[Reranker]) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank an index search's hits ``ids`` (``-1`` = empty) with the index's live vectors
    -> (scores (1, M), ids (1, M)) best first, as `Index.search` returns."""
    ids = np.asarray([i for i in ids if i >= 0], np.int64)
    if len(ids) == 0:
        return np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64)

    def neighbours(vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # DBA's neighbours come from the index itself: only the rows they name are read.
        sims, nn = index.search(vecs, k)
        valid = nn >= 0  # an index smaller than k pads with -1: those add nothing
        vecs = index.vectors(np.where(valid, nn, ids[0])).reshape(nn.shape + (-1,))
        vecs[~valid] = 0.0
        return np.where(valid, sims, 0.0).astype(np.float32), vecs

    scores = rerank_shortlist(vector, index.vectors(ids), steps, neighbours)
    order = np.argsort(-scores, kind="stable")
    return scores[order][None], ids[order][None]


__all__ = ["RERANKERS", "SHORTLIST", "rerank_hits", "rerank_shortlist", "Reranker", "check_order", "database_augmentation", "diffusion", "k_reciprocal",
           "parse_rerank", "query_expansion", "rerank"]
