"""Extraction on a local Ray (the code path of a cluster), Parquet shards, ingestion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'cbir[ray]'")
pytest.importorskip("pyarrow", reason="pyarrow is not installed: pip install 'cbir[ray]'")

from cbir.index import Index  # noqa: E402
from cbir.pipeline import Extractor, resolve_spec  # noqa: E402
from cbir.scale.shards import MANIFEST, ShardError, ingest_shards, read_shard, shard_files  # noqa: E402

SPEC = "efficientnet_lite0/bn2,long128,GeM3,L2"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cbir.scale.ray_extract import init_ray

    init_ray(num_cpus=2, object_store_mb=128)
    yield ray
    ray.shutdown()


@pytest.fixture()
def folder(tmp_path):
    import skimage.data

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((160 + 8 * i, 120))
        img.save(root / ("sub" if i % 2 else "") / f"{name}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return root


@pytest.mark.timeout(300)
def test_ray_index_matches_local_extraction(ray_local, folder, tmp_path):
    from cbir.images import list_images
    from cbir.scale.ray_extract import update_index_ray

    warnings = []
    shards = tmp_path / "shards"
    report = update_index_ray(folder, tmp_path / "idx", SPEC, workers=1, batch_size=2, threads_per_worker=1,
                              shards_dir=shards, warn=warnings.append)
    assert report.added == 4 and report.failed == [str(folder / "broken.jpg")]
    assert any("broken.jpg" in w for w in warnings)

    # Shards: a manifest plus plain Parquet files any reader can take.
    assert (shards / MANIFEST).exists() and shard_files(shards)
    cols, vecs = read_shard(shard_files(shards)[0])
    assert vecs.dtype == np.float32 and vecs.shape[1] == 1280

    idx = Index(tmp_path / "idx")
    assert len(idx) == 4
    ids, got = idx.live()
    paths = [idx.get(int(i)).path for i in ids]
    want = Extractor(resolve_spec(SPEC), threads=1).extract(paths)
    np.testing.assert_allclose(got, want, atol=1e-4)

    # Second run: nothing changed, nothing extracted; a deleted file is dropped.
    (folder / "sub" / "coffee.jpg").unlink()
    report = update_index_ray(folder, tmp_path / "idx", SPEC, workers=1, warn=warnings.append)
    assert (report.added, report.removed) == (0, 1)
    assert len(Index(tmp_path / "idx")) == 3
    assert len(list_images(folder)) == 4  # 3 images + the broken one
    assert not list((tmp_path / "idx").glob(".shards-*"))  # temporary shards removed

    # Shards of another pipeline are refused.
    other = Index.create(tmp_path / "other", {"pipeline": "x", "weights_sha256": "y"}, 1280)
    with other.writer(), pytest.raises(Exception, match="hold descriptors of"):
        ingest_shards(other, shards)
    with pytest.raises(ShardError, match="no cbir-shards.json"):
        ingest_shards(other, tmp_path)
