"""The search service's API, through FastAPI's test client: every endpoint, every error path.

The index holds six real photographs (scikit-image's); queries are edited copies of them.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cbir.index import Searcher  # noqa: E402
from cbir.service import samples  # noqa: E402
from cbir.service.app import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """A private copy of the shared sample index (these tests add and delete images)."""
    _, shared = samples.build_index(tmp_path_factory.getbasetemp() / "cbir-service-samples")
    mine = tmp_path_factory.mktemp("service-api") / "index"
    shutil.copytree(shared, mine)
    return mine


@pytest.fixture(scope="module")
def searcher(index_dir) -> Searcher:
    return Searcher(index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher=searcher)) as c:
        yield c


@pytest.fixture(scope="module")
def ids(client) -> dict[str, int]:
    """Sample photo name -> id, found through search."""
    out = {}
    body = client.post("/api/search", files={"file": ("q.jpg", samples.jpeg(samples.photo("astronaut")), "image/jpeg")},
                       data={"k": "100"}).json()
    for hit in body["results"]:
        out[hit["name"].removesuffix(".jpg")] = hit["id"]
    assert set(samples.PHOTOS) <= set(out)
    return out


def upload(data: bytes, name: str = "q.jpg", ctype: str = "image/jpeg"):
    return {"file": (name, data, ctype)}


def assert_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10, detail
    for w in words:
        assert w.lower() in detail.lower(), (w, detail)
    return detail


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header that declares a huge bitmap; a few hundred bytes on the wire."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- service -------------------------------------------------------------------------------
def test_health_and_stats(client):
    h = client.get("/api/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["count"] >= len(samples.PHOTOS)
    s = client.get("/api/stats").json()
    assert s["count"] == h.json()["count"]
    assert s["pipeline"].startswith("efficientnet_lite0/")
    index = client.app.state.service.index
    assert s["dim"] == index.dim > 0 and s["index_type"] == index.stats()["index_type"]
    assert s["limits"]["max_upload_bytes"] == 20 * 1024 * 1024 and s["read_only"] is False


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {"/api/health", "/api/stats", "/api/search", "/api/images", "/api/images/{image_id}",
                          "/api/images/{image_id}/similar", "/api/images/{image_id}/file",
                          "/api/images/{image_id}/thumbnail"}
    assert {"get", "delete"} <= set(paths["/api/images/{image_id}"])
    assert "413" in paths["/api/search"]["post"]["responses"] and "415" in paths["/api/search"]["post"]["responses"]


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file"' in r.text and "/static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for f, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        s = client.get(f"/static/{f}")
        assert s.status_code == 200 and kind in s.headers["content-type"]
    assert_error(client.get("/static/nothing.js"), 404)
    assert_error(client.get("/static/../app.py"), 404)


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/api/nothing"), 404, "/api/nothing")
    assert_error(client.put("/api/search"), 405, "PUT")


# -- search by upload --------------------------------------------------------------------
def test_search_finds_the_original_of_an_edited_copy(client, ids):
    r = client.post("/api/search", files=upload(samples.crop_query("chelsea")), data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 3 and len(body["results"]) == 3
    top = body["results"][0]
    assert top["name"] == "chelsea.jpg" and top["id"] == ids["chelsea"]
    assert top["meta"] == samples.PHOTOS["chelsea"]
    assert top["score"] > body["results"][1]["score"] + 0.05
    assert top["image_url"] == f"/api/images/{top['id']}/file"
    assert body["ms"] >= body["extract_ms"] > 0 and body["count"] >= 6
    assert "path" not in top  # server paths are not exposed


def test_search_with_a_box_searches_that_region(client):
    data, left, right = samples.composite_query("coffee", "chelsea")
    for box, expect in ((left, "coffee.jpg"), (right, "chelsea.jpg")):
        r = client.post("/api/search", files=upload(data), data={"k": "2", "bbox": ",".join(map(str, box))})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["name"] == expect


def test_search_accepts_png_and_k_default(client):
    buf = io.BytesIO()
    samples.photo("rocket").save(buf, "PNG")
    r = client.post("/api/search", files=upload(buf.getvalue(), "rocket.png", "image/png"))
    assert r.status_code == 200 and r.json()["k"] == 10
    assert r.json()["results"][0]["name"] == "rocket.jpg"


@pytest.mark.parametrize("k", ["0", "101", "-3", "abc", "2.5"])
def test_search_bad_k(client, k):
    assert_error(client.post("/api/search", files=upload(samples.crop_query()), data={"k": k}), 422, "k")


@pytest.mark.parametrize("bbox, words", [
    ("1,2,3", ["bbox", "four numbers"]),
    ("a,b,c,d", ["bbox"]),
    ("10,10,5,50", ["x1 > x0"]),
    ("nan,0,10,10", ["bbox"]),
    ("0,0,inf,10", ["bbox"]),
    ("5000,5000,6000,6000", ["box", "empty"]),
])
def test_search_bad_bbox(client, bbox, words):
    r = client.post("/api/search", files=upload(samples.crop_query()), data={"bbox": bbox})
    assert_error(r, 422, *words)


def test_search_rejects_what_is_not_an_image(client):
    assert_error(client.post("/api/search", data={"k": "3"}), 422, "file", "required")
    assert_error(client.post("/api/search", data={"file": "not a file"}), 422, "file")
    assert_error(client.post("/api/search", files=upload(b"hello", "notes.txt", "text/plain")), 415, "notes.txt", "text/plain")
    assert_error(client.post("/api/search", files=upload(b"hello world", "fake.jpg")), 415, "fake.jpg", "not an image")
    assert_error(client.post("/api/search", files=upload(b"", "empty.jpg")), 422, "empty")
    jpg = samples.crop_query()
    assert_error(client.post("/api/search", files=upload(jpg[: len(jpg) // 3], "cut.jpg")), 422, "cut.jpg", "truncated")
    ico = io.BytesIO()
    samples.photo("coffee", 64).save(ico, "ICO")
    assert_error(client.post("/api/search", files=upload(ico.getvalue(), "icon.ico", "image/x-icon")), 415, "ICO")
    assert_error(client.post("/api/search", content=b"raw", headers={"content-type": "image/jpeg"}), 422, "file")


def test_decompression_bomb_is_refused(client):
    r = client.post("/api/search", files=upload(png_bomb(), "bomb.png", "image/png"))
    assert_error(r, 413, "bomb.png")
    r = client.post("/api/search", files=upload(png_bomb(10000, 8500), "big.png", "image/png"))  # 85 Mpixel
    assert_error(r, 413, "big.png", "Mpixel")


@pytest.fixture(scope="module")
def small_client(searcher):
    """The same index behind tight limits: 50 KiB uploads, 0.2 Mpixel images, read-only."""
    app = create_app(searcher=searcher, max_upload_mb=50 / 1024, max_megapixels=0.2, read_only=True)
    with TestClient(app) as c:
        yield c


def test_upload_size_limit(small_client):
    big = samples.jpeg(samples.photo("hubble_deep_field", 1000), 98)
    assert len(big) > 60 * 1024
    detail = assert_error(small_client.post("/api/search", files=upload(big)), 413, "limit")
    assert "MiB" in detail or "bytes" in detail
    # Without a Content-Length (chunked), counted as it streams.
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))
    r = small_client.post("/api/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(r, 413, "limit")
    assert_error(small_client.post("/api/search", content=b"x", headers={"content-length": "zz"}), 400, "Content-Length")


def test_pixel_limit(small_client):
    img = samples.jpeg(samples.photo("coffee", 600), 50)  # 600x400 = 0.24 Mpixel, a small file
    assert len(img) < 50 * 1024
    assert_error(small_client.post("/api/search", files=upload(img, "coffee.jpg")), 413, "coffee.jpg", "Mpixel")
    ok = samples.jpeg(samples.photo("coffee", 300), 80)
    assert small_client.post("/api/search", files=upload(ok)).status_code == 200
    assert small_client.get("/api/stats").json()["limits"]["max_pixels"] == 200_000


def test_read_only_server_refuses_writes(small_client, ids):
    png = samples.jpeg(samples.photo("camera", 100))
    assert_error(small_client.post("/api/images", files={"files": ("c.jpg", png, "image/jpeg")}), 403, "read-only")
    assert_error(small_client.delete(f"/api/images/{ids['rocket']}"), 403, "read-only")
    assert small_client.get(f"/api/images/{ids['rocket']}").status_code == 200


# -- by id -----------------------------------------------------------------------------
def test_similar_excludes_itself(client, ids):
    r = client.get(f"/api/images/{ids['chelsea']}/similar", params={"k": 5})
    assert r.status_code == 200, r.text
    got = [h["id"] for h in r.json()["results"]]
    assert len(got) == 5 and ids["chelsea"] not in got
    scores = [h["score"] for h in r.json()["results"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_with_a_box(client, ids):
    r = client.get(f"/api/images/{ids['astronaut']}/similar", params={"k": 2, "bbox": "100,50,400,400"})
    assert r.status_code == 200 and r.json()["extract_ms"] > 0
    assert ids["astronaut"] not in [h["id"] for h in r.json()["results"]]
    assert_error(client.get(f"/api/images/{ids['astronaut']}/similar", params={"bbox": "0,0,1"}), 422, "bbox")
    assert_error(client.get(f"/api/images/{ids['astronaut']}/similar", params={"bbox": "900,900,990,990"}), 422, "empty")


@pytest.mark.parametrize("path, status", [
    ("/api/images/999999/similar", 404), ("/api/images/0/similar", 422), ("/api/images/-1/similar", 422),
    ("/api/images/abc/similar", 422), (f"/api/images/{2**70}/similar", 422), ("/api/images/1.5/similar", 422),
    ("/api/images/999999", 404), ("/api/images/999999/file", 404), ("/api/images/999999/thumbnail", 404),
    ("/api/images/999999/similar?bbox=1,1,50,50", 404),
])
def test_bad_ids(client, path, status):
    assert_error(client.get(path), status)


def test_bad_k_on_similar(client, ids):
    for k in (0, 101):
        assert_error(client.get(f"/api/images/{ids['coffee']}/similar", params={"k": k}), 422, "k")


def test_image_info_file_and_thumbnail(client, ids, index_dir):
    i = ids["coffee"]
    info = client.get(f"/api/images/{i}").json()
    assert info["name"] == "coffee.jpg" and info["meta"]["artist"] == "Rachel Michetti"
    assert (info["width"], info["height"]) == (600, 400) and info["uploaded"] is False
    f = client.get(info["image_url"])
    assert f.status_code == 200 and f.headers["content-type"] == "image/jpeg"
    assert f.headers["x-content-type-options"] == "nosniff"
    photos = index_dir.parent.parent / "cbir-service-samples" / "photos"
    assert f.content == (photos / "coffee.jpg").read_bytes()
    t = client.get(info["thumbnail_url"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(t.content)).size) == 256
    t64 = client.get(info["thumbnail_url"], params={"size": 64})
    assert Image.open(io.BytesIO(t64.content)).size == (64, 43)
    again = client.get(info["thumbnail_url"], params={"size": 64})  # from the cache
    assert again.content == t64.content
    big = client.get(info["thumbnail_url"], params={"size": 1024})  # never enlarged
    assert Image.open(io.BytesIO(big.content)).size == (600, 400)
    for size in (10, 5000, "x"):
        assert_error(client.get(info["thumbnail_url"], params={"size": size}), 422, "size")


def test_no_client_path_reaches_the_file_system(client):
    for p in ("/api/images/..%2F..%2Fetc%2Fpasswd/file", "/api/images/%2Fetc%2Fpasswd", "/static/..%2F..%2Fapp.py",
              "/api/images/1/file?path=/etc/passwd"):
        r = client.get(p)
        assert r.status_code in (404, 422) or b"root:" not in r.content, p
        if r.status_code != 200:
            assert "detail" in r.json()


# -- add and delete ----------------------------------------------------------------------
def test_add_search_and_delete(client, index_dir):
    n0 = client.get("/api/health").json()["count"]
    coins = samples.jpeg(samples.photo("coins"))
    r = client.post("/api/images", files={"files": ("../../coins.jpg", coins, "image/jpeg")},
                    data={"meta": json.dumps({"title": "Greek coins", "artist": "Brooklyn Museum"})})
    assert r.status_code == 201, r.text
    body = r.json()
    (added,) = body["added"]
    assert body["count"] == n0 + 1 and body["existing"] == []
    assert added["name"] == "coins.jpg" and added["uploaded"] is True
    assert added["meta"]["title"] == "Greek coins" and added["meta"]["filename"] == "coins.jpg"
    stored = list((index_dir / "uploads").iterdir())
    assert [p.name for p in stored] == [f"{added['sha256']}.jpg"]
    assert stored[0].read_bytes() == coins
    # It is found at once, with its metadata.
    q = samples.jpeg(samples.photo("coins").crop((40, 30, 340, 260)))
    top = client.post("/api/search", files=upload(q), data={"k": "1"}).json()["results"][0]
    assert top["id"] == added["id"] and top["name"] == "coins.jpg" and top["meta"]["artist"] == "Brooklyn Museum"
    assert client.get(f"/api/images/{added['id']}/file").content == coins
    # The same content again is not added twice.
    again = client.post("/api/images", files={"files": ("other-name.jpg", coins, "image/jpeg")}).json()
    assert again["added"][0]["id"] == added["id"] and again["existing"] == [added["id"]] and again["count"] == n0 + 1
    # Deleted: gone from the catalog, the search and the disk.
    d = client.delete(f"/api/images/{added['id']}")
    assert d.status_code == 200 and d.json() == {"deleted": added["id"], "count": n0}
    assert not stored[0].exists()
    assert_error(client.get(f"/api/images/{added['id']}"), 404)
    assert_error(client.delete(f"/api/images/{added['id']}"), 404)
    top = client.post("/api/search", files=upload(q), data={"k": "1"}).json()["results"][0]
    assert top["id"] != added["id"]


def test_add_several_at_once(client):
    n0 = client.get("/api/health").json()["count"]
    a, b = samples.jpeg(samples.photo("camera", 200)), samples.jpeg(samples.photo("coins", 200))
    buf = io.BytesIO()
    samples.photo("camera", 150).save(buf, "PNG")
    files = [("files", ("a.jpg", a, "image/jpeg")), ("files", ("b.jpg", b, "image/jpeg")),
             ("files", ("a-again.jpg", a, "image/jpeg")), ("files", ("c.png", buf.getvalue(), "image/png"))]
    r = client.post("/api/images", files=files)
    assert r.status_code == 201, r.text
    got = r.json()["added"]
    assert [x["name"] for x in got] == ["a.jpg", "b.jpg", "a.jpg", "c.png"]
    assert got[0]["id"] == got[2]["id"] and r.json()["count"] == n0 + 3
    for x in {x["id"] for x in got}:
        assert client.delete(f"/api/images/{x}").status_code == 200
    assert client.get("/api/health").json()["count"] == n0


def test_add_errors_leave_the_index_unchanged(client):
    n0 = client.get("/api/health").json()["count"]
    good = ("files", ("ok.jpg", samples.jpeg(samples.photo("camera", 100)), "image/jpeg"))
    assert_error(client.post("/api/images"), 422, "files")
    assert_error(client.post("/api/images", files=[good, ("files", ("x.txt", b"text", "text/plain"))]), 415, "x.txt")
    assert_error(client.post("/api/images", files=[good, ("files", ("x.jpg", b"\xff\xd8\xff\xe0garbage", "image/jpeg"))]), 422, "x.jpg", "corrupt")
    assert_error(client.post("/api/images", files=[("files", ("bomb.png", png_bomb(), "image/png"))]), 413, "bomb.png")
    for meta in ("[1, 2]", "{bad json", '"text"'):
        assert_error(client.post("/api/images", files=[good], data={"meta": meta}), 422, "meta", "JSON object")
    many = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(21)]
    assert_error(client.post("/api/images", files=many), 422, "at most 20")
    assert client.get("/api/health").json()["count"] == n0


def test_add_while_another_process_writes_is_409(client, index_dir):
    # flock is per open file: holding it on another descriptor is what a `cbir index` run does.
    with open(index_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            r = client.post("/api/images", files={"files": ("c.jpg", samples.jpeg(samples.photo("camera", 120)), "image/jpeg")})
            assert_error(r, 409, "another process is writing")
            assert_error(client.delete("/api/images/1"), 409, "another process is writing")
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def test_missing_file_on_disk_is_404(client):
    r = client.post("/api/images", files={"files": ("tmp.jpg", samples.jpeg(samples.photo("camera", 90)), "image/jpeg")})
    info = r.json()["added"][0]
    try:
        path = Path(client.app.state.service.index.get(info["id"]).path)
        path.unlink()
        assert_error(client.get(info["image_url"]), 404, "no longer on disk")
        assert_error(client.get(info["thumbnail_url"], params={"size": 100}), 404, "no longer on disk")
        assert_error(client.get(f"/api/images/{info['id']}/similar", params={"bbox": "0,0,50,50"}), 404, "no longer on disk")
        assert client.get(f"/api/images/{info['id']}/similar").status_code == 200  # the vector is still there
        assert client.get(f"/api/images/{info['id']}").json()["width"] is None
    finally:
        assert client.delete(f"/api/images/{info['id']}").status_code == 200


def test_searches_keep_working_while_images_are_added(client):
    q = samples.crop_query("chelsea")
    results, stop = [], threading.Event()

    def searching():
        while not stop.is_set():
            r = client.post("/api/search", files=upload(q), data={"k": "1"})
            results.append((r.status_code, r.json()["results"][0]["name"] if r.status_code == 200 else r.text))

    t = threading.Thread(target=searching)
    t.start()
    added = []
    try:
        for i, angle in enumerate((10, 20, 30)):
            img = samples.photo("camera", 160).rotate(angle)
            r = client.post("/api/images", files={"files": (f"rot{i}.jpg", samples.jpeg(img), "image/jpeg")})
            assert r.status_code == 201, r.text
            added.append(r.json()["added"][0]["id"])
    finally:
        stop.set()
        t.join(60)
    for i in added:
        client.delete(f"/api/images/{i}")
    assert results and all(r == (200, "chelsea.jpg") for r in results), results


# -- hardening (issue 10) -------------------------------------------------------------------
def _count(client) -> int:
    return client.get("/api/health").json()["count"]


@pytest.mark.parametrize("meta, words", [
    ('{"a": ' * 400 + "1" + "}" * 400, ["meta", "flat"]),  # was stored, then broke every search: 500
    ('{"a": ' * 5000 + "1" + "}" * 5000, ["meta", "bytes"]),  # was a RecursionError: 500
    ("[" * 100000, ["meta", "bytes"]),
    ('{"tags": ["a", "b"]}', ["meta", "tags"]),
    ('{"x": NaN}', ["meta", "NaN"]),
    (json.dumps({"note": "x" * 3000}), ["meta", "note"]),
    (json.dumps({f"k{i}": i for i in range(65)}), ["meta", "keys"]),
    ('{"n": ' + "9" * 30 + "}", ["meta", "range"]),
])
def test_meta_shape_is_checked_before_anything_is_written(client, meta, words):
    n0 = _count(client)
    stored = set((client.app.state.service.uploads).glob("*")) if client.app.state.service.uploads.exists() else set()
    good = ("files", ("ok.jpg", samples.jpeg(samples.photo("camera", 110)), "image/jpeg"))
    assert_error(client.post("/api/images", files=[good], data={"meta": meta}), 422, *words)
    assert _count(client) == n0
    assert (set(client.app.state.service.uploads.glob("*")) if client.app.state.service.uploads.exists() else set()) == stored


def test_flat_meta_of_scalars_is_accepted(client):
    meta = {"title": "Camera man", "year": 1983, "scale": 0.5, "framed": True, "note": None}
    r = client.post("/api/images", files={"files": ("cam.jpg", samples.jpeg(samples.photo("camera", 130)), "image/jpeg")},
                    data={"meta": json.dumps(meta)})
    assert r.status_code == 201, r.text
    added = r.json()["added"][0]
    assert {k: added["meta"][k] for k in meta} == meta
    assert client.delete(f"/api/images/{added['id']}").status_code == 200


def test_a_bad_row_already_in_the_catalog_does_not_break_searches(client):
    """Rows an older version stored (nested 400 deep; or too deep even to parse) are shown without it."""
    r = client.post("/api/images", files={"files": ("deep.jpg", samples.jpeg(samples.photo("coins", 150)), "image/jpeg")})
    assert r.status_code == 201, r.text
    image_id = r.json()["added"][0]["id"]
    con = client.app.state.service.index.db
    try:
        for raw, shown in (('{"title": "kept", "deep": ' + '{"a": ' * 400 + "1" + "}" * 401, {"title": "kept"}),
                           ("[" * 100000, {})):
            with con:
                con.execute("UPDATE images SET meta = ? WHERE id = ?", (raw, image_id))
            for _ in range(3):
                body = client.post("/api/search", files=upload(samples.crop_query("chelsea")), data={"k": "100"})
                assert body.status_code == 200, body.text
                (hit,) = [h for h in body.json()["results"] if h["id"] == image_id]
                assert hit["meta"] == shown
            info = client.get(f"/api/images/{image_id}")
            assert info.status_code == 200 and info.json()["meta"] == shown
            assert client.get(f"/api/images/{image_id}/similar", params={"k": 3}).status_code == 200
    finally:
        assert client.delete(f"/api/images/{image_id}").status_code == 200


def test_upload_replaced_by_a_symlink_or_changed_is_not_served(client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 100)
    data = samples.jpeg(samples.photo("camera", 140))
    info = client.post("/api/images", files={"files": ("s.jpg", data, "image/jpeg")}).json()["added"][0]
    path = Path(client.app.state.service.index.get(info["id"]).path)
    try:
        assert client.get(info["image_url"]).content == data
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content: still served
        assert client.get(info["image_url"]).content == data
        path.write_bytes(data + b"\0" * 10)  # changed since it was added
        assert_error(client.get(info["image_url"]), 410, "changed")
        assert_error(client.get(info["thumbnail_url"], params={"size": 100}), 410, "changed")
        path.unlink()
        path.symlink_to(secret)
        for url in (info["image_url"], info["thumbnail_url"] + "?size=80", f"/api/images/{info['id']}/similar?bbox=0,0,20,20"):
            r = client.get(url)
            assert_error(r, 404)
            assert b"root:" not in r.content
        assert client.get(f"/api/images/{info['id']}").json()["width"] is None
    finally:
        assert client.delete(f"/api/images/{info['id']}").status_code == 200


@pytest.fixture(scope="module")
def folder_client(tmp_path_factory):
    """A private index of a folder of three photos (these tests change the folder's files)."""
    from cbir.index import update_index

    folder = tmp_path_factory.mktemp("service-folder") / "photos"
    samples.write_photos(folder)
    for extra in set(samples.PHOTOS) - {"chelsea", "coffee", "rocket"}:
        (folder / f"{extra}.jpg").unlink()
    index = folder.parent / "index"
    update_index(folder, index, "efficientnet_lite0/bn2,long224,GeM3,L2", warn=lambda *_: None)
    with TestClient(create_app(searcher=Searcher(index))) as c:
        yield c, folder.resolve(), index


def _id_of(client, name: str) -> int:
    (e,) = [e for e in client.app.state.service.index.entries().values() if Path(e.path).name == name]
    return e.id


def test_indexed_file_replaced_by_a_symlink_to_etc_passwd_is_not_served(folder_client):
    client, folder, _ = folder_client
    i = _id_of(client, "rocket.jpg")
    original = (folder / "rocket.jpg").read_bytes()
    assert client.get(f"/api/images/{i}/file").content == original
    (folder / "rocket.jpg").unlink()
    (folder / "rocket.jpg").symlink_to("/etc/passwd")
    try:
        for url in (f"/api/images/{i}/file", f"/api/images/{i}/thumbnail?size=64", f"/api/images/{i}/similar?bbox=0,0,30,30"):
            r = client.get(url)
            assert_error(r, 404, "indexed folder")
            assert b"root:" not in r.content
    finally:
        (folder / "rocket.jpg").unlink()
        (folder / "rocket.jpg").write_bytes(original)


def test_a_delete_through_the_service_is_not_undone_by_the_next_index_run(folder_client):
    from cbir.index import update_index

    client, folder, index = folder_client
    spec = client.get("/openapi.json").json()["paths"]["/api/images/{image_id}"]["delete"]
    assert "left on disk" in spec["description"] and "cbir index" in spec["description"]
    i = _id_of(client, "coffee.jpg")
    n0 = _count(client)
    assert client.delete(f"/api/images/{i}").status_code == 200
    assert (folder / "coffee.jpg").exists()  # the user's file stays
    r = update_index(folder, index, warn=lambda *_: None)
    assert r.added == 0 and r.kept_out == 1 and "deleted through the service" in r.summary()
    assert _count(client) == n0 - 1
    os.utime(folder / "coffee.jpg")  # changed (touched) since: indexed again
    r = update_index(folder, index, warn=lambda *_: None)
    assert r.added == 1 and r.kept_out == 0 and _count(client) == n0


def test_uploads_in_flight_are_bounded(searcher):
    import asyncio

    import httpx

    app = create_app(searcher=searcher, max_uploads=1)
    boundary = "cbirtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + samples.crop_query("chelsea") + f"\r\n--{boundary}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

    async def scenario():
        started, release = asyncio.Event(), asyncio.Event()

        async def slow_body():
            yield body[:1000]
            started.set()  # the server has read the first chunk: this upload holds its slot
            await release.wait()
            yield body[1000:]

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post("/api/search", content=slow_body(), headers=headers))
            await started.wait()
            second = await c.post("/api/search", content=body, headers=headers)
            health = await c.get("/api/health")  # reads are not uploads: never refused
            release.set()
            return await first, second, health, await c.post("/api/search", content=body, headers=headers)

    first, second, health, third = asyncio.run(scenario())
    assert_error(second, 503, "uploads", "retry")
    assert second.headers["retry-after"] == "1"
    assert health.status_code == 200
    assert first.status_code == 200 and first.json()["results"][0]["name"] == "chelsea.jpg"
    assert third.status_code == 200  # the slot is free again


