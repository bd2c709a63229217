"""The index: add / update / delete / reopen, corrupt files, pipeline mismatch, kill mid-indexing."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir.index import Index, IndexMismatch, IndexStoreError, Searcher, update_index
from cbir.pipeline import Extractor, resolve_spec

from conftest import PHOTO_NAMES, skimage_photo

FAST = "efficientnet_lite0/bn2,long224,GeM3,L2"  # smaller input: same code path, faster tests


@pytest.fixture
def folder(photos_dir, tmp_path) -> Path:
    d = tmp_path / "images"
    shutil.copytree(photos_dir, d)
    return d


def quiet(_msg: str) -> None:
    pass


def test_build_search_update_delete_reopen(folder, tmp_path, chelsea_crop):
    idx = tmp_path / "index"
    r = update_index(folder, idx, FAST, warn=quiet)
    assert (r.added, r.updated, r.removed) == (len(PHOTO_NAMES), 0, 0)

    s = Searcher(idx)
    hits = s.search(chelsea_crop, k=3)
    assert Path(hits[0].path).name == "chelsea.jpg"
    assert hits[0].score > hits[1].score

    # Unchanged folder: nothing to do. Touched but same content: no re-extraction.
    assert update_index(folder, idx, warn=quiet).unchanged == len(PHOTO_NAMES)
    os.utime(folder / "coffee.jpg", ns=(1, 1))
    r = update_index(folder, idx, warn=quiet)
    assert (r.added, r.updated, r.unchanged) == (0, 0, len(PHOTO_NAMES))

    # Changed content -> re-extracted; new file -> added; deleted file -> dropped.
    before = Index(idx).live()
    skimage_photo("coffee").rotate(90, expand=True).save(folder / "coffee.jpg")
    skimage_photo("astronaut").crop((0, 0, 200, 200)).save(folder / "new.png")
    (folder / "rocket.jpg").unlink()
    r = update_index(folder, idx, warn=quiet)
    assert (r.added, r.updated, r.removed) == (1, 1, 1)

    index = Index(idx)  # reopen from disk
    entries = index.entries()
    names = sorted(Path(p).name for p in entries)
    assert names == sorted({f"{n}.jpg" for n in PHOTO_NAMES} - {"rocket.jpg"} | {"new.png"})
    ids, vecs = index.live()
    assert len(ids) == len(names) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    # The chelsea vector did not move; the coffee vector did.
    old = dict(zip(before[0], before[1]))
    chelsea_id = entries[str(folder / "chelsea.jpg")].id
    coffee = entries[str(folder / "coffee.jpg")]
    assert np.array_equal(index.vector(chelsea_id), old[chelsea_id])
    assert coffee.id not in old
    # Each stored vector is the extraction of its own file.
    ex = Extractor(resolve_spec(FAST))
    np.testing.assert_allclose(index.vector(coffee.id), ex.extract_one(coffee.path), atol=1e-5)

    assert Searcher(idx).search(chelsea_crop, k=1)[0].path.endswith("chelsea.jpg")
    index.remove(ids=[chelsea_id])
    assert all(h.id != chelsea_id for h in Searcher(idx).search(chelsea_crop, k=10))


def test_corrupt_and_truncated_images_are_skipped_with_one_line_each(folder, tmp_path):
    data = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "garbage.png").write_bytes(b"this is not a png at all")
    (folder / "empty.jpg").write_bytes(b"")
    warnings: list[str] = []
    r = update_index(folder, tmp_path / "index", FAST, warn=warnings.append)
    assert r.added == len(PHOTO_NAMES)
    assert sorted(Path(p).name for p in r.failed) == ["empty.jpg", "garbage.png", "truncated.jpg"]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert any("truncated.jpg" in w and ("truncated" in w or "corrupt" in w) for w in warnings)
    assert "3 skipped as unreadable" in r.summary()


def test_a_different_pipeline_is_refused(folder, tmp_path):
    idx = tmp_path / "index"
    update_index(folder, idx, FAST, warn=quiet)
    with pytest.raises(IndexMismatch, match="built with pipeline 'efficientnet_lite0/bn2,long224,GeM3,L2'"):
        Searcher(idx, pipeline="efficientnet_lite0/bn2,long224,MAX,L2")
    with pytest.raises(IndexMismatch):
        update_index(folder, idx, "efficientnet_lite0/blocks.5,long224,GeM3,L2", warn=quiet)


def test_pca_pipeline_is_fitted_on_a_separate_set_and_saved(folder, tmp_path, photos_dir):
    pipeline = "efficientnet_lite0/bn2,long224,GeM3,L2,PCAW4,L2"
    with pytest.raises(Exception, match="--fit-on"):
        update_index(folder, tmp_path / "a", pipeline, warn=quiet)
    fit_set = sorted(photos_dir.glob("*.jpg"))
    update_index(folder, tmp_path / "b", pipeline, fit_on=fit_set, warn=quiet)
    index = Index(tmp_path / "b")
    assert index.dim == 4 and set(index.post_state()) == {"1.mean_", "1.components_", "1.explained_variance_"}
    s = Searcher(tmp_path / "b")  # loads the saved PCA, not a refit
    np.testing.assert_allclose(s.extractor.post[1].components_, index.post_state()["1.components_"])


def test_not_an_index_and_busy_writer(tmp_path, folder):
    with pytest.raises(IndexStoreError, match="not a cbir index"):
        Index(tmp_path)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    with pytest.raises(IndexStoreError, match="not empty"):
        update_index(folder, tmp_path / "stuff", FAST, warn=quiet)
    idx = tmp_path / "index"
    update_index(folder, idx, FAST, warn=quiet)
    with Index(idx).writer():
        with pytest.raises(IndexStoreError, match="another process is writing"):
            update_index(folder, idx, warn=quiet)


def _many_images(d: Path, n: int) -> None:
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = skimage_photo(PHOTO_NAMES[i % len(PHOTO_NAMES)], 300)
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        # Distinct sizes: one image per batch, so commits come every --commit-every images.
        img.crop((x0, y0, x0 + w // 2 + i, y0 + h // 2)).save(d / f"img{i:03d}.jpg", quality=90)


def test_kill_during_indexing_loses_nothing_committed_and_resumes(tmp_path):
    images, idx = tmp_path / "images", tmp_path / "index"
    n = 40
    _many_images(images, n)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cbir.cli", "index", str(images), "--index", str(idx),
           "-p", FAST, "--commit-every", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = 0
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                con = sqlite3.connect(idx / "catalog.sqlite", timeout=1)
                committed = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                con.close()
            except sqlite3.Error:
                committed = 0
            if committed >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "indexing finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert 6 <= committed < n

    index = Index(idx)
    kept = len(index)
    assert kept >= committed
    ids, vecs = index.live()  # every committed row has its complete vector
    assert np.isfinite(vecs).all() and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    ex = Extractor(resolve_spec(FAST))
    some = index.entries()
    for path, e in list(some.items())[:3]:
        np.testing.assert_allclose(index.vector(e.id), ex.extract_one(path), atol=1e-5)

    r = update_index(images, idx, warn=quiet)  # resumes: only the rest is extracted
    assert r.added == n - kept and r.unchanged == kept
    index = Index(idx)
    assert len(index) == n
    referenced = {row[0] for row in index.db.execute("SELECT file FROM segments")}
    assert {p.name for p in (idx / "vectors").iterdir()} == referenced  # the killed run's partial file is gone


def test_interrupted_creation_starts_over(tmp_path, folder):
    idx = tmp_path / "index"
    (idx / "vectors").mkdir(parents=True)
    (idx / "catalog.sqlite").write_bytes(b"")  # as if killed before index.json was written
    r = update_index(folder, idx, FAST, warn=quiet)
    assert r.added == len(PHOTO_NAMES)


def test_one_bad_entry_or_unreadable_folder_never_breaks_a_run(photos_dir, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(photos_dir / "chelsea.jpg", folder / "chelsea.jpg")
    shutil.copy(photos_dir / "rocket.jpg", folder / "sub" / "rocket.jpg")
    (folder / "ghost.jpg").symlink_to(tmp_path / "nowhere.jpg")  # dangling, as a file deleted mid-scan
    idx = tmp_path / "index"
    warnings: list[str] = []
    r = update_index(folder, idx, FAST, warn=warnings.append)
    assert r.added == 2 and r.failed == [str(folder.resolve() / "ghost.jpg")]
    assert len(warnings) == 1 and "ghost.jpg" in warnings[0] and "\n" not in warnings[0]

    # A folder that cannot be listed: warned about, and its indexed images are not dropped.
    real_scandir = os.scandir
    sub = str(folder.resolve() / "sub")

    def scandir(path="."):
        if os.fspath(path) == sub:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    warnings.clear()
    r = update_index(folder, idx, warn=warnings.append)
    assert r.removed == 0 and r.added == 0
    assert any("sub" in w and "cannot read folder" in w for w in warnings), warnings
    assert sorted(Path(p).name for p in Index(idx).entries()) == ["chelsea.jpg", "rocket.jpg"]
    monkeypatch.undo()
    (folder / "sub" / "rocket.jpg").unlink()  # readable again and really gone: now it is dropped
    assert update_index(folder, idx, warn=quiet).removed == 1


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    import skimage.data
    from PIL import Image

    from cbir.images import open_image

    cam = skimage.data.camera()
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(cam).save(folder / "camera.png")  # the 8-bit twin
    skimage_photo("coffee").save(folder / "coffee.jpg")
    skimage_photo("rocket").save(folder / "rocket.jpg")
    q16 = tmp_path / "camera16.png"
    Image.fromarray(cam.astype(np.uint16) * 257).save(q16)
    assert Image.open(q16).mode == "I;16"
    twin = np.asarray(open_image(folder / "camera.png"))
    assert np.array_equal(np.asarray(open_image(q16)), twin)  # not a blank white image
    big_endian = tmp_path / "camera16b.tif"
    Image.fromarray((cam.astype(np.uint16) * 257).astype(">u2")).save(big_endian)
    assert Image.open(big_endian).mode == "I;16B" and np.array_equal(np.asarray(open_image(big_endian)), twin)
    as_float = tmp_path / "cameraf.tif"
    Image.fromarray(cam.astype(np.float32) / 255).save(as_float)
    assert np.abs(np.asarray(open_image(as_float)).astype(int) - twin).max() <= 1

    idx = tmp_path / "index"
    update_index(folder, idx, FAST, warn=quiet)
    hit = Searcher(idx).search(q16, k=1)[0]
    assert Path(hit.path).name == "camera.png" and hit.score > 0.99


def test_creating_an_index_takes_the_writer_lock_first(tmp_path):
    import fcntl

    from cbir.index import IndexBusy

    root = tmp_path / "index"
    root.mkdir()
    (root / "catalog.sqlite").write_bytes(b"")  # another process's creation, half done
    identity = {"pipeline": "p", "weights_sha256": "0" * 64}
    with open(root / ".lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexBusy):
            Index.create(root, identity, 4)
        assert (root / "catalog.sqlite").exists() and not (root / "index.json").exists()
        fcntl.flock(other, fcntl.LOCK_UN)
    index = Index.create(root, identity, 4)  # that creation was abandoned: start over
    assert len(index) == 0 and (root / ".lock").exists()
    with pytest.raises(IndexStoreError, match="already exists"):
        Index.create(root, identity, 4)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(IndexStoreError, match="not a directory"):
        Index.create(afile, identity, 4)


def test_a_reader_unmaps_segments_another_writer_deleted(tmp_path):
    from cbir.index import Entry

    root = tmp_path / "index"
    writer = Index.create(root, {"pipeline": "p", "weights_sha256": "0" * 64}, 4)
    rng = np.random.default_rng(0)
    with writer.writer():
        a = writer.add([Entry(f"/x/a{i}.jpg", 1, 1, "h", {}) for i in range(3)], rng.random((3, 4), np.float32))
        writer.add([Entry(f"/x/b{i}.jpg", 1, 1, "h", {}) for i in range(3)], rng.random((3, 4), np.float32))
    first_segment = {f.name for f in (root / "vectors").iterdir()}
    reader = Index(root)  # a long-running server
    reader.search(rng.random((1, 4), np.float32), 2)
    assert len(reader._mmaps) == 2

    def mapped() -> str:
        return Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""

    with writer.writer():
        writer.remove(ids=a)  # its whole segment is dead: the file is deleted
    gone = first_segment - {f.name for f in (root / "vectors").iterdir()}
    assert len(gone) == 1
    (dead,) = gone
    scores, ids = reader.search(rng.random((1, 4), np.float32), 6)
    assert set(ids[0]) - {-1} <= set(range(4, 7)) and dead not in reader._mmaps
    assert dead not in mapped()
