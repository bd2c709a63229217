"""What the routes share: the `Service` (searcher, limits, locks, thumbnail cache), reached
through the `get_service` dependency; and the checks that make a catalog entry's file safe to serve."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, Request, UploadFile
from PIL import Image

from cbir.demo import jpeg
from cbir.fileio import atomic_write_bytes
from cbir.images import DEFAULT_MAX_PIXELS, ImageError, Resize, open_image
from cbir.index import Entry, Hit, IndexBusy, IndexStoreError, Searcher
from cbir.metadata import displayable_meta
from cbir.service.errors import FileChanged, Invalid, NotFound, ReadOnly, WriteConflict
from cbir.service.schemas import ImageInfo, Result
from cbir.service.uploads import FORMATS, Upload, check_upload

# Checked on the header, before decoding, the pixel cap also bounds an image's decode work (docs/service.md):
# 50 Mpixel takes a 45 MP camera photo and about half the work of Pillow's own bomb threshold (89.5 Mpixel).
DEFAULT_SERVICE_MAX_PIXELS = min(50_000_000, DEFAULT_MAX_PIXELS)


@dataclass(eq=False)  # hashed by identity
class Service:
    """What the endpoints share: the searcher, the limits, the locks."""

    searcher: Searcher
    max_upload_bytes: int
    max_pixels: int
    workers: int
    read_only: bool
    max_uploads: int

    def __post_init__(self) -> None:
        self.index = self.searcher.index
        self.uploads = (self.index.root / "uploads").resolve()
        self.write_lock = threading.Lock()
        self._thumbnails = functools.lru_cache(512)(self._render_thumbnail)
        self._cpu: tuple[object, anyio.CapacityLimiter] | None = None

    def warm_up(self) -> None:
        """Create the inference session, the FAISS index, the localizer's model and the acceptance
        threshold (a calibration, if the index stores none, takes seconds) now, not on the first request."""
        img = Image.new("RGB", (96, 64), (128, 128, 128))
        self.searcher.search_vector(self.searcher.extractor.extract_one(jpeg(img)), 1)
        self.searcher.localizer(img)
        if len(self.index) >= 3:
            self.searcher.calibration  # noqa: B018

    # -- catalog ------------------------------------------------------------------
    def entry(self, image_id: int) -> Entry:
        if (e := self.index.get(image_id)) is None:
            raise no_such_image(image_id)
        return e

    def is_upload(self, path: str) -> bool:
        return Path(path).parent == self.uploads

    def name(self, path: str, meta: dict) -> str:
        if self.is_upload(path) and isinstance(meta.get("filename"), str):
            return meta["filename"]
        return Path(path).name

    def results(self, hits: list[Hit]) -> list[Result]:
        """Search hits as the API shows them."""
        out = []
        for h in hits:
            meta = displayable_meta(h.meta)  # a row stored before meta was checked must not break the search
            out.append(Result(id=h.id, name=self.name(h.path, meta), score=round(h.score, 6), meta=meta, **urls(h.id)))
        return out

    def info(self, image_id: int) -> ImageInfo:
        e = self.entry(image_id)
        w = h = None
        with contextlib.suppress(Exception):  # not servable now, or not decodable: the size is unknown
            f, _ = self.open_file(e)
            with f, Image.open(f) as img:
                w, h = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn
                    w, h = h, w
        return ImageInfo(id=e.id, name=self.name(e.path, e.meta), meta=displayable_meta(e.meta), size=e.size, sha256=e.sha256,
                         width=w, height=h, uploaded=self.is_upload(e.path), **urls(e.id))

    def open_file(self, e: Entry) -> tuple[io.BufferedReader, os.stat_result]:
        """The entry's file, opened, if it is still what was indexed (the checks of docs/service.md,
        "What is served"); else a 404 or 410. An entry under no recorded folder (an older index)
        must not be reached through a symlink at all."""
        catalog = os.path.normpath(e.path)
        real = os.path.realpath(catalog)
        allowed = [str(self.uploads)] + [os.path.realpath(r) for r in self.index.roots()]
        homes = [d for d in allowed if _inside(catalog, d) or _inside(catalog, os.path.realpath(d))]
        inside = any(_inside(real, os.path.realpath(d)) for d in homes) if homes else real == catalog
        if not inside:
            raise NotFound(f"image {e.id}'s file is no longer inside the indexed folder (it leads elsewhere); "
                           f"re-run `cbir index`")
        try:  # O_NOFOLLOW: the resolved path must not have become a symlink since; O_NONBLOCK: no FIFO hangs
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFound(f"image {e.id} is in the catalog but its file is no longer on disk") from None
        except OSError as err:
            raise NotFound(f"image {e.id}'s file cannot be read now ({err.strerror or err})") from None
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"image {e.id}'s file is no longer a regular file; re-run `cbir index`")
            if st.st_size != e.size or (st.st_mtime_ns != e.mtime_ns
                                        and hashlib.file_digest(f, "sha256").hexdigest() != e.sha256):
                raise FileChanged(f"image {e.id}'s file has changed since it was indexed; re-run `cbir index`")
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f, st

    def read_file(self, image_id: int) -> bytes:
        """The bytes of the image's checked file (see `open_file`)."""
        f, _ = self.open_file(self.entry(image_id))
        with f:
            return f.read()

    def thumbnail(self, image_id: int, size: int) -> tuple[bytes, str]:
        """A JPEG thumbnail of the image and the SHA-256 it shows, from an LRU keyed by (id, content, size)."""
        sha256 = self.entry(image_id).sha256
        return self._thumbnails(image_id, sha256, size), sha256

    def _render_thumbnail(self, image_id: int, sha256: str, size: int) -> bytes:
        """A JPEG of the image's checked file, its longer side ``size`` (never enlarged)."""
        raw = self.read_file(image_id)  # the same checks as the file itself
        with contextlib.suppress(Exception), Image.open(io.BytesIO(raw)) as probe:
            size = min(size, max(probe.size))
        try:
            img = open_image(raw, Resize("long", max(16, size)))
        except ImageError as err:  # any reason, too many pixels included: the server's file cannot be shown
            raise Invalid(f"image {image_id}'s file cannot be decoded ({str(err).split(': ', 1)[-1]})") from None
        return jpeg(img, 85)

    # -- uploads, and CPU-bound work bounded ---------------------------------------------------
    async def receive(self, file: UploadFile) -> Upload:
        """An uploaded file, read (one byte over the limit tells it is over) and checked."""
        return check_upload(await file.read(self.max_upload_bytes + 1), file.filename, file.content_type,
                            self.max_upload_bytes, self.max_pixels)

    async def run_cpu(self, fn, *args):
        """``fn(*args)`` in a worker thread, at most ``workers`` at once (the limiter is made in, and
        for, the running event loop)."""
        loop = asyncio.get_running_loop()
        if self._cpu is None or self._cpu[0] is not loop:
            self._cpu = (loop, anyio.CapacityLimiter(self.workers))
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._cpu[1])

    def extract(self, data: bytes, bbox, what: str) -> np.ndarray:
        """The descriptor of an image (or of ``bbox`` of it); an unusable image's error names it ``what``."""
        with named_as(what):
            return self.searcher.extractor.extract_one(data, bbox)

    # -- writing ----------------------------------------------------------------------
    def writable(self) -> None:
        if self.read_only:
            raise ReadOnly("this server is read-only (started with --read-only): it does not add or delete images")

    def add(self, uploads: list[Upload], vectors: np.ndarray, meta: dict) -> tuple[list[int], list[int]]:
        """Store the files under uploads/ and add them in one transaction; returns (ids, existing ids)."""
        with self._writing("add to"):
            self.uploads.mkdir(exist_ok=True)
            paths = [str(self.uploads / f"{u.sha256}.{FORMATS[u.format]}") for u in uploads]
            ids = {p: self.index.id_of(p) for p in paths}
            existing = [ids[p] for p in paths if ids[p] is not None]
            new = [p for p in dict.fromkeys(paths) if ids[p] is None]  # the same file twice is added once
            if new:
                first = [paths.index(p) for p in new]
                entries = [self._stored(uploads[i], p, meta) for p, i in zip(new, first)]
                ids.update(zip(new, self.index.add(entries, vectors[first])))
            return [int(ids[p]) for p in paths], existing

    def _stored(self, u: Upload, path: str, meta: dict) -> Entry:
        """The upload's file in the store (written unless it is there already), as a catalog entry."""
        if not os.path.exists(path):
            atomic_write_bytes(path, u.data)
        st = os.stat(path)
        return Entry(path, st.st_size, st.st_mtime_ns, u.sha256, {**meta, "filename": u.name})

    def delete(self, image_id: int) -> None:
        """Drop an image: an upload's file too; an indexed folder's file stays on disk, recorded
        as deleted (docs/service.md)."""
        with self._writing("delete from"):
            e = self.entry(image_id)
            upload = self.is_upload(e.path)
            self.index.remove(ids=[image_id], keep_out=not upload)
            if upload:
                Path(e.path).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self, action: str):
        """Exclusive write access to the index; its failures become 409s that say why."""
        with self.write_lock:
            try:
                with self.index.writer():
                    yield
            except IndexBusy:
                raise WriteConflict("another process is writing this index (e.g. `cbir index`); try again when it has finished") from None
            except IndexStoreError as e:
                raise WriteConflict(f"cannot {action} the index: {e}") from None
            except OSError as e:
                raise WriteConflict(f"cannot write to the index directory ({e.strerror or e})") from None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def urls(image_id: int) -> dict[str, str]:
    return {"image_url": f"/api/images/{image_id}/file", "thumbnail_url": f"/api/images/{image_id}/thumbnail"}


def no_such_image(image_id: int) -> NotFound:
    return NotFound(f"there is no image with id {image_id} in the index")


@contextlib.contextmanager
def named_as(what: str) -> Iterator[None]:
    """An `ImageError` raised inside names the image ``what`` (e.g. the upload's file name), not
    the reader's "upload" or a server path; it keeps its type, which decides the status."""
    try:
        yield
    except ImageError as e:
        raise type(e)(f"{what}: " + str(e).split(": ", 1)[-1]) from None


async def get_service(request: Request) -> Service:
    """The app's `Service` (async: FastAPI then calls it in the event loop, not a worker thread)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
