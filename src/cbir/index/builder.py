"""Build or update an index from a folder of images, and search it.

`update_index` makes the index reflect the folder: new files are extracted and added, changed
files (size or mtime differ and the content hash too) re-extracted, deleted files dropped.
Work is committed in chunks, so a killed run keeps every chunk it committed and the next run
picks up from there. `Searcher` pairs an index with the extractor of its own pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.identify import Calibration, calibrate
from cbir.images import ImageError, list_images, open_image, sha256_file
from cbir.index.store import Entry, Index, IndexExists, IndexStoreError, check_index_dir, json_object
from cbir.localize import Localizer, Region, create_localizer
from cbir.localize.geometry import extraction_source
from cbir.pipeline import DEFAULT_PIPELINE, Extractor, PipelineError, resolve_spec
from cbir.rerank import SHORTLIST, rerank_hits
from cbir.verify import SpatialVerifier, verifier_for


@dataclass
class UpdateReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kept_out: int = 0  # deleted through the service and unchanged since: not indexed again

    def summary(self) -> str:
        s = (f"{self.added} added, {self.updated} re-extracted, {self.removed} removed, "
             f"{self.unchanged} unchanged, {len(self.failed)} skipped as unreadable")
        if self.kept_out:
            s += f", {self.kept_out} left out as deleted through the service"
        return s + f" in {self.seconds:.1f} s"


def open_or_create(index_dir: str | Path, pipeline: str | None = None, weights: str | Path | None = None,
                   engine: str = "onnx", fit_on: Sequence[Path] | None = None,
                   warn: Callable[[str], None] = print) -> tuple[Index, Extractor]:
    """The index at ``index_dir`` with its extractor; a new one is created if none exists.
    For an existing index, ``pipeline`` (if given) must match the index's own."""
    index_dir = Path(index_dir)
    index = Index(index_dir) if (index_dir / "index.json").exists() else None
    spec = resolve_spec(pipeline or (index.pipeline if index else DEFAULT_PIPELINE), weights)
    extractor = Extractor(spec, weights, engine)
    if index is None:
        if extractor.needs_fit:
            if not fit_on:
                raise PipelineError(f"pipeline {spec} has learned steps (PCA): give a separate image set with "
                                    f"--fit-on DIR")
            extractor.fit(list(fit_on), on_error=lambda i, e: warn(f"warning: {e}"))
        try:
            index = Index.create(index_dir, extractor.identity, extractor.output_dim, extractor.post_state())
            return index, extractor
        except IndexExists:  # another run created it while this one loaded the model: use that one
            index = Index(index_dir)
    index.check_identity(extractor.identity)
    extractor.load_post_state(index.post_state())
    return index, extractor


def folder_metadata(images_dir: Path) -> dict[str, dict]:
    """Per-image fields from the nearest ``metadata.json`` (in the folder or up to two levels
    above, as in the benchmark layout), re-keyed by path relative to ``images_dir``."""
    for base in (images_dir, images_dir.parent, images_dir.parent.parent):
        p = base / "metadata.json"
        if not p.exists():
            continue
        data = json_object(p.read_text())
        prefix = images_dir.relative_to(base).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix) and isinstance(v, dict)}
    return {}


def scan_changes(index: Index, images_dir: Path, report: UpdateReport,
                 warn: Callable[[str], None] = print) -> tuple[dict[str, Entry], list[tuple[Path, int, int]]]:
    """Compare the folder with the catalog (call under ``index.writer()``): drop the entries of
    deleted files (one transaction), count the unchanged ones, and return (catalog entries under
    the folder, new files and those whose size or mtime changed as ``(path, size, mtime_ns)``).

    A file that vanished (or a dangling symlink) is skipped with a warning; so is a folder that
    cannot be listed, whose indexed images are kept: not seeing them is not their deletion.
    Files deleted through the service stay out until they change."""
    index.add_root(str(images_dir))
    known = index.entries(under=str(images_dir))
    unreadable: list[OSError] = []
    files = list_images(images_dir, unreadable)
    kept_dirs: list[str] = []  # entries under these, and kept_files, are kept whatever the scan saw
    kept_files: set[str] = set()
    for err in unreadable:
        folder = str(err.filename or images_dir)
        kept_dirs.append(folder.rstrip("/") + "/")
        warn(f"warning: cannot read folder {folder} ({err.strerror or err}); its indexed images are kept")
    stats: dict[str, os.stat_result] = {}
    for p in files:
        try:
            stats[str(p)] = p.stat()
        except FileNotFoundError:
            report.failed.append(str(p))
            warn(f"warning: skipped {p}: no such file (a dangling symlink, or deleted during the scan)")
        except OSError as e:
            report.failed.append(str(p))
            kept_files.add(str(p))  # it is there, only unreadable now: keep its entry
            warn(f"warning: skipped {p}: cannot read ({e.strerror or e})")

    def seen_gone(path: str) -> bool:
        return path not in stats and path not in kept_files and not any(path.startswith(k) for k in kept_dirs)

    gone = [p for p in known if seen_gone(p)]
    if gone:
        report.removed = index.remove(paths=gone)
    tombs = index.tombstones(str(images_dir))
    forget = [p for p in tombs if seen_gone(p)]
    todo = []
    for path, st in stats.items():
        if path in tombs:
            if tombs[path] == (st.st_size, st.st_mtime_ns):
                report.kept_out += 1  # deleted through the service, unchanged since
                continue
            forget.append(path)  # a new version of a deleted file: index it again
        e = known.get(path)
        if e is not None and e.size == st.st_size and e.mtime_ns == st.st_mtime_ns:
            report.unchanged += 1
        else:
            todo.append((Path(path), st.st_size, st.st_mtime_ns))
    if forget:
        index.forget_tombstones(forget)
    return known, todo


