"""The search service: a FastAPI app over one index, with a web page at ``/``.

One `Searcher` per app: the model is loaded once, the index's vectors are memory-mapped, and
the derived FAISS index is rebuilt by the store when a write changes the catalog, so searches
go on while images are added or deleted.

Every error is a JSON body ``{"detail": "<one sentence naming the problem>"}`` with a 4xx
status; no client input reaches a 5xx. Files are served by catalog id only: no path from the
client ever reaches the file system. Uploaded images are stored in ``INDEX_DIR/uploads/``
under their SHA-256 and added to the catalog under the index's writer lock.

Extraction (decode + network) is CPU-bound; at most ``workers`` run at once, each with
``threads`` ONNX Runtime threads, and further requests wait their turn in the event loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cbir.images import DEFAULT_MAX_PIXELS, ImageError, Resize, open_image
from cbir.index import Entry, IndexBusy, IndexStoreError, Searcher
from cbir.metadata import MAX_META_BYTES, SHAPE as META_SHAPE, MetaError, displayable_meta, parse_meta

STATIC = Path(__file__).parent / "static"
MAX_K = 100
MAX_FILES = 20
ID_MAX = 2**63 - 1
# Pillow format name -> file suffix for stored uploads. Anything else (EPS, PSD, ICO, ...) is refused.
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
           "WEBP": "webp", "PPM": "ppm"}
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp",
               ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap"}
FORM_SLACK = 64 * 1024  # multipart framing and small fields on top of the file itself
IdParam = Annotated[int, PathParam(ge=1, le=ID_MAX, description="An image's id in the catalog.")]
KQuery = Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")]


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status`` and a one-sentence ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- response models (they document the API in the OpenAPI schema) ------------------------
class ErrorBody(BaseModel):
    detail: str = Field(description="One sentence that names the problem.")


class Result(BaseModel):
    id: int
    name: str = Field(description="File name (for uploads, the name it was uploaded under).")
    score: float = Field(description="Cosine similarity to the query (higher is closer).")
    meta: dict[str, Any] = Field(description="The catalog's metadata for this image, e.g. artist and title.")
    image_url: str
    thumbnail_url: str


class FoundObject(BaseModel):
    box: list[float] = Field(description="x0, y0, x1, y1 in pixels of the query as displayed.")
    polygon: list[list[float]] | None = Field(description="The object's 4 corners when it is tilted or in perspective.")
    score: float = Field(description="The localizer's confidence that this is an object.")
    identified: Result | None = Field(description="The database image this object is, when its best match passes "
                                                  "the index's acceptance threshold; null: not in the collection.")
    results: list[Result]


class SearchResponse(BaseModel):
    results: list[Result] = Field(description="The results of the first (best) object, or of the whole query.")
    objects: list[FoundObject] = Field(default_factory=list, description="Each object found in the query photo "
                                       "(by the server's localizer, or the box drawn) with its own results.")
    localizer: str | None = Field(default=None, description="How the objects were found: a localizer, 'box' for a "
                                  "box drawn by hand, null for a search by an indexed image.")
    k: int
    count: int = Field(description="Images in the index.")
    ms: float = Field(description="Server time for the whole search, in milliseconds.")
    extract_ms: float = Field(description="Of which: decoding the query and running the network.")
    search_ms: float = Field(description="Of which: nearest-neighbour search and catalog look-ups.")


class ImageInfo(BaseModel):
    id: int
    name: str
    meta: dict[str, Any]
    size: int = Field(description="File size in bytes.")
    sha256: str
    width: int | None = Field(None, description="Pixels, after EXIF orientation; null if the file cannot be read now.")
    height: int | None = None
    uploaded: bool = Field(description="Added through this service (stored in the index's uploads folder).")
    image_url: str
    thumbnail_url: str


class AddResponse(BaseModel):
    added: list[ImageInfo] = Field(description="One per uploaded file, in order.")
    existing: list[int] = Field(description="Ids among `added` that were already indexed (same content).")
    count: int


class DeleteResponse(BaseModel):
    deleted: int
    count: int


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    max_files: int
    max_uploads: int = Field(description="Uploads received at once; beyond it, 503 with Retry-After.")
    max_meta_bytes: int = Field(description="Size of an upload's `meta` JSON (a flat object of scalars).")


class Stats(BaseModel):
    count: int
    pipeline: str
    dim: int
    index_type: str = Field(description="The FAISS index type the index was configured with.")
    index_type_resolved: str | None = Field(None, description="What that type resolved to for this index (e.g. for `auto`).")
    segments: int
    read_only: bool
    limits: Limits


class Health(BaseModel):
    status: str
    count: int


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Bad request", 403: "Read-only server", 404: "No such image", 409: "The index is busy or not writable",
            410: "The image's file changed since it was indexed", 413: "Upload or image too large",
            415: "Not an image", 422: "Invalid parameter or unreadable image",
            503: "Too many uploads in flight; retry after the Retry-After seconds"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


# The pixel cap is checked on the header, before decoding, so it also bounds the decode work
# of one image (a tiny PNG can declare a huge, slow-to-inflate bitmap): 50 Mpixel takes a 45 MP
# camera photo and about half the work of Pillow's own bomb threshold (89.5 Mpixel).
DEFAULT_SERVICE_MAX_PIXELS = min(50_000_000, DEFAULT_MAX_PIXELS)
DEFAULT_MAX_UPLOADS = 8  # uploads (search or add) received at once; each holds its body in memory


# -- the pieces ------------------------------------------------------------------------------
@dataclass
class Settings:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_SERVICE_MAX_PIXELS
    workers: int = 2
    read_only: bool = False
    thumbnail_cache: int = 512
    max_uploads: int = DEFAULT_MAX_UPLOADS


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before any parsing, and
    at most ``max_inflight`` requests with a body (uploads) are held at once.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as
    it streams in. The rest of an oversize body is read and dropped (up to a bound), so the
    client sees the 413 instead of a reset connection. Each upload in flight holds up to
    several copies of its body in memory (buffered, parsed, decoded), so beyond
    ``max_inflight`` a request gets a 503 with Retry-After before its body is kept.
    """

    def __init__(self, app, max_bytes: int, max_inflight: int = 8) -> None:
        self.app, self.max_bytes, self.max_inflight = app, max_bytes, max_inflight
        self.inflight = 0  # only touched from the event loop, between awaits: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            await self._drain(receive, None)
            return await _send_json(send, 503, f"this server is already receiving {self.max_inflight} uploads, its "
                                               f"limit (set with `cbir serve --max-uploads`); retry shortly",
                                    [(b"retry-after", b"1")])
        self.inflight += 1
        try:
            return await self._limited(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _limited(self, scope, receive, send):
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return await _send_json(send, 400, "the Content-Length header is not a number")
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, declared)
            return await _send_json(send, 413, self._message(declared))
        chunks, total, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            more = msg.get("more_body", False)
            if total > self.max_bytes:
                if more:
                    total += await self._drain(receive, None)
                return await _send_json(send, 413, self._message(total))
            chunks.append(body)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _drain(self, receive, declared: int | None) -> int:
        """Read and drop the rest of the body, at most 8 times the limit."""
        n, bound = 0, 8 * self.max_bytes
        if declared is not None and declared > bound:
            return 0
        while n <= bound:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            n += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        return n

    def _message(self, n: int) -> str:
        limit = self.max_bytes - FORM_SLACK
        return (f"the upload is {_mb(n)}, over this server's limit of {_mb(limit)} per request "
                f"(set with `cbir serve --max-upload-mb`)")


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 100_000 else f"{n} bytes"


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (pixels of the query image) -> a box; 422 with a sentence otherwise."""
    if text is None or not text.strip():
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise ServiceError(422, f"bbox {text[:80]!r} must be four numbers x0,y0,x1,y1 (pixels) with x1 > x0 and y1 > y0")
    return box  # type: ignore[return-value]


@dataclass
class Upload:
    """An uploaded file that passed the checks: its bytes, format and name."""

    data: bytes
    name: str
    format: str
    width: int
    height: int
    sha256: str


def check_upload(data: bytes, filename: str | None, content_type: str | None, max_bytes: int, max_pixels: int) -> Upload:
    """Size, declared type, sniffed format and pixel count of an upload, checked before any decoding."""
    name = PurePosixPath((filename or "upload").replace("\\", "/")).name[:200] or "upload"
    if len(data) > max_bytes:
        raise ServiceError(413, f"{name} is {_mb(len(data))}, over this server's limit of {_mb(max_bytes)}")
    if not data:
        raise ServiceError(422, f"{name} is empty")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ServiceError(415, f"{name} was sent as {ctype[:60]}; only images are accepted ({_formats()})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            img = Image.open(io.BytesIO(data))  # reads the header only
            fmt, (w, h) = img.format, img.size
    except UnidentifiedImageError:
        raise ServiceError(415, f"{name} is not an image file, or not in a format this server reads ({_formats()})") from None
    except Image.DecompressionBombError as e:
        raise ServiceError(413, f"{name} declares far too many pixels, a decompression bomb refused ({e})") from None
    except Exception as e:  # Pillow raises many kinds on malformed headers
        raise ServiceError(422, f"{name} is a corrupt or truncated image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if fmt not in FORMATS:
        raise ServiceError(415, f"{name} is in {fmt} format; only {_formats()} are accepted")
    if w * h > max_pixels:
        raise ServiceError(413, f"{name} is {w}x{h} = {w * h / 1e6:.1f} Mpixel, over this server's limit of "
                                f"{max_pixels / 1e6:.0f} Mpixel (set with `cbir serve --max-megapixels`)")
    return Upload(data, name, fmt, w, h, hashlib.sha256(data).hexdigest())


def _formats() -> str:
    return "JPEG, PNG, GIF, BMP, TIFF, WebP, PPM"


class ThumbnailCache:
    """A small LRU of encoded JPEG thumbnails, keyed by (id, content hash, size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self._d, self._lock = capacity, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value: bytes) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)


