"""Ranking pieces shared by the single- and multi-object evaluations."""

from __future__ import annotations

import numpy as np

from cbir.rerank import Reranker, rerank

RECALL_GRID = np.linspace(0.0, 1.0, 101)


def interpolated_pr(ranks: np.ndarray, n_positives: int) -> np.ndarray:
    """Interpolated precision (max precision at recall >= r) on `RECALL_GRID` for one query."""
    ranks = np.sort(ranks)
    if ranks.size == 0:
        return np.zeros_like(RECALL_GRID)
    recall = np.arange(1, ranks.size + 1) / n_positives
    precision = np.arange(1, ranks.size + 1) / (ranks + 1)
    best = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_GRID, side="left")
    return np.where(idx < ranks.size, best[np.minimum(idx, ranks.size - 1)], 0.0)


def similarities(q_vecs: np.ndarray, db: np.ndarray, rerankers: list[Reranker] | tuple = ()) -> np.ndarray:
    """(Q, N) similarities, re-ranked; unreadable database rows (NaN) get -inf, unreadable queries 0."""
    valid_db = ~np.isnan(db[:, 0])
    q = np.nan_to_num(q_vecs)
    sims = np.full((len(q), len(db)), -np.inf, np.float32)
    if valid_db.any():
        sims[:, valid_db] = rerank(q, db[valid_db], rerankers) if rerankers else q @ db[valid_db].T
    return sims
