"""Retrieval metrics: hand-computed values and the Oxford/Paris ``compute_ap`` loop."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.metrics import retrieval as R


def oxford_compute_ap(pos_ranks, n_pos):
    """compute_ap of the Revisited Oxford/Paris evaluation code, loop as written there."""
    ap, recall_step = 0.0, 1.0 / n_pos
    for j, rank in enumerate(sorted(pos_ranks)):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def test_hand_computed_ap():
    assert R.ap_from_positive_ranks([0, 2], 2) == pytest.approx(0.7917, abs=1e-4)
    assert R.ap_from_positive_ranks([1], 1) == pytest.approx(0.25)
    assert R.ap_from_positive_ranks([0, 1, 2], 3) == pytest.approx(1.0)
    assert R.ap_from_positive_ranks(np.array([2, 0]), 2) == pytest.approx(0.7917, abs=1e-4)  # unsorted


def test_missing_positives_and_no_positive():
    # Positive "b" is never retrieved: it still counts in the denominator.
    assert R.average_precision(["a", "x", "y"], ["a", "b"]) == pytest.approx(0.5)
    assert R.ap_from_positive_ranks([], 3) == 0.0
    with pytest.raises(ValueError):
        R.ap_from_positive_ranks([0], 0)


def test_junk_is_removed_before_ranking():
    ranking = ["j1", "p1", "n1", "j2", "p2"]
    ranks = R.positive_ranks(ranking, ["p1", "p2"], junk=["j1", "j2"])
    assert ranks.tolist() == [0, 2]
    assert R.average_precision(ranking, ["p1", "p2"], junk=["j1", "j2"]) == pytest.approx(0.7917, abs=1e-4)
    # A positive also listed as junk is junk.
    assert R.average_precision(["a", "b"], ["a", "b"], junk=["a"]) == pytest.approx(1.0)


def test_matches_reference_loop_on_random_rankings():
    r = np.random.default_rng(0)
    for _ in range(20):
        n_pos = int(r.integers(1, 10))
        ranks = r.choice(100, size=int(r.integers(0, n_pos + 1)), replace=False)
        assert R.ap_from_positive_ranks(ranks, n_pos) == pytest.approx(oxford_compute_ap(ranks, n_pos), abs=1e-12)


def test_precision_recall_at_k_and_ukbench():
    ranks = np.array([0, 2, 7])
    assert R.precision_at_k(ranks, 1) == 1.0
    assert R.precision_at_k(ranks, 5) == pytest.approx(2 / 5)
    assert R.recall_at_k(ranks, 4, 10) == pytest.approx(3 / 4)
    assert R.ukbench_ns_score(np.array([0, 1, 3, 4])) == 3.0
    assert R.ukbench_ns_score(np.array([], dtype=int)) == 0.0


def test_streaming_map_with_tags_and_reset():
    m = R.RetrievalMAP(ks=(1, 2))
    assert m.update(["a", "x", "b"], ["a", "b"], tags=["easy"]) == pytest.approx(0.7917, abs=1e-4)
    assert m.update(["x", "a"], ["a"], tags=["hard", "easy"]) == pytest.approx(0.25)
    assert m.update(["x"], [], junk=[]) is None
    out = m.compute()
    assert out["map"] == pytest.approx((0.79166667 + 0.25) / 2)
    assert out["map_by_tag"] == pytest.approx({"easy": (0.79166667 + 0.25) / 2, "hard": 0.25})
    assert out["precision_at"][1] == pytest.approx(0.5)
    assert out["recall_at"][2] == pytest.approx((0.5 + 1.0) / 2)
    assert out["n_queries"] == 2 and out["n_skipped"] == 1
    m.reset()
    out = m.compute()
    assert out["map"] == 0.0 and out["n_queries"] == 0 and out["n_skipped"] == 0