class Service:
    """What the endpoints share: the searcher, the limits, the locks."""

    def __init__(self, searcher: Searcher, settings: Settings) -> None:
        self.searcher, self.settings = searcher, settings
        self.index = searcher.index
        self.uploads = (self.index.root / "uploads").resolve()
        self.write_lock = threading.Lock()
        self.thumbs = ThumbnailCache(settings.thumbnail_cache)
        self._cpu: tuple[object, anyio.CapacityLimiter] | None = None

    @property
    def cpu(self) -> anyio.CapacityLimiter:
        """The limiter of concurrent extractions, made in (and for) the running event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._cpu is None or self._cpu[0] is not loop:
            self._cpu = (loop, anyio.CapacityLimiter(self.settings.workers))
        return self._cpu[1]

    def warm_up(self) -> None:
        """Create the inference session and the FAISS index now, not on the first request."""
        buf = io.BytesIO()
        Image.new("RGB", (96, 64), (128, 128, 128)).save(buf, "PNG")
        self.searcher.search_vector(self.searcher.extractor.extract_one(buf.getvalue()), 1)

    # -- catalog ------------------------------------------------------------------
    def entry(self, image_id: int) -> Entry:
        e = self.index.get(image_id)
        if e is None:
            raise ServiceError(404, f"there is no image with id {image_id} in the index")
        return e

    def is_upload(self, e: Entry) -> bool:
        return Path(e.path).parent == self.uploads

    def name(self, e: Entry) -> str:
        if self.is_upload(e) and isinstance(e.meta.get("filename"), str):
            return e.meta["filename"]
        return Path(e.path).name

    def result(self, image_id: int, path: str, score: float, meta: dict) -> Result:
        meta = displayable_meta(meta)  # a row stored before meta was checked must not break the search
        e = Entry(path, 0, 0, "", meta, image_id)
        return Result(id=image_id, name=self.name(e), score=round(score, 6), meta=meta,
                      image_url=f"/api/images/{image_id}/file", thumbnail_url=f"/api/images/{image_id}/thumbnail")

    def info(self, e: Entry) -> ImageInfo:
        w = h = None
        try:
            f, _ = self.open_file(e)
            with f, Image.open(f) as img:
                w, h = img.size
                if _exif_rotated(img):
                    w, h = h, w
        except Exception:  # not servable now, or not decodable: the size is unknown
            pass
        return ImageInfo(id=e.id, name=self.name(e), meta=displayable_meta(e.meta), size=e.size, sha256=e.sha256, width=w, height=h,
                         uploaded=self.is_upload(e), image_url=f"/api/images/{e.id}/file",
                         thumbnail_url=f"/api/images/{e.id}/thumbnail")

    def allowed_dirs(self) -> list[str]:
        """Where served files may lie: the upload store and the folders `cbir index` read."""
        return [str(self.uploads)] + [os.path.realpath(r) for r in self.index.roots()]

    def open_file(self, e: Entry) -> tuple[io.BufferedReader, os.stat_result]:
        """The entry's file, opened, if it is still what was indexed; else a 404 or 410.

        The path is resolved (symlinks included) and must lie inside the upload store or an
        indexed folder (for an entry under no recorded folder, from an older index: it must
        not be reached through a symlink at all); it must be a regular file; and its size and
        mtime must match the catalog (or, if only the mtime moved, its SHA-256). Whatever is
        served is read from the very descriptor that was checked.
        """
        catalog = os.path.normpath(e.path)
        real = os.path.realpath(catalog)
        homes = [d for d in self.allowed_dirs() if _inside(catalog, d) or _inside(catalog, os.path.realpath(d))]
        inside = any(_inside(real, os.path.realpath(d)) for d in homes) if homes else real == catalog
        if not inside:
            raise ServiceError(404, f"image {e.id}'s file is no longer inside the indexed folder (it leads elsewhere); "
                                    f"re-run `cbir index`")
        try:  # O_NOFOLLOW: the resolved path must not have become a symlink since; O_NONBLOCK: no FIFO hangs
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ServiceError(404, f"image {e.id} is in the catalog but its file is no longer on disk") from None
        except OSError as err:
            raise ServiceError(404, f"image {e.id}'s file cannot be read now ({err.strerror or err})") from None
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ServiceError(404, f"image {e.id}'s file is no longer a regular file; re-run `cbir index`")
            if st.st_size != e.size or (st.st_mtime_ns != e.mtime_ns and _sha256_of(f) != e.sha256):
                raise ServiceError(410, f"image {e.id}'s file has changed since it was indexed; re-run `cbir index`")
        except BaseException:
            f.close()
            raise
        return f, st

    def read_file(self, e: Entry) -> bytes:
        """The bytes of the entry's checked file (see `open_file`)."""
        f, _ = self.open_file(e)
        with f:
            return f.read()

    # -- CPU-bound work, bounded -------------------------------------------------------------
    async def run_cpu(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.cpu)

    def extract(self, source, bbox, what: str) -> np.ndarray:
        try:
            return self.searcher.extractor.extract_one(source, bbox)
        except ImageError as e:
            msg = str(e)
            if msg.startswith("upload: "):
                msg = what + ": " + msg[len("upload: "):]
            elif isinstance(source, (str, Path)):
                msg = f"{what}: " + msg.split(": ", 1)[-1]  # never echo a server path
            status = 413 if ("Mpixel" in msg or "ecompression" in msg) else 422
            raise ServiceError(status, msg) from None

    # -- writing ----------------------------------------------------------------------
    def writable(self) -> None:
        if self.settings.read_only:
            raise ServiceError(403, "this server is read-only (started with --read-only): it does not add or delete images")

    def add(self, uploads: list[Upload], vectors: np.ndarray, meta: dict) -> tuple[list[int], list[int]]:
        """Store the files under uploads/ and add them in one transaction; returns (ids, existing ids)."""
        with self._writing("add to"):
            self.uploads.mkdir(exist_ok=True)
            ids: list[int | None] = []
            new: list[tuple[int, Entry]] = []
            paths: dict[str, int] = {}
            for i, u in enumerate(uploads):
                path = self.uploads / f"{u.sha256}.{FORMATS[u.format]}"
                row = self.index.db.execute("SELECT id FROM images WHERE path = ?", (str(path),)).fetchone()
                if row is not None:
                    ids.append(row[0])
                    continue
                ids.append(None)
                if str(path) in paths:  # the same file twice in one request
                    continue
                paths[str(path)] = i
                if not path.exists():
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_bytes(u.data)
                    os.replace(tmp, path)
                st = path.stat()
                new.append((i, Entry(str(path), st.st_size, st.st_mtime_ns, u.sha256, {**meta, "filename": u.name})))
            existing = [i for i in ids if i is not None]
            if new:
                added = self.index.add([e for _, e in new], vectors[[i for i, _ in new]])
                by_path = {e.path: id_ for (_, e), id_ in zip(new, added)}
                for j, u in enumerate(uploads):
                    if ids[j] is None:
                        ids[j] = by_path[str(self.uploads / f"{u.sha256}.{FORMATS[u.format]}")]
            return [int(i) for i in ids], existing

    def delete(self, image_id: int) -> None:
        """Drop an image. An upload's file goes too; an indexed folder's file stays on disk
        (the service never deletes a user's files) and is recorded as deleted, so that the
        next `cbir index` of its folder leaves it out until the file changes."""
        with self._writing("delete from"):
            e = self.entry(image_id)
            upload = self.is_upload(e)
            self.index.remove(ids=[image_id], keep_out=not upload)
            if upload:
                Path(e.path).unlink(missing_ok=True)

    @contextmanager
    def _writing(self, action: str):
        """Exclusive write access to the index; its failures become 409s that say why."""
        with self.write_lock:
            try:
                with self.index.writer():
                    yield
            except IndexBusy:
                raise ServiceError(409, "another process is writing this index (e.g. `cbir index`); try again when it has finished") from None
            except IndexStoreError as e:
                raise ServiceError(409, f"cannot {action} the index: {e}") from None
            except OSError as e:
                raise ServiceError(409, f"cannot write to the index directory ({e.strerror or e})") from None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _sha256_of(f) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def _stream(f, chunk: int = 1 << 16):
    """The rest of an open file, in chunks; closes it at the end (or when the client leaves)."""
    with f:
        while data := f.read(chunk):
            yield data


