"""`cbir synth`: ground truth that agrees with itself and with the pixels, reproducible output."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import polygon as fill_polygon

from cbir.synth import SynthConfig, SynthError, _homography, compose_photo, load_backgrounds, synthesize

from conftest import PHOTO_NAMES, skimage_photo


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Four small collection images in a nested folder, plus an unreadable file."""
    d = tmp_path_factory.mktemp("collection")
    (d / "sub").mkdir()
    for i, name in enumerate(PHOTO_NAMES[:4]):
        target = d / "sub" if i % 2 else d
        skimage_photo(name, 160).save(target / f"{name}.jpg", quality=90)
    (d / "broken.jpg").write_bytes(b"not a jpeg at all")
    return d


@pytest.fixture(scope="module")
def generated(collection, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "synthbench"
    warnings = []
    synthesize(collection, out, 10, seed=5, long_side=256, warn=warnings.append)
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "\n" not in warnings[0]
    return out


def _raster(poly, shape) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (independent of the generator's drawing)."""
    p = np.asarray(poly, float)
    rr, cc = fill_polygon(p[:, 1] - 0.5, p[:, 0] - 0.5, shape)
    m = np.zeros(shape, bool)
    m[rr, cc] = True
    return m


def _assert_consistent(photo_size, mask: np.ndarray, objects: list[dict]) -> None:
    w, h = photo_size
    assert mask.shape == (h, w)
    assert set(np.unique(mask)) <= {0, 255}
    union = np.zeros((h, w), bool)
    rasters = []
    for o in objects:
        poly = np.asarray(o["polygon"], float)
        assert poly.shape == (4, 2)
        # bbox == the polygon's bounds clipped to the photo (integer pixels)
        x0, y0 = np.floor(poly.min(0)); x1, y1 = np.ceil(poly.max(0))
        assert o["bbox"] == [max(0, x0), max(0, y0), min(w, x1), min(h, y1)]
        assert o["bbox"][2] > o["bbox"][0] and o["bbox"][3] > o["bbox"][1]
        r = _raster(poly, (h, w))
        rasters.append(r)
        union |= r
    # no two objects overlap, as polygons or as boxes
    for i in range(len(rasters)):
        for j in range(i + 1, len(rasters)):
            assert not (rasters[i] & rasters[j]).any()
            a, b = objects[i]["bbox"], objects[j]["bbox"]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    # left to right
    xs = [o["bbox"][0] for o in objects]
    assert xs == sorted(xs)
    # the mask is the union of the filled polygons, up to the rasterisation of their edges
    diff = (mask > 0) ^ union
    if diff.any():
        from scipy.ndimage import binary_dilation, binary_erosion

        edge = binary_dilation(union, iterations=2) & ~binary_erosion(union, iterations=2)
        assert not (diff & ~edge).any()


def test_ground_truth_agrees_with_itself(generated, collection):
    gt = json.loads((generated / "gt.json").read_text())
    assert gt["name"] == "synthbench"
    # the database: readable collection images, by a path relative to the output folder
    assert len(gt["database"]) == 4
    assert not any("broken" in p for p in gt["database"])
    for p in gt["database"]:
        assert not os.path.isabs(p)
        assert (generated / p).resolve().is_file()
        assert (generated / p).resolve().is_relative_to(collection.resolve())
    assert not list(generated.rglob("*.jpg")) or all("queries" in str(p) for p in generated.rglob("*.jpg"))
    counts = set()
    for q in gt["queries"]:
        objs = q["objects"]
        counts.add(len(objs))
        tag = ["no-painting", "one-painting", "two-paintings", "three-paintings"][len(objs)]
        assert q["tags"] == ["synthetic", tag]
        assert q["junk"] == []
        assert q["positives"] == sorted({p for o in objs for p in o["positives"]})
        assert all(len(o["positives"]) == 1 and o["positives"][0] in gt["database"] for o in objs)
        assert len({o["positives"][0] for o in objs}) == len(objs)  # a painting appears once per photo
        assert ("bbox" in q) == (len(objs) == 1)
        if len(objs) == 1:
            assert q["bbox"] == objs[0]["bbox"]
        photo = Image.open(generated / q["image"])
        mask = np.asarray(Image.open(generated / q["mask"]))
        assert photo.mode == "RGB" and 256 * 0.6 <= max(photo.size) <= 256 * 1.4
        _assert_consistent(photo.size, mask, objs)
    assert len(counts) >= 2


def test_loads_as_a_benchmark(generated):
    from cbir.datasets import load_benchmark

    bench = load_benchmark(generated)
    assert len(bench.queries) == 10 and len(bench.database) == 4
    for q in bench.queries:
        assert bench.path(q.image).is_file()
        assert all(bench.path(p).is_file() for p in q.positives)
        assert "synthetic" in q.tags


def test_same_seed_same_bytes(collection, generated, tmp_path, tmp_path_factory):
    again = tmp_path / "synthbench"
    synthesize(collection, again, 10, seed=5, long_side=256, warn=lambda m: None)
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    # gt.json's paths are relative to the folder, so even it is the same bytes
    for f in files:
        assert (generated / f).read_bytes() == (again / f).read_bytes(), f
    # the same with two worker processes
    parallel = tmp_path_factory.mktemp("parallel") / "synthbench"  # same depth: same relative paths
    synthesize(collection, parallel, 10, seed=5, long_side=256, warn=lambda m: None, workers=2)
    for f in files:
        assert (generated / f).read_bytes() == (parallel / f).read_bytes(), f
    other = tmp_path / "other" / "synthbench"
    synthesize(collection, other, 3, seed=6, long_side=256, warn=lambda m: None)
    assert (other / "queries/synth_00000.jpg").read_bytes() != (generated / "queries/synth_00000.jpg").read_bytes()


def test_holdout_excluded(collection, tmp_path):
    # a file name and a collection-relative path
    warnings = []
    gt_path = synthesize(collection, tmp_path / "b", 12, seed=1, long_side=200,
                         holdout=["chelsea.jpg", "sub/coffee.jpg", "nowhere.jpg"], warn=warnings.append)
    assert any("nowhere.jpg" in w for w in warnings)
    gt = json.loads(gt_path.read_text())
    names = {Path(p).name for p in gt["database"]}
    assert names == {"astronaut.jpg", "rocket.jpg"}
    used = {Path(p).name for q in gt["queries"] for p in q["positives"]}
    assert used and used <= names


def test_list_of_files_and_progress(collection, tmp_path):
    files = sorted(collection.rglob("*.jpg"))[:2]
    files = [f for f in files if "broken" not in f.name]
    calls = []

    class Bar:
        def __init__(self, **kw):
            calls.append(kw)

        def update(self, k):
            calls.append(k)

        def close(self):
            calls.append("closed")

    gt = json.loads(synthesize(files, tmp_path / "o", 3, seed=0, long_side=160, progress=Bar).read_text())
    assert len(gt["database"]) == len(files)
    assert calls[0]["total"] == 3 and calls[1:] == [1, 1, 1, "closed"]


def test_empty_collection_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(SynthError, match="empty") as e:
        synthesize(empty, tmp_path / "out", 2)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(SynthError, match="bad"):
        synthesize(bad, tmp_path / "out2", 2, warn=lambda m: None)
    assert not (tmp_path / "out" / "gt.json").exists()


@pytest.mark.parametrize("seed", range(6))
def test_compose_in_memory(seed):
    paintings = [skimage_photo(n, 120) for n in PHOTO_NAMES[seed % 3: seed % 3 + 1 + seed % 3]]
    photo, mask, objs = compose_photo(paintings, seed, long_side=300)
    assert photo.mode == "RGB" and mask.mode == "L" and mask.size == photo.size
    assert sorted(o["index"] for o in objs) == list(range(len(paintings)))
    _assert_consistent(photo.size, np.asarray(mask), objs)


def test_polygon_is_where_the_painting_is():
    """With every effect off and no frame, the warped source lands exactly on the polygon."""
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.NEAREST)
    for seed in range(4):
        photo, mask, objs = compose_photo([src], seed, size=(400, 300), config=SynthConfig.clean(p_cut=0.0))
        (o,) = objs
        poly = np.asarray(o["polygon"])
        from skimage.transform import ProjectiveTransform

        corners = np.array([[0, 0], [160, 0], [160, 120], [0, 120]], float)
        t = ProjectiveTransform(_homography(corners, poly))
        assert np.allclose(t(corners), poly, atol=1e-6)
        # sample the centres of the source's 10x10 blocks (pixel centres at +0.5)
        ys, xs = np.mgrid[5:120:10, 5:160:10]
        pts = t(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1))
        got = np.asarray(photo, float)[np.floor(pts[:, 1]).astype(int), np.floor(pts[:, 0]).astype(int)]
        want = np.asarray(src, float)[ys.ravel(), xs.ravel()]
        assert np.median(np.abs(got - want)) < 12
        assert np.mean(np.abs(got - want) < 40) > 0.9


