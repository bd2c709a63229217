"""The Milvus backend, against milvus-lite started as a gRPC server on a loopback port
(the client code path of a Milvus cluster; milvus-lite itself is only a protocol double)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed: pip install 'cbir[milvus]'")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed: pip install 'cbir[milvus]' milvus-lite")

from cbir.index.store import Entry, Index  # noqa: E402
from cbir.index.milvus import MilvusBackend, MilvusError, MilvusURI  # noqa: E402

IDENTITY = {"pipeline": "test", "weights_sha256": "0" * 64}
D = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    data = tmp_path_factory.mktemp("milvus")
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"milvus-lite server exited: {proc.stdout.read()[-500:]}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("milvus-lite server did not start within 60 s")
    yield port
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_uri_parsing():
    u = MilvusURI.parse("milvus://db.example:19530/images_v1")
    assert (u.host, u.port, u.collection, u.endpoint) == ("db.example", 19530, "images_v1", "http://db.example:19530")
    assert MilvusURI.parse("milvuss://h:443/c").endpoint == "https://h:443"
    for bad in ("http://h:1/c", "milvus://h/c", "milvus://h:1/", "milvus://h:1/bad-name"):
        with pytest.raises(MilvusError, match="expected milvus://HOST:PORT/COLLECTION"):
            MilvusURI.parse(bad)


@pytest.mark.timeout(180)
def test_sync_and_search_match_faiss(server, tmp_path):
    idx = Index.create(tmp_path / "idx", IDENTITY, D, factory="Flat")
    x = vectors(300)
    with idx.writer():
        ids = idx.add([Entry(f"/img/{i}.jpg", 1, 1, "h", {}) for i in range(300)], x)
    uri = f"milvus://127.0.0.1:{server}/cbir_test"
    idx.set_backend(uri)
    assert Index(idx.root).backend_uri == uri  # stored with the index

    backend = idx.search_backend
    assert backend.sync(idx) == (300, 0)
    assert backend.sync(idx) == (0, 0)  # nothing to send the second time
    assert backend.count() == 300

    q = vectors(5, seed=3)
    scores, found = idx.search(q, 5)  # through Milvus
    idx.use_backend(None)
    want_scores, want = idx.search(q, 5)  # embedded FAISS, exact
    assert (found == want).mean() >= 0.9
    np.testing.assert_allclose(scores[:, 0], want_scores[:, 0], atol=1e-4)

    # Deletes and adds on the catalog reach Milvus at the next sync.
    with idx.writer():
        idx.remove(ids=ids[:10])
        idx.add([Entry("/img/new.jpg", 1, 1, "h", {})], x[:1])
    idx.use_backend(uri)
    assert idx.search_backend.sync(idx) == (1, 10)
    _, found = idx.search(x[:1], 1)
    assert found[0, 0] == max(ids) + 1

    # Without the local record of what was sent, the ids are read back from Milvus.
    (idx.root / "milvus-cbir_test.ids.npy").unlink()
    assert MilvusBackend(uri, D).sync(idx) == (0, 0)

    with pytest.raises(MilvusError, match="dimension 16, the index 8"):
        MilvusBackend(uri, 8)
    backend.drop()


def test_unreachable_server_is_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MilvusError, match="cannot reach Milvus"):
        MilvusBackend(f"milvus://127.0.0.1:{port}/c", D, timeout=2)


@pytest.mark.timeout(300)
def test_images_added_and_deleted_through_the_service_reach_milvus(server, tmp_path_factory):
    """The store reports every committed change to its backend, so the REST service's adds and
    deletes reach Milvus without a `cbir index` run; Milvus then answers with the new id."""
    import shutil

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cbir.index import Searcher
    from cbir.service import samples
    from cbir.service.app import create_app

    _, shared = samples.build_index(tmp_path_factory.getbasetemp() / "cbir-service-samples")
    root = tmp_path_factory.mktemp("milvus-service") / "index"
    shutil.copytree(shared, root)
    uri = f"milvus://127.0.0.1:{server}/cbir_service"
    idx = Index(root)
    idx.set_backend(uri)
    assert idx.search_backend.sync(idx) == (len(idx), 0)
    before = idx.search_backend.count()

    photo = samples.photo("astronaut").rotate(90, expand=True)  # a new image, not a copy of one indexed
    with TestClient(create_app(searcher=Searcher(root))) as client:
        r = client.post("/api/images", files={"files": ("new.jpg", samples.jpeg(photo), "image/jpeg")})
        assert r.status_code == 201, r.text
        new_id = r.json()["added"][0]["id"]
        remote = MilvusBackend(uri, idx.dim)
        assert remote.count() == before + 1
        v = Index(root).vector(new_id)[None]
        _, found = remote.search(v, 1)
        assert found[0, 0] == new_id  # Milvus itself answers with the uploaded image

        assert client.delete(f"/api/images/{new_id}").status_code == 200
        assert remote.count() == before
        _, found = remote.search(v, 5)
        assert new_id not in found[0]
        # The record of what Milvus holds followed, so the next sync has nothing to send.
        assert Index(root).search_backend.sync(Index(root)) == (0, 0)
    remote.drop()
