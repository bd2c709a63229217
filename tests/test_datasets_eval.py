"""Benchmark layouts and the evaluation command, on small fixtures and on the shared museum set."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from cbir.datasets import DatasetError, load_benchmark
from cbir.evaluation import evaluate, interpolated_pr
from cbir.pipeline import Extractor, resolve_spec

from conftest import PHOTO_NAMES, skimage_photo

FAST = "efficientnet_lite0/bn2,long224,GeM3,L2"


def _touch_images(root: Path, names: list[str]) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        skimage_photo("chelsea", 64).save(p)


def test_folder_per_class(tmp_path):
    _touch_images(tmp_path, ["cats/a.jpg", "cats/b.jpg", "cups/c.jpg"])
    b = load_benchmark(tmp_path)
    assert b.kind == "folders" and len(b.database) == 3 and len(b.queries) == 3
    qa = next(q for q in b.queries if q.image == "cats/a.jpg")
    assert qa.positives == ("cats/b.jpg",) and qa.junk == ("cats/a.jpg",) and qa.tags == ("cats",)
    assert next(q for q in b.queries if q.image == "cups/c.jpg").positives == ()


def test_holidays_naming(tmp_path):
    _touch_images(tmp_path, ["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100101.jpg"])
    b = load_benchmark(tmp_path)
    assert b.kind == "holidays" and len(b.queries) == 2
    q = b.queries[0]
    assert q.image == "100000.jpg" and q.positives == ("100001.jpg", "100002.jpg") and q.junk == ("100000.jpg",)


def test_ukbench_naming(tmp_path):
    _touch_images(tmp_path, [f"ukbench{i:05d}.jpg" for i in range(8)])
    b = load_benchmark(tmp_path)
    assert b.kind == "ukbench" and len(b.queries) == 8
    assert b.queries[5].positives == tuple(f"ukbench{i:05d}.jpg" for i in range(4, 8))


def test_revisited_protocols(tmp_path):
    gnd = {"imlist": ["d0", "d1", "d2", "d3"], "qimlist": ["q0"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [1, 2, 30, 40]}]}
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(gnd, f)
    b = load_benchmark(tmp_path)
    assert b.kind == "revisited" and b.database[0] == "d0.jpg"
    by = {q.tags[0]: q for q in b.queries}
    assert by["easy"].positives == ("d0.jpg",) and set(by["easy"].junk) == {"d2.jpg", "d1.jpg"}
    assert by["medium"].positives == ("d0.jpg", "d1.jpg") and by["medium"].junk == ("d2.jpg",)
    assert by["hard"].positives == ("d1.jpg",) and set(by["hard"].junk) == {"d2.jpg", "d0.jpg"}
    assert by["hard"].bbox == (1.0, 2.0, 30.0, 40.0)


def test_bad_benchmark_dirs(tmp_path):
    with pytest.raises(DatasetError, match="no such benchmark"):
        load_benchmark(tmp_path / "missing")
    (tmp_path / "gt.json").write_text("{not json")
    with pytest.raises(DatasetError, match="gt.json: not in the expected format"):
        load_benchmark(tmp_path)


def test_interpolated_pr():
    pr = interpolated_pr(np.array([0, 2]), 2)
    assert pr[0] == 1.0 and pr[50] == 1.0 and pr[51] == pytest.approx(2 / 3) and pr[100] == pytest.approx(2 / 3)
    assert interpolated_pr(np.array([], int), 3).sum() == 0


def test_evaluate_small_gt_json_with_crop_and_broken_files(tmp_path):
    root = tmp_path / "bench"
    (root / "database").mkdir(parents=True)
    (root / "queries").mkdir()
    for n in PHOTO_NAMES:
        skimage_photo(n, 300).save(root / "database" / f"{n}.jpg")
    (root / "database" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    q = skimage_photo("chelsea", 300)
    # The query photo is the chelsea picture pasted onto a coffee background; its box is the cat.
    canvas = skimage_photo("coffee", 600).resize((600, 400))
    canvas.paste(q, (150, 50))
    canvas.save(root / "queries" / "q0.jpg")
    gt = {"database": [f"database/{n}.jpg" for n in PHOTO_NAMES] + ["database/broken.jpg"],
          "queries": [{"image": "queries/q0.jpg", "positives": ["database/chelsea.jpg"], "junk": [],
                       "tags": ["pasted"], "bbox": [150, 50, 150 + q.width, 50 + q.height]},
                      {"image": "queries/missing.jpg", "positives": ["database/coffee.jpg"], "tags": ["gone"]}]}
    (root / "gt.json").write_text(json.dumps(gt))
    warnings: list[str] = []
    r = evaluate(load_benchmark(root), Extractor(resolve_spec(FAST)), warn=warnings.append)
    s = r.summary
    assert s["map_by_tag"]["pasted"] == 1.0  # the box crops the cat out of the coffee photo
    assert s["map_by_tag"]["gone"] == 0.0  # an unreadable query can never raise the mAP
    assert s["n_database_unreadable"] == 1 and s["n_queries"] == 2 and s["n_queries_unreadable"] == 1
    assert any("broken.jpg" in w for w in warnings) and any("missing.jpg" in w for w in warnings)
    plot = tmp_path / "pr.png"
    r.plot(plot)
    assert plot.stat().st_size > 5000
    csv_path = tmp_path / "q.csv"
    r.write_per_query(csv_path)
    assert csv_path.read_text().count("\n") == 3


@pytest.mark.slow
def test_museum_default_pipeline_reaches_095(museum):
    from cbir.pipeline import DEFAULT_PIPELINE

    s = evaluate(load_benchmark(museum), Extractor(resolve_spec(DEFAULT_PIPELINE)), warn=lambda m: None).summary
    assert s["n_queries"] == 60
    assert s["map"] >= 0.95, s
    assert set(s["map_by_tag"]) == {"plain", "background"}


class _Exploit:
    """Pickles to a call of os.system: what a crafted benchmark file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_ground_truth_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    gnd = {"imlist": _Exploit(marker), "qimlist": [], "gnd": []}
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
    with pytest.raises(DatasetError) as e:
        load_benchmark(tmp_path)
    assert not marker.exists()
    msg = str(e.value)
    assert "gnd_roxford5k.pkl" in msg and "refused" in msg and "system" in msg and "\n" not in msg


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_shaped_ground_truth_pickle_with_numpy_arrays_loads(tmp_path, protocol):
    # As in the published gnd_r*.pkl files: lists of names, and numpy arrays of indices and boxes.
    gnd = {"imlist": ["d0", "d1", "d2"], "qimlist": ["q0"],
           "gnd": [{"easy": np.array([0], np.int64), "hard": np.array([1], np.int64), "junk": np.array([], np.int64),
                    "bbx": np.array([1.5, 2.0, 30.0, 40.0])}]}
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(pickle.dumps(gnd, protocol=protocol))
    b = load_benchmark(tmp_path)
    assert b.kind == "revisited" and b.name == "rparis6k" and len(b.queries) == 3
    medium = next(q for q in b.queries if q.tags == ("medium",))
    assert medium.positives == ("d0.jpg", "d1.jpg") and medium.bbox == (1.5, 2.0, 30.0, 40.0)


def test_unreadable_queries_are_counted_and_reported():
    from cbir.cli import format_summary
    from cbir.datasets import Benchmark, Query
    from cbir.evaluation import score_vectors

    bench = Benchmark("b", Path("."), ["a.jpg", "b.jpg"],
                      [Query("qa.jpg", ("a.jpg",)), Query("qb.jpg", ("b.jpg",)), Query("qc.jpg", ())])
    db = np.eye(2, dtype=np.float32)
    queries = np.array([[1, 0], [np.nan, np.nan], [np.nan, np.nan]], np.float32)  # qb unreadable; qc has no positives
    s = score_vectors(bench, db, queries).summary
    assert s["n_queries"] == 2 and s["map"] == 0.5
    assert s["n_queries_unreadable"] == 1
    s.update(pipeline="p", dim=2, extract_ms_per_image=1.0)
    assert "1 query image(s) unreadable, scored AP 0" in format_summary(s)