def test_every_effect_at_once():
    """Each effect forced on (frames with mats and depth, floor, door, bench, labels, text, noise,
    hue shift, blur, JPEG, a background photo): the ground truth still agrees with itself."""
    on = dict(p_mat=1.0, p_floor=1.0, p_label=1.0, p_door=1.0, p_bench=1.0, p_shadow=1.0, p_spotlight=1.0,
              p_text=1.0, p_blur=1.0, p_gauss=1.0, p_impulse=1.0, p_hue=1.0, p_jpeg=1.0, p_vignette=1.0,
              p_depth=1.0)
    wall = skimage_photo("coffee", 300)
    for seed in range(4):
        paintings = [skimage_photo(n, 100) for n in PHOTO_NAMES[: 1 + seed % 3]]
        for bg in (None, wall):
            cfg = SynthConfig(**on, p_background=1.0 if bg else 0.0)
            photo, mask, objs = compose_photo(paintings, seed, long_side=320, background=bg, config=cfg)
            assert len(objs) == len(paintings)
            _assert_consistent(photo.size, np.asarray(mask), objs)


def test_gap_and_fill_hang_paintings_closer():
    """``gap`` / ``fill`` (``cbir synth --gap --fill``): two paintings side by side hang closer
    with a small gap and full slots than with the defaults."""
    paintings = [skimage_photo(n, 120) for n in PHOTO_NAMES[:2]]

    def gaps(cfg):
        out = []
        for seed in range(12):
            photo, _, objs = compose_photo(paintings, seed, size=(600, 300), config=cfg)
            (a, b) = sorted((o["bbox"] for o in objs), key=lambda box: box[0])
            out.append((b[0] - a[2]) / photo.width)
        return np.array(out)

    base = SynthConfig.clean(p_stacked=0.0, max_rotation=0.0, perspective=0.0)
    default, tight = gaps(base), gaps(replace(base, gap=(0.0, 0.01), fill=(1.0, 1.0)))
    assert tight.max() < 0.03 and np.median(tight) < np.median(default) - 0.02, (tight, default)