def test_default_pixel_cap_bounds_decode_work(client):
    limits = client.get("/api/stats").json()["limits"]
    assert limits["max_pixels"] == 50_000_000 and limits["max_uploads"] >= 1 and limits["max_meta_bytes"] == 8192
    r = client.post("/api/search", files=upload(png_bomb(8000, 7000), "big.png", "image/png"))  # 56 Mpixel, tiny file
    assert_error(r, 413, "big.png", "Mpixel")


def test_reader_pixel_cap_is_a_413_by_type(searcher):
    """Past a generous server cap, the image reader's own cap refuses (`TooManyPixels`): a 413, by
    the exception's type; words in a message never choose a status."""
    from cbir.images import ImageError, TooManyPixels
    from cbir.service.errors import status_of

    assert status_of(TooManyPixels("x")) == 413 and status_of(ImageError("x: 9000x9000 Mpixel, a decompression bomb")) == 422
    with TestClient(create_app(searcher=searcher, max_megapixels=300)) as c:
        big = png_bomb(12000, 9000)  # 108 Mpixel: under this server's cap, over the reader's 100
        assert_error(c.post("/api/search", files=upload(big, "h.png", "image/png")), 413, "h.png", "Mpixel")
        assert_error(c.post("/api/search", files=upload(big, "h.png", "image/png"), data={"bbox": "0,0,9,9"}), 413, "h.png")
        assert_error(c.post("/api/images", files=[("files", ("h.png", big, "image/png"))]), 413, "h.png", "Mpixel")


# -- the command -------------------------------------------------------------------------
def test_serve_command_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from cbir.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--max-upload-mb" in r.output
    r = runner.invoke(app, ["serve", "--index", str(tmp_path / "none"), "--port", "0"])
    assert r.exit_code == 2 and "not a cbir index" in r.output
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = runner.invoke(app, ["serve", "--index", str(tmp_path), "--port", str(s.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen" in r.output


# -- the real server -------------------------------------------------------------------------
def test_real_server_on_loopback(index_dir):
    """`cbir serve` itself: answers promptly (no Nagle stalls), refuses an oversize body with a JSON 413."""
    import http.client
    import statistics
    import time

    from cbir.service.process import running_server

    with running_server(index_dir, "--read-only", "--max-upload-mb", "1") as url:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            conn.request("GET", "/api/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
            times.append(time.perf_counter() - t0)
        assert statistics.median(times) < 0.03, times  # ~40 ms each if TCP_NODELAY were off
        body = b"x" * (3 * 1024 * 1024)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/api/search", body=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
        r = conn.getresponse()
        assert r.status == 413 and "limit" in json.loads(r.read())["detail"]
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/api/search", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers={"Content-Type": "multipart/form-data; boundary=x"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "limit" in json.loads(r.read())["detail"]