def _exif_rotated(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


# -- the app ----------------------------------------------------------------------------------
def create_app(
    index_dir: str | Path | None = None,
    *,
    searcher: Searcher | None = None,
    weights: str | Path | None = None,
    engine: str = "onnx",
    max_upload_mb: float = 20,
    max_megapixels: float = DEFAULT_SERVICE_MAX_PIXELS / 1e6,
    workers: int = 2,
    threads: int | None = None,
    read_only: bool = False,
    max_uploads: int = DEFAULT_MAX_UPLOADS,
    localizer: str | None = None,
) -> FastAPI:
    """The service over ``index_dir`` (or an existing ``searcher``), model loaded and warmed up."""
    if searcher is None:
        if index_dir is None:
            raise ValueError("give index_dir or searcher")
        # ONNX Runtime threads per extraction: share the cores among the concurrent workers.
        searcher = Searcher(index_dir, weights, engine, threads=threads or max(1, (os.cpu_count() or 1) // max(1, workers)),
                            localizer=localizer)
    if max_upload_mb <= 0 or max_megapixels <= 0 or workers < 1 or max_uploads < 1:
        raise ValueError("max_upload_mb and max_megapixels must be positive, workers and max_uploads at least 1")
    settings = Settings(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=int(max_megapixels * 1e6),
                        workers=workers, read_only=read_only, max_uploads=max_uploads)
    svc = Service(searcher, settings)
    svc.warm_up()

    app = FastAPI(
        title="cbir search service",
        version="1",
        description="Content-based image retrieval over one index: search by example image (optionally a box of it), "
                    "more like an indexed image, fetch images and thumbnails by id, add and delete images. "
                    "Every error is `{\"detail\": sentence}` with a 4xx status.",
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + FORM_SLACK, max_inflight=settings.max_uploads)

    # -- errors: always {"detail": sentence} ------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        parts = []
        for e in errs[:3]:
            loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
            where = ".".join(loc) or "request"
            msg = str(e.get("msg", "is invalid"))
            if e.get("type") == "missing":
                parts.append(f"{where} is required")
            else:
                parts.append(f"{where}: {msg[0].lower() + msg[1:] if msg else msg}")
        detail = "; ".join(parts) or "the request is invalid"
        return JSONResponse({"detail": detail[:500]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and exc.detail in (None, "Not Found"):
            detail = f"there is no {request.url.path[:200]} here; the API is under /api (see /docs)"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path[:200]}"
        else:
            detail = str(exc.detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # a bug, never client input
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    # -- the page ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(), headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- API --------------------------------------------------------------------------
    @app.get("/api/health", response_model=Health, tags=["service"], summary="Liveness and index size")
    def health() -> Health:
        return Health(status="ok", count=len(svc.index))

    @app.get("/api/stats", response_model=Stats, tags=["service"], summary="Index statistics and the server's limits")
    def stats() -> Stats:
        s = svc.index.stats()
        resolved = None
        try:  # the engine's derived search structure, where it says what it resolved to
            si = svc.index.search_index() if hasattr(svc.index, "search_index") else None
            resolved = str(si.type) if si is not None and getattr(si, "type", None) is not None else None
        except Exception:
            resolved = None
        return Stats(count=s["count"], pipeline=s["pipeline"], dim=s["dim"], index_type=str(s["index_type"]),
                     index_type_resolved=resolved, segments=s.get("segments", 0), read_only=settings.read_only,
                     limits=Limits(max_upload_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                                   max_k=MAX_K, max_files=MAX_FILES, max_uploads=settings.max_uploads,
                                   max_meta_bytes=MAX_META_BYTES))

    @app.post("/api/search", response_model=SearchResponse, tags=["search"],
              summary="Search by an uploaded image", responses=_errors(413, 415, 422, 503))
    async def search(
        file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, GIF, BMP, TIFF, WebP, PPM).")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="Number of results.")] = 10,
        bbox: Annotated[str | None, Form(description="Optional box on the query, `x0,y0,x1,y1` in pixels of the "
                                                     "image as displayed (EXIF orientation applied).")] = None,
    ) -> SearchResponse:
        box = parse_bbox(bbox)
        up = check_upload(await file.read(settings.max_upload_bytes + 1), file.filename, file.content_type,
                          settings.max_upload_bytes, settings.max_pixels)
        return await svc.run_cpu(_search_objects, svc, up.data, box, k, up.name)

    @app.get("/api/images/{image_id}/similar", response_model=SearchResponse, tags=["search"],
             summary="More like this: search by an indexed image", responses=_errors(404, 413, 422))
    async def similar(
        image_id: IdParam,
        k: KQuery = 10,
        bbox: Annotated[str | None, Query(description="Optional box `x0,y0,x1,y1` in pixels of the indexed image: "
                                                      "search with that region of it.")] = None,
    ) -> SearchResponse:
        box = parse_bbox(bbox)
        if box is None:
            return await anyio.to_thread.run_sync(_similar, svc, image_id, k)
        e = await anyio.to_thread.run_sync(svc.entry, image_id)
        data = await anyio.to_thread.run_sync(svc.read_file, e)
        return await svc.run_cpu(_search, svc, data, box, k, image_id, f"image {image_id}")

    @app.get("/api/images/{image_id}", response_model=ImageInfo, tags=["images"],
             summary="An indexed image's catalog entry", responses=_errors(404))
    def image_info(image_id: IdParam) -> ImageInfo:
        return svc.info(svc.entry(image_id))

    @app.get("/api/images/{image_id}/file", tags=["images"], summary="An indexed image's file",
             response_class=Response, responses={200: {"content": {"image/*": {}}}, **_errors(404, 410)})
    def image_file(image_id: IdParam):
        e = svc.entry(image_id)
        f, st = svc.open_file(e)  # only the checked file, from the descriptor that was checked
        suffix = Path(e.path).suffix.lower()
        return StreamingResponse(_stream(f), media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                                 headers={"Cache-Control": "public, max-age=3600", "ETag": f'"{e.sha256}"',
                                          "Content-Disposition": "inline", "Content-Length": str(st.st_size)})

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], summary="A JPEG thumbnail of an indexed image",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **_errors(404, 410, 422)})
    async def thumbnail(
        image_id: IdParam,
        size: Annotated[int, Query(ge=32, le=1024, description="Longer side in pixels.")] = 256,
    ) -> Response:
        data, etag = await svc.run_cpu(_thumbnail, svc, image_id, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600", "ETag": f'"{etag}-{size}"'})

    @app.post("/api/images", response_model=AddResponse, status_code=201, tags=["images"],
              summary="Add images by upload", responses=_errors(403, 409, 413, 415, 422, 503))
    async def add_images(
        files: Annotated[list[UploadFile], File(description=f"One to {MAX_FILES} images.")],
        meta: Annotated[str | None, Form(description='Optional metadata for these images, e.g. '
                                                     '{"artist": "...", "title": "..."}: ' + META_SHAPE + '.')] = None,
    ) -> AddResponse:
        svc.writable()
        if not files:
            raise ServiceError(422, "files is required: send one or more images")
        if len(files) > MAX_FILES:
            raise ServiceError(422, f"{len(files)} files in one request; at most {MAX_FILES} are accepted")
        extra: dict = {}
        if meta is not None and meta.strip():
            try:  # checked before anything is read or written: a stored bad row would break searches
                extra = parse_meta(meta)
            except MetaError as e:
                raise ServiceError(422, str(e)) from None
            extra.pop("filename", None)
        ups = [check_upload(await f.read(settings.max_upload_bytes + 1), f.filename, f.content_type,
                            settings.max_upload_bytes, settings.max_pixels) for f in files]
        vecs = []
        for u in ups:
            vecs.append(await svc.run_cpu(svc.extract, u.data, None, u.name))
        ids, existing = await anyio.to_thread.run_sync(svc.add, ups, np.stack(vecs), extra)
        infos = await anyio.to_thread.run_sync(lambda: [svc.info(svc.entry(i)) for i in ids])
        return AddResponse(added=infos, existing=existing, count=len(svc.index))

    @app.delete("/api/images/{image_id}", response_model=DeleteResponse, tags=["images"],
                summary="Delete an image from the index", responses=_errors(403, 404, 409),
                description="Removes the image from the catalog and the search. An uploaded image's file is "
                            "deleted too. A file of an indexed folder is left on disk and recorded as deleted: "
                            "later `cbir index` runs over its folder leave it out until the file changes "
                            "(touch it to bring it back).")
    def delete_image(image_id: IdParam) -> DeleteResponse:
        svc.writable()
        svc.delete(image_id)  # its cached thumbnails age out of the LRU: ids are never reused
        return DeleteResponse(deleted=image_id, count=len(svc.index))

    return app


# -- endpoint bodies that run in worker threads ---------------------------------------------
def _search_objects(svc: Service, data: bytes, box, k: int, what: str) -> SearchResponse:
    """Localize the objects of the photo (or take the drawn box), then search each."""
    t0 = time.perf_counter()
    timings: dict = {}
    try:
        found = svc.searcher.search_objects(data, k, box, timings=timings)
    except ImageError as e:
        msg = what + ": " + str(e).split(": ", 1)[-1]
        raise ServiceError(413 if ("Mpixel" in msg or "ecompression" in msg) else 422, msg) from None
    objects = []
    for o in found:
        results = [svc.result(h.id, h.path, h.score, h.meta) for h in o.results]
        j = o.region.to_json()
        objects.append(FoundObject(box=j["box"], polygon=j["polygon"], score=j["score"],
                                   identified=results[0] if o.identified else None, results=results))
    return SearchResponse(results=objects[0].results if objects else [], objects=objects,
                          localizer="box" if box is not None else svc.searcher.localizer.name, k=k,
                          count=len(svc.index), ms=round((time.perf_counter() - t0) * 1000, 2),
                          extract_ms=round(timings.get("localize_ms", 0) + timings.get("extract_ms", 0), 2),
                          search_ms=round(timings.get("search_ms", 0), 2))


def _search(svc: Service, source, box, k: int, exclude: int | None, what: str) -> SearchResponse:
    t0 = time.perf_counter()
    v = svc.extract(source, box, what)
    t1 = time.perf_counter()
    hits = svc.searcher.search_vector(v, k, exclude=exclude)
    t2 = time.perf_counter()
    return SearchResponse(results=[svc.result(h.id, h.path, h.score, h.meta) for h in hits], k=k,
                          count=len(svc.index), ms=round((t2 - t0) * 1000, 2),
                          extract_ms=round((t1 - t0) * 1000, 2), search_ms=round((t2 - t1) * 1000, 2))


def _similar(svc: Service, image_id: int, k: int) -> SearchResponse:
    t0 = time.perf_counter()
    try:
        hits = svc.searcher.search_id(image_id, k)
    except IndexStoreError:
        raise ServiceError(404, f"there is no image with id {image_id} in the index") from None
    ms = round((time.perf_counter() - t0) * 1000, 2)
    return SearchResponse(results=[svc.result(h.id, h.path, h.score, h.meta) for h in hits], k=k,
                          count=len(svc.index), ms=ms, extract_ms=0.0, search_ms=ms)


def _thumbnail(svc: Service, image_id: int, size: int) -> tuple[bytes, str]:
    e = svc.entry(image_id)
    key = (image_id, e.sha256, size)
    data = svc.thumbs.get(key)
    if data is None:
        raw = svc.read_file(e)  # the same checks as the file itself
        try:
            with Image.open(io.BytesIO(raw)) as probe:
                size = min(size, max(probe.size))  # never enlarge
        except Exception:
            pass
        try:
            img = open_image(raw, Resize("long", max(16, size)))
        except ImageError as err:
            raise ServiceError(422, f"image {image_id}'s file cannot be decoded ({str(err).split(': ', 1)[-1]})") from None
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        svc.thumbs.put(key, data)
    return data, e.sha256[:16]