def update_index(images_dir: str | Path, index_dir: str | Path, pipeline: str | None = None,
                 weights: str | Path | None = None, engine: str = "onnx", fit_on: Sequence[Path] | None = None,
                 commit_every: int = 64, commit_seconds: float = 15.0, progress: Callable | None = None,
                 warn: Callable[[str], None] = print) -> UpdateReport:
    """Make the index at ``index_dir`` reflect the images under ``images_dir``."""
    t0 = time.perf_counter()
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise ImageError(f"{images_dir}: no such directory")
    check_index_dir(index_dir)
    index, extractor = open_or_create(index_dir, pipeline, weights, engine, fit_on, warn)
    report = UpdateReport()
    with index.writer():
        known, todo = scan_changes(index, images_dir, report, warn)
        meta = folder_metadata(images_dir)

        bar = progress(total=len(todo), desc="indexing", unit="img") if progress and todo else None
        pending: list[tuple[Entry, np.ndarray]] = []
        last_commit = time.monotonic()

        def commit() -> None:
            nonlocal last_commit
            if pending:
                index.add([e for e, _ in pending], np.stack([v for _, v in pending]))
                pending.clear()
            last_commit = time.monotonic()

        def skip(p: Path, e: ImageError) -> None:
            report.failed.append(str(p))
            warn(f"warning: skipped {e}")

        # Touched-but-identical files only need their mtime recorded, not a forward pass.
        extract: list[tuple[Path, int, int, str]] = []  # (path, size, mtime_ns, sha256)
        for p, size, mtime in todo:
            try:
                digest = sha256_file(p)
            except OSError as e:
                skip(p, ImageError(f"{p}: cannot read ({e.strerror})"))
            else:
                old = known.get(str(p))
                if old is None or old.sha256 != digest:
                    extract.append((p, size, mtime, digest))
                    continue
                index.touch(str(p), size, mtime)
                report.unchanged += 1
            if bar:
                bar.update(1)

        paths = [x[0] for x in extract]
        for keys, vecs in extractor.iter_vectors(paths, on_error=lambda j, e: skip(paths[j], e),
                                                 progress=bar.update if bar else None):
            for j, v in zip(keys, vecs):
                p, size, mtime, digest = extract[j]
                rel = p.relative_to(images_dir).as_posix()
                pending.append((Entry(str(p), size, mtime, digest, meta.get(rel, {})), v))
                if str(p) in known:
                    report.updated += 1
                else:
                    report.added += 1
            if len(pending) >= commit_every or time.monotonic() - last_commit > commit_seconds:
                commit()
        commit()
        if bar:
            bar.close()
        index.compact()
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class Hit:
    id: int
    path: str
    score: float
    meta: dict

    def to_json(self) -> dict:
        return {"path": self.path, "score": round(self.score, 6), "id": self.id, "meta": self.meta}


@dataclass
class ObjectHits:
    """One object found in a query photo and what it matched. ``identified``: the path of the
    database image it is, when the top hit's score passes the index's acceptance threshold
    (`cbir.identify`); None: "not in the collection"."""

    region: Region
    results: list[Hit]
    identified: str | None

    def to_json(self) -> dict:
        return {**self.region.to_json(), "identified": self.identified, "results": [h.to_json() for h in self.results]}


