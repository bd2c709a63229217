"""Spatial verification (`cbir.verify`, the ``SV<k>`` re-ranking step)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cbir.rerank import check_order, parse_rerank, rerank
from cbir.verify import (EMPTY, MIN_INLIERS, SpatialVerifier, affine_inliers, count_inliers, database_features,
                         local_features, reorder_shortlist, tentative_matches, verifier_for)
from conftest import skimage_photo

CLI = [sys.executable, "-m", "cbir.cli"]


def near_duplicate(img: Image.Image) -> Image.Image:
    """The same picture with its left half replaced by a mirrored copy of the right half: a
    painter's second version, which a global descriptor finds very close to the first."""
    a = np.asarray(img).copy()
    w = a.shape[1]
    a[:, : w // 2] = a[:, w - w // 2:][:, ::-1][:, : w // 2]
    return Image.fromarray(a)


def query_of(img: Image.Image) -> Image.Image:
    """A phone-like view of ``img``: cropped, turned 4 degrees, scaled down."""
    w, h = img.size
    return img.crop((w // 10, h // 12, w - w // 10, h - h // 12)).rotate(4, resample=Image.BILINEAR,
                                                                       expand=False).resize((300, 260))


def test_reorder_shortlist_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.05], np.float32)
    out = reorder_shortlist(scores, np.array([0, 1, 2]), np.array([0, 50, 12]), min_inliers=10)
    # Verified first, most inliers first (1: 50, then 2: 12), then the unverified (0); the
    # shortlist's scores are handed out again in that order; the rest is untouched.
    np.testing.assert_allclose(out, [0.7, 0.9, 0.8, 0.1, 0.05])
    assert reorder_shortlist(scores, np.array([0, 1]), np.array([3, 4]), 10).tolist() == scores.tolist()


def test_inliers_tell_the_picture_from_its_near_duplicate_and_from_others():
    astronaut = skimage_photo("astronaut")
    q = local_features(query_of(astronaut))
    same, twin, other = (local_features(x) for x in (astronaut, near_duplicate(astronaut), skimage_photo("coffee")))
    n_same, n_twin, n_other = (count_inliers(q, x) for x in (same, twin, other))
    assert n_same >= 40 and n_same > 1.3 * n_twin
    assert n_other < MIN_INLIERS
    assert count_inliers(q, same) == n_same  # seeded RANSAC
    assert count_inliers(q, EMPTY) == 0 and count_inliers(EMPTY, same) == 0
    ia, ib = tentative_matches(q, same)
    assert len(ia) == len(ib) >= n_same and ia.max() < len(q) and ib.max() < len(same)
    assert len(local_features(Image.new("RGB", (40, 30), "grey"))) == 0  # flat: no keypoint, no error


def test_verifier_moves_the_right_picture_first(tmp_path):
    astronaut = skimage_photo("astronaut")
    paths = []
    for name, img in (("twin", near_duplicate(astronaut)), ("right", astronaut), ("coffee", skimage_photo("coffee"))):
        paths.append(tmp_path / f"{name}.jpg")
        img.save(paths[-1], quality=92)
    paths.append(tmp_path / "missing.jpg")  # a database file that vanished: never verified, no error
    scores = np.array([0.95, 0.90, 0.50, 0.93], np.float32)  # the twin first, as a global descriptor had it
    sv = SpatialVerifier(k=4)
    out = sv.rerank(query_of(astronaut), scores, lambda i: paths[i])
    assert np.argsort(-out)[0] == 1
    assert sorted(out.tolist()) == sorted(scores.tolist())  # only the order changed
    assert out.max() == scores.max()  # the top-1 score (the identification threshold's input) is kept
    assert np.array_equal(sv.rerank(query_of(astronaut), scores, lambda i: paths[i]), out)  # cached, same
    assert database_features(paths[1]) is database_features(paths[1]) and len(database_features(paths[3])) == 0


def test_sv_token_is_last_and_only_the_image_callers_apply_it():
    sv = parse_rerank("SV")
    assert sv.k == 50 and sv.images and parse_rerank("SV5").k == 5
    check_order([parse_rerank("DIFF10"), sv])  # verification re-orders the final ranking
    with pytest.raises(ValueError, match="must come last"):
        check_order([sv, parse_rerank("QE5")])
    q = np.eye(3, 4, dtype=np.float32)
    np.testing.assert_array_equal(rerank(q, q, [sv]), q @ q.T)  # the vector path passes it by
    assert verifier_for([parse_rerank("QE5")]) is None and verifier_for([sv]).k == 50


def test_eval_and_search_with_spatial_verification(photos_dir, chelsea_crop, tmp_path):
    index = tmp_path / "ix"
    subprocess.run(CLI + ["index", str(photos_dir), "--index", str(index)], capture_output=True, text=True,
                   check=True)
    out = subprocess.run(CLI + ["search", str(chelsea_crop), "--index", str(index), "--rerank", "SV4", "--json",
                                "-k", "3"], capture_output=True, text=True, check=True)
    hits = json.loads(out.stdout)["results"]
    assert len(hits) == 3 and hits[0]["path"].endswith("chelsea.jpg")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    from cbir.index import Searcher

    from cbir.index import Index

    searcher = Searcher(index, pipeline=f"{Index(index).pipeline},SV4")
    assert searcher.verifier is not None and searcher.verifier.k == 4
    (obj,) = searcher.search_objects(chelsea_crop, k=2, bbox=(0, 0, 300, 200))
    assert len(obj.results) == 2 and obj.results[0].path.endswith("chelsea.jpg")


def test_affine_inliers_finds_the_map_among_outliers():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, (60, 2))
    dst = src @ np.array([[0.9, 0.1], [-0.1, 1.1]]) + np.array([5.0, -3.0])
    dst[40:] = rng.uniform(0, 300, (20, 2))  # 20 wrong matches
    assert affine_inliers(src, dst, tolerance=2.0) == 40
    assert affine_inliers(src, dst, tolerance=2.0) == affine_inliers(src, dst, tolerance=2.0, seed=0)
    line = np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1)
    assert affine_inliers(line, line, tolerance=2.0) == 0  # collinear: no affine map to fit
    assert affine_inliers(src[:2], dst[:2], tolerance=2.0) == 0


def test_a_collapsed_or_mirrored_map_verifies_nothing():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, (50, 2))
    # Many query keypoints matched to one spot of the database image: a map of scale ~0 would
    # "explain" them all (the bug the first code had); so would a mirror image of the picture.
    assert affine_inliers(src, np.full((50, 2), 100.0) + rng.normal(0, 0.5, (50, 2)), tolerance=7.7) < 4
    assert affine_inliers(src, src * np.array([-1.0, 1.0]) + 300, tolerance=2.0) < 4
    assert affine_inliers(src, src * 0.5 + 20, tolerance=2.0) == 50  # a plain zoom is fine
    astronaut = skimage_photo("astronaut")
    ia, ib = tentative_matches(local_features(query_of(astronaut)), local_features(astronaut))
    assert len(set(ib.tolist())) == len(ib)  # one-to-one