def test_frame_depth_is_drawn_outside_the_object():
    """``p_depth`` (``cbir synth --depth``): the same geometry and mask, the paintings' pixels
    untouched, and a band drawn just below each painting, outside its polygon."""
    paintings = [skimage_photo(n, 120) for n in PHOTO_NAMES[:2]]
    base = SynthConfig.clean(frame_probs={"black": 1.0}, depth=(0.05, 0.08), max_rotation=0.0, perspective=0.0)
    for seed in range(4):
        photo0, mask0, objs0 = compose_photo(paintings, seed, size=(600, 400), config=base)
        photo1, mask1, objs1 = compose_photo(paintings, seed, size=(600, 400), config=replace(base, p_depth=1.0))
        assert objs0 == objs1 and np.array_equal(np.asarray(mask0), np.asarray(mask1))
        a, b, m = (np.asarray(x, float) for x in (photo0, photo1, mask0))
        changed = np.abs(a - b).sum(2) > 30
        assert not changed[m > 0].any()  # nothing drawn over a painting
        for o in objs0:  # 2-4 px under the bottom edge (BR -> BL), along its middle
            (bx0, by0), (bx1, by1) = o["polygon"][3], o["polygon"][2]
            xs = np.arange(int(bx0 + 0.3 * (bx1 - bx0)), int(bx1 - 0.3 * (bx1 - bx0)))
            ys = np.round(by0 + (xs - bx0) * (by1 - by0) / (bx1 - bx0)).astype(int)
            band = changed[ys[:, None] + np.arange(2, 5), xs[:, None]]
            assert band.mean() > 0.7, (seed, o["bbox"], band.mean())