def calibrate_index(index: Index, extractor: Extractor, warn: Callable[[str], None] = print) -> Calibration:
    """Calibrate the acceptance threshold on edits of the index's own images (not stored)."""
    entries = [e for e in index.entries().values() if Path(e.path).is_file()]
    pos = {e.id: n for n, e in enumerate(entries)}

    def top2(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = index.search(q, 2)
        return scores, np.vectorize(lambda i: pos.get(int(i), -1))(ids)

    return calibrate(lambda imgs: extractor.extract(imgs), [e.path for e in entries], top2, warn=warn)


class Searcher:
    """An index and the extractor of its own pipeline: images in, ranked hits out. ``localizer``:
    how `search_objects` finds the objects of a photo; default the index's own, else ``whole``."""

    def __init__(self, index_dir: str | Path, weights: str | Path | None = None, engine: str = "onnx",
                 pipeline: str | None = None, threads: int | None = None, localizer: str | None = None) -> None:
        self.index = Index(index_dir)
        spec = resolve_spec(pipeline or self.index.pipeline, weights)
        # Queries come one at a time: one inference worker, so that the engine's threads are
        # all the machine's cores (see Extractor.engine_threads), not a share of them.
        self.extractor = Extractor(spec, weights, engine, threads=threads, infer_workers=1)
        self.index.check_identity(self.extractor.identity)
        self.extractor.load_post_state(self.index.post_state())
        self.localizer: Localizer = create_localizer(localizer or self.index.info.get("localizer"))
        # An ``SV<k>`` step re-orders each query's top k by spatial verification (cbir.verify).
        self.verifier: SpatialVerifier | None = verifier_for(self.extractor.rerankers)
        self._calibration: Calibration | None = None

    @property
    def calibration(self) -> Calibration:
        """The index's stored acceptance threshold; calibrated now (in memory) if it has none."""
        if self._calibration is None:
            stored = self.index.info.get("identify")
            if stored:
                self._calibration = Calibration.from_json(stored)
            elif len(self.index) < 3:  # too few images to calibrate on: name every top-1
                self._calibration = Calibration(-1.0, 0, 1.0, 0.0, float("nan"), float("nan"))
            else:
                self._calibration = calibrate_index(self.index, self.extractor, warn=lambda m: None)
        return self._calibration

    def search_vector(self, vector: np.ndarray, k: int = 10, exclude: int | None = None) -> list[Hit]:
        n = k + (exclude is not None)
        steps = getattr(self.extractor, "rerankers", None)
        scores, ids = self.index.search(vector[None], max(n, SHORTLIST) if steps else n)
        if steps:  # re-rank the shortlist with the stored vectors (cbir.rerank)
            scores, ids = rerank_hits(self.index, vector, ids[0], steps)
        hits = []
        for s, i in zip(scores[0], ids[0]):
            if i < 0 or i == exclude:
                continue
            e = self.index.get(int(i))
            if e is not None:
                hits.append(Hit(int(i), e.path, float(s), e.meta))
        return hits[:k]

    def verified(self, query: Image.Image, hits: list[Hit], k: int) -> list[Hit]:
        """``hits`` (a shortlist, best first) with the top ones re-ordered by spatial verification
        against the query image, when the pipeline has an ``SV`` step; the first ``k``."""
        if self.verifier is None or len(hits) < 2:
            return hits[:k]
        scores = self.verifier.rerank(query, np.array([h.score for h in hits], np.float32), lambda i: hits[i].path)
        order = np.argsort(-scores, kind="stable")[:k]
        return [replace(hits[i], score=float(scores[i])) for i in order]

    def _shortlist(self, k: int) -> int:
        return max(k, self.verifier.k) if self.verifier is not None else k

    def search(self, source: str | Path | bytes, k: int = 10, bbox: Sequence[float] | None = None) -> list[Hit]:
        """Top-``k`` hits for a query image (path or encoded bytes), optionally cropped to ``bbox``."""
        hits = self.search_vector(self.extractor.extract_one(source, bbox), self._shortlist(k))
        if self.verifier is None or len(hits) < 2:
            return hits[:k]
        return self.verified(open_image(source, bbox=None if bbox is None else tuple(bbox)), hits, k)

    def search_objects(self, source: str | Path | bytes, k: int = 10, bbox: Sequence[float] | None = None,
                       localizer: Localizer | None = None, timings: dict | None = None) -> list[ObjectHits]:
        """Find the objects of a photo (the localizer; or the one hand-drawn ``bbox``), then
        search each: one `ObjectHits` per object, best localized first. ``timings``, if given,
        receives ``localize_ms``, ``extract_ms`` and ``search_ms``."""
        t0 = time.perf_counter()
        image = open_image(source)
        if bbox is not None:
            w, h = image.size
            x0, y0, x1, y1 = (float(v) for v in bbox)
            if min(float(w), x1) - max(0.0, x0) < 2 or min(float(h), y1) - max(0.0, y0) < 2:
                name = "upload" if isinstance(source, bytes) else str(source)
                raise ImageError(f"{name}: box {list(bbox)} is empty inside the {w}x{h} image")
            regions = [Region((max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)), 1.0)]
        else:
            regions = (localizer or self.localizer)(image)
        t1 = time.perf_counter()
        threshold = self.calibration.threshold if regions else 0.0
        sources = [extraction_source(source, image, r) for r in regions]
        vecs = self.extractor.extract(sources) if regions else []
        t2 = time.perf_counter()
        out = []
        for r, v, src in zip(regions, vecs, sources):
            hits = self.search_vector(v, self._shortlist(k)) if not np.isnan(v[0]) else []
            hits = self.verified(src if isinstance(src, Image.Image) else image, hits, k)
            named = hits[0].path if hits and hits[0].score >= threshold else None
            out.append(ObjectHits(r, hits, named))
        if timings is not None:
            timings.update(localize_ms=1000 * (t1 - t0), extract_ms=1000 * (t2 - t1),
                           search_ms=1000 * (time.perf_counter() - t2))
        return out

    def search_id(self, image_id: int, k: int = 10) -> list[Hit]:
        """"More like this": the hits for an indexed image, itself excluded."""
        try:
            v = self.index.vector(image_id)
        except KeyError:
            raise IndexStoreError(f"no image with id {image_id} in the index") from None
        return self.search_vector(v, k, exclude=image_id)
