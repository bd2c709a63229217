"""Retrieval metrics: AP as the standard instance-retrieval benchmarks compute it.

AP is the trapezoid-rule area under the precision-recall curve over the ranked positives,
with junk images removed from the ranking first (Oxford/Paris, Revisited Oxford/Paris,
INRIA Holidays all use this rule). For the j-th positive (0-based) at 0-based rank r::

    AP += ((j / r if r > 0 else 1) + (j + 1) / (r + 1)) / 2 / n_positives

so positives at ranks [0, 2] of 2 give 0.7917 and one positive at rank 1 gives 0.25.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np


def ap_from_positive_ranks(ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """AP from the 0-based ranks of the positives that were retrieved (junk already removed);
    ``n_positives`` counts the missing ones too, as the benchmarks' own ``compute_ap``."""
    if n_positives <= 0:
        raise ValueError("AP is undefined for a query without positives")
    r = np.sort(np.asarray(ranks, dtype=np.float64))
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    precision_before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    precision_at = (j + 1) / (r + 1)
    return float(np.sum((precision_before + precision_at) / 2) / n_positives)


def positive_ranks(ranking: Sequence[Hashable], positives: Iterable[Hashable],
                   junk: Iterable[Hashable] = ()) -> np.ndarray:
    """0-based ranks of ``positives`` in ``ranking`` after the ``junk`` items are removed."""
    pos, junk_set = set(positives), set(junk)
    kept = [item for item in ranking if item not in junk_set]
    return np.asarray([r for r, item in enumerate(kept) if item in pos], dtype=np.int64)


def average_precision(ranking: Sequence[Hashable], positives: Iterable[Hashable],
                      junk: Iterable[Hashable] = ()) -> float:
    """AP of one ranked list of database ids against the query's positives and junk."""
    pos = set(positives) - set(junk)
    return ap_from_positive_ranks(positive_ranks(ranking, pos, junk), len(pos))


def precision_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of the first ``k`` results (junk removed) that are positives."""
    return float(np.sum(np.asarray(ranks) < k)) / k


def recall_at_k(ranks: np.ndarray, n_positives: int, k: int) -> float:
    """Fraction of the query's positives found in the first ``k`` results (junk removed)."""
    return float(np.sum(np.asarray(ranks) < k)) / n_positives


def ukbench_ns_score(ranks: np.ndarray) -> float:
    """UKBench N-S score of one query: how many of its positives are in the top 4 (0..4)."""
    return float(np.sum(np.asarray(ranks) < 4))


@dataclass
class RetrievalMAP:
    """Streaming mAP, precision@k and recall@k, overall and per tag, one query per ``update``.
    Queries without positives are counted in ``n_skipped`` and left out of every mean."""

    ks: tuple[int, ...] = (1, 5, 10)
    aps_: list[float] = field(default_factory=list)
    tags_: list[tuple[str, ...]] = field(default_factory=list)
    precision_: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    recall_: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    n_skipped_: int = 0

    def reset(self) -> None:
        """Forget every query (keeps ``ks``)."""
        self.__init__(self.ks)  # type: ignore[misc]

    def update(self, ranking: Sequence[Hashable], positives: Iterable[Hashable],
               junk: Iterable[Hashable] = (), tags: Iterable[str] = ()) -> float | None:
        """Add one query; returns its AP (None when it has no positives)."""
        junk = set(junk)
        pos = set(positives) - junk
        if not pos:
            self.n_skipped_ += 1
            return None
        ranks = positive_ranks(ranking, pos, junk)
        ap = ap_from_positive_ranks(ranks, len(pos))
        self.aps_.append(ap)
        self.tags_.append(tuple(tags))
        for k in self.ks:
            self.precision_[k].append(precision_at_k(ranks, k))
            self.recall_[k].append(recall_at_k(ranks, len(pos), k))
        return ap

    def compute(self) -> dict:
        aps = np.asarray(self.aps_, dtype=np.float64)
        by_tag: dict[str, list[float]] = defaultdict(list)
        for ap, tags in zip(self.aps_, self.tags_):
            for t in tags:
                by_tag[t].append(ap)
        return {
            "map": float(aps.mean()) if aps.size else 0.0,
            "map_by_tag": {t: float(np.mean(v)) for t, v in sorted(by_tag.items())},
            "precision_at": {k: float(np.mean(v)) for k, v in self.precision_.items()},
            "recall_at": {k: float(np.mean(v)) for k, v in self.recall_.items()},
            "n_queries": int(aps.size),
            "n_skipped": self.n_skipped_,
        }