def test_at_most_three_paintings():
    with pytest.raises(ValueError):
        compose_photo([skimage_photo("chelsea", 64)] * 4, 0)


def test_museum_backgrounds_have_no_painting_left(museum):
    bgs = load_backgrounds(museum)
    assert 10 <= len(bgs) <= 30
    gt = json.loads((museum / "gt.json").read_text())
    # the painting area of the first kept background is now smooth wall
    q = [q for q in gt["queries"] if "background" in q["tags"]]
    kept = [x for x in q if (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1])
            <= 0.6 * np.prod(Image.open(museum / x["image"]).size)]
    assert len(kept) == len(bgs)
    for qq, bg in list(zip(kept, bgs))[:5]:
        x0, y0, x1, y1 = qq["bbox"]
        inside = np.asarray(bg, float)[y0 + 10:y1 - 10, x0 + 10:x1 - 10]
        assert inside.std(axis=(0, 1)).max() < 20


def test_cli(collection, tmp_path):
    from typer.testing import CliRunner

    from cbir.cli import app

    hold = tmp_path / "holdout.txt"
    hold.write_text("# left out\nchelsea.jpg\n\n")
    r = CliRunner().invoke(app, ["synth", str(collection), str(tmp_path / "o"), "-n", "2", "--seed", "3",
                                 "--holdout", str(hold), "--long-side", "200"])
    assert r.exit_code == 0, r.output
    gt = json.loads((tmp_path / "o" / "gt.json").read_text())
    assert len(gt["queries"]) == 2 and not any("chelsea" in p for p in gt["database"])
    # --closeup 1: every photo of one painting is a close-up; --closeup 0: none is. The same
    # seed draws the same paintings, so the close-ups' paintings are the larger ones.
    fracs = {}
    for p in (0, 1):
        r = CliRunner().invoke(app, ["synth", str(collection), str(tmp_path / f"c{p}"), "-n", "12", "--seed", "3",
                                     "--long-side", "200", "--closeup", str(p)])
        assert r.exit_code == 0, r.output
        fracs[p] = []
        for q in json.loads((tmp_path / f"c{p}" / "gt.json").read_text())["queries"]:
            if len(q["objects"]) == 1:
                w, h = Image.open(tmp_path / f"c{p}" / q["image"]).size
                x0, y0, x1, y1 = q["objects"][0]["bbox"]
                fracs[p].append(max((x1 - x0) / w, (y1 - y0) / h))
    assert len(fracs[1]) == len(fracs[0]) > 0
    assert min(fracs[1]) >= 0.6 and np.mean(fracs[1]) > np.mean(fracs[0]) + 0.05, fracs
    r = CliRunner().invoke(app, ["synth", str(collection), str(tmp_path / "o3"), "-n", "1", "--closeup", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    for bad in ("0.1", "0.2,0.1", "a,b"):
        r = CliRunner().invoke(app, ["synth", str(collection), str(tmp_path / "o4"), "-n", "1", "--gap", bad])
        assert r.exit_code == 2 and "--gap" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o4").exists()
    empty = tmp_path / "nothing"
    empty.mkdir()
    r = CliRunner().invoke(app, ["synth", str(empty), str(tmp_path / "o2"), "-n", "1"])
    assert r.exit_code == 2 and "nothing" in r.output and "Traceback" not in r.output
