"""Extraction on Ray Data: the same code on a laptop (local Ray) and on a cluster (docs/scaling.md).

``cbir index DIR -i INDEX --engine ray`` works out what changed as the one-machine path does,
then ``map_batches`` the paths over an actor pool (`Embedder`: each worker loads the model once)
into Parquet shards (`cbir.scale.shards`) that the driver ingests, one transaction per file. On
a cluster the images and the index's parent folder must be mounted at the same path everywhere.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cbir.images import ImageError, sha256_file


class RayUnavailable(ImportError):
    """Ray Data is not installed."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError:
        raise RayUnavailable("--engine ray needs Ray Data: pip install 'cbir[ray]'") from None
    return ray


class Embedder:
    """A Ray actor: the pipeline's extractor, built once per worker; batches of paths in,
    shard rows (an Arrow table) out. Unreadable images become rows with an ``error``."""

    def __init__(self, pipeline: str, weights: str | None, engine: str, threads: int | None,
                 post_state: dict, batch_size: int, decode_workers: int) -> None:
        from cbir.pipeline import Extractor, resolve_spec

        spec = resolve_spec(pipeline, weights)
        self.extractor = Extractor(spec, weights, engine, threads=threads, batch_size=batch_size,
                                   decode_workers=decode_workers)
        self.extractor.load_post_state(post_state)
        self.dim: int | None = None

    def __call__(self, batch: dict) -> "object":
        from cbir.scale.shards import table

        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        errors, sizes, mtimes, hashes = [""] * n, [0] * n, [0] * n, [""] * n
        for i, p in enumerate(paths):
            try:
                st = os.stat(p)
                sizes[i], mtimes[i], hashes[i] = st.st_size, st.st_mtime_ns, sha256_file(p)
            except OSError as e:
                errors[i] = f"{p}: cannot read ({e.strerror})"
        todo = [i for i in range(n) if not errors[i]]

        def on_error(j: int, e: ImageError) -> None:
            errors[todo[j]] = str(e)

        vecs = self.extractor.extract([paths[i] for i in todo], on_error=on_error)
        dim = vecs.shape[1] if len(todo) else (self.dim or 1)
        out = np.zeros((n, dim), np.float32)
        for j, i in enumerate(todo):
            if not errors[i]:
                out[i] = vecs[j]
        self.dim = dim
        return table(paths, sizes, mtimes, hashes, out, errors)


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None):
    """Connect to ``address`` (a cluster: ``ray://HOST:10001`` or ``auto``) or start a local Ray."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    import logging

    kw: dict = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        kw["address"] = address
    else:
        kw.update(include_dashboard=False, num_cpus=num_cpus or os.cpu_count() or 1)
        if object_store_mb:
            kw["object_store_memory"] = object_store_mb << 20
    ray.init(**kw)
    ray.data.DataContext.get_current().enable_progress_bars = False  # cbir prints its own one-line report
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def extract_to_shards(paths: Sequence[str | Path], shards_dir: str | Path, extractor, workers: int | None = None,
                      batch_size: int = 32, threads_per_worker: int | None = None, address: str | None = None) -> Path:
    """Extract ``paths`` on Ray into Parquet shards under ``shards_dir`` (with the manifest).
    ``extractor`` (built on the driver) gives the pipeline, weights, engine and learned
    post-processing state; each of ``workers`` actors builds its own copy once."""
    from cbir.scale.shards import write_manifest

    shards_dir = Path(shards_dir)
    ray = init_ray(address)
    if workers is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, cpus // max(1, threads_per_worker or 1))
    write_manifest(shards_dir, extractor.identity, extractor.output_dim,
                   {"images": len(paths), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if not paths:
        return shards_dir
    items = [{"path": str(p)} for p in paths]
    blocks = max(1, min(len(items), workers * 4, (len(items) + batch_size - 1) // batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "pipeline": str(extractor.spec), "weights": str(extractor.weights) if extractor.weights else None,
            "engine": extractor.engine_name, "threads": threads_per_worker, "post_state": extractor.post_state(),
            "batch_size": extractor.batch_size, "decode_workers": extractor.decode_workers,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads_per_worker or 1,
    )
    ds.write_parquet(str(shards_dir / "parts"))
    return shards_dir


def update_index_ray(images_dir: str | Path, index_dir: str | Path, pipeline: str | None = None,
                     weights: str | Path | None = None, fit_on: Sequence[Path] | None = None,
                     address: str | None = None, workers: int | None = None, batch_size: int = 32,
                     threads_per_worker: int | None = None, shards_dir: str | Path | None = None,
                     engine: str = "onnx", warn: Callable[[str], None] = print):
    """`cbir.index.update_index`, with the extraction on Ray and the results through shards:
    to ``shards_dir`` (kept) or to a folder inside the index (removed after the ingest)."""
    from cbir.index.builder import UpdateReport, folder_metadata, open_or_create, scan_changes
    from cbir.scale.shards import ingest_shards

    t0 = time.perf_counter()
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise ImageError(f"{images_dir}: no such directory")
    index, extractor = open_or_create(index_dir, pipeline, weights, engine, fit_on, warn)
    report = UpdateReport()
    with index.writer():
        known, changed = scan_changes(index, images_dir, report, warn)
        todo = [str(p) for p, _, _ in changed]
        keep = shards_dir is not None
        out = Path(shards_dir) if keep else Path(index.root) / f".shards-{os.getpid()}-{int(time.time())}"
        try:
            extract_to_shards(todo, out, extractor, workers, batch_size, threads_per_worker, address)
            added, failed = ingest_shards(index, out, folder_metadata(images_dir), images_dir, warn)
        finally:
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        report.failed += failed
        report.updated = sum(1 for p in todo if p in known and p not in failed)
        report.added = added - report.updated
        index.compact()
    report.seconds = time.perf_counter() - t0
    return report
