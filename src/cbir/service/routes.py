"""The routes, in three routers: `search_routes` (by upload; more like an indexed image),
`image_routes` (an image's entry, file and thumbnail; add, delete) and `service_routes` (health,
stats, the page). Refusals are exceptions of `cbir.service.errors`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, File, Form, Path as PathParam, Query, UploadFile
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from cbir.index import IndexStoreError
from cbir.metadata import MAX_META_BYTES, SHAPE as META_SHAPE, parse_meta
from cbir.service.errors import Invalid, responses
from cbir.service.schemas import (AddResponse, DeleteResponse, FoundObject, Health, ImageInfo, Limits,
                                  SearchResponse, Stats)
from cbir.service.state import Service, ServiceDep, named_as, no_such_image
from cbir.service.uploads import parse_bbox

STATIC = Path(__file__).parent / "static"
MAX_K = 100
MAX_FILES = 20
ID_MAX = 2**63 - 1
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp",
               ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap"}
CACHED = {"Cache-Control": "public, max-age=3600"}  # files and thumbnails: ids are never reused
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'")
IdParam = Annotated[int, PathParam(ge=1, le=ID_MAX, description="An image's id in the catalog.")]

service_routes = APIRouter(tags=["service"])
search_routes = APIRouter(tags=["search"])
image_routes = APIRouter(tags=["images"])


@service_routes.get("/", include_in_schema=False)
def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(),
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


@service_routes.get("/api/health", response_model=Health, summary="Liveness and index size")
def health(svc: ServiceDep) -> Health:
    return Health(status="ok", count=len(svc.index))


@service_routes.get("/api/stats", response_model=Stats, summary="Index statistics and the server's limits")
def stats(svc: ServiceDep) -> Stats:
    s = svc.index.stats()
    try:  # what the type resolved to; stats must answer even when the search structure cannot be built
        resolved = str(svc.index.search_index().type)
    except Exception:
        resolved = None
    return Stats(count=s["count"], pipeline=s["pipeline"], dim=s["dim"], index_type=str(s["index_type"]),
                 index_type_resolved=resolved, segments=s.get("segments", 0),
                 read_only=svc.read_only,
                 limits=Limits(max_upload_bytes=svc.max_upload_bytes, max_pixels=svc.max_pixels, max_k=MAX_K,
                               max_files=MAX_FILES, max_uploads=svc.max_uploads, max_meta_bytes=MAX_META_BYTES))


@search_routes.post("/api/search", response_model=SearchResponse, summary="Search by an uploaded image",
                    responses=responses(413, 415, 422, 503))
async def search(
    svc: ServiceDep,
    file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, GIF, BMP, TIFF, WebP, PPM).")],
    k: Annotated[int, Form(ge=1, le=MAX_K, description="Number of results.")] = 10,
    bbox: Annotated[str | None, Form(description="Optional box on the query, `x0,y0,x1,y1` in pixels of the "
                                                 "image as displayed (EXIF orientation applied).")] = None,
) -> SearchResponse:
    box = parse_bbox(bbox)
    up = await svc.receive(file)
    return await svc.run_cpu(_search_objects, svc, up.data, box, k, up.name)


@search_routes.get("/api/images/{image_id}/similar", response_model=SearchResponse,
                   summary="More like this: search by an indexed image", responses=responses(404, 413, 422))
async def similar(
    svc: ServiceDep,
    image_id: IdParam,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")] = 10,
    bbox: Annotated[str | None, Query(description="Optional box `x0,y0,x1,y1` in pixels of the indexed image: "
                                                  "search with that region of it.")] = None,
) -> SearchResponse:
    box = parse_bbox(bbox)
    if box is None:
        return await anyio.to_thread.run_sync(_similar, svc, image_id, k, None)
    data = await anyio.to_thread.run_sync(svc.read_file, image_id)
    return await svc.run_cpu(_similar, svc, image_id, k, box, data)


@image_routes.get("/api/images/{image_id}", response_model=ImageInfo, summary="An indexed image's catalog entry",
                  responses=responses(404))
def image_info(svc: ServiceDep, image_id: IdParam) -> ImageInfo:
    return svc.info(image_id)


@image_routes.get("/api/images/{image_id}/file", summary="An indexed image's file", response_class=Response,
                  responses={200: {"content": {"image/*": {}}}, **responses(404, 410)})
def image_file(svc: ServiceDep, image_id: IdParam):
    e = svc.entry(image_id)
    f, st = svc.open_file(e)  # only the checked file, from the descriptor that was checked
    return StreamingResponse(_stream(f), media_type=MEDIA_TYPES.get(Path(e.path).suffix.lower(), "application/octet-stream"),
                             headers={**CACHED, "ETag": f'"{e.sha256}"', "Content-Disposition": "inline",
                                      "Content-Length": str(st.st_size)})


@image_routes.get("/api/images/{image_id}/thumbnail", summary="A JPEG thumbnail of an indexed image",
                  response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **responses(404, 410, 422)})
async def thumbnail(
    svc: ServiceDep,
    image_id: IdParam,
    size: Annotated[int, Query(ge=32, le=1024, description="Longer side in pixels.")] = 256,
) -> Response:
    data, sha256 = await svc.run_cpu(svc.thumbnail, image_id, size)
    return Response(data, media_type="image/jpeg", headers={**CACHED, "ETag": f'"{sha256[:16]}-{size}"'})


@image_routes.post("/api/images", response_model=AddResponse, status_code=201, summary="Add images by upload",
                   responses=responses(403, 409, 413, 415, 422, 503))
async def add_images(
    svc: ServiceDep,
    files: Annotated[list[UploadFile], File(description=f"One to {MAX_FILES} images.")],
    meta: Annotated[str | None, Form(description='Optional metadata for these images, e.g. '
                                                 '{"artist": "...", "title": "..."}: ' + META_SHAPE + '.')] = None,
) -> AddResponse:
    svc.writable()
    if not files:  # FastAPI refuses a request without files before this; kept in case it lets one by
        raise Invalid("files is required: send one or more images")
    if len(files) > MAX_FILES:
        raise Invalid(f"{len(files)} files in one request; at most {MAX_FILES} are accepted")
    # Checked before anything is read or written: a stored bad row would break searches.
    extra = parse_meta(meta) if meta is not None and meta.strip() else {}
    extra.pop("filename", None)
    ups = [await svc.receive(f) for f in files]
    vecs = [await svc.run_cpu(svc.extract, u.data, None, u.name) for u in ups]
    ids, existing = await anyio.to_thread.run_sync(svc.add, ups, np.stack(vecs), extra)
    infos = await anyio.to_thread.run_sync(lambda: [svc.info(i) for i in ids])
    return AddResponse(added=infos, existing=existing, count=len(svc.index))


@image_routes.delete("/api/images/{image_id}", response_model=DeleteResponse, summary="Delete an image from the index",
                     responses=responses(403, 404, 409),
                     description="Removes the image from the catalog and the search. An uploaded image's file is "
                                 "deleted too. A file of an indexed folder is left on disk and recorded as deleted: "
                                 "later `cbir index` runs over its folder leave it out until the file changes "
                                 "(touch it to bring it back).")
def delete_image(svc: ServiceDep, image_id: IdParam) -> DeleteResponse:
    svc.writable()
    svc.delete(image_id)  # its cached thumbnails age out of the LRU: ids are never reused
    return DeleteResponse(deleted=image_id, count=len(svc.index))


# -- endpoint bodies that run in worker threads --------------------------------------------------
def _search_objects(svc: Service, data: bytes, box, k: int, what: str) -> SearchResponse:
    """Localize the objects of the photo (or take the drawn box), then search each."""
    t0 = time.perf_counter()
    timings: dict = {}
    with named_as(what):
        found = svc.searcher.search_objects(data, k, box, timings=timings)
    objects = []
    for o in found:
        results = svc.results(o.results)
        objects.append(FoundObject(**o.region.to_json(), identified=results[0] if o.identified else None,
                                   results=results))
    return SearchResponse(results=objects[0].results if objects else [], objects=objects,
                          localizer="box" if box is not None else svc.searcher.localizer.name, k=k,
                          count=len(svc.index), ms=round((time.perf_counter() - t0) * 1000, 2),
                          extract_ms=round(timings.get("localize_ms", 0) + timings.get("extract_ms", 0), 2),
                          search_ms=round(timings.get("search_ms", 0), 2))


def _similar(svc: Service, image_id: int, k: int, box, data: bytes | None = None) -> SearchResponse:
    """More like an indexed image: by its stored vector, or with ``box``, by that region of its ``data``."""
    t0 = t1 = time.perf_counter()
    if box is None:
        try:
            hits = svc.searcher.search_id(image_id, k)
        except IndexStoreError:
            raise no_such_image(image_id) from None
    else:
        v = svc.extract(data, box, f"image {image_id}")
        t1 = time.perf_counter()
        hits = svc.searcher.search_vector(v, k, exclude=image_id)
    t2 = time.perf_counter()
    return SearchResponse(results=svc.results(hits), k=k, count=len(svc.index), ms=round((t2 - t0) * 1000, 2),
                          extract_ms=round((t1 - t0) * 1000, 2), search_ms=round((t2 - t1) * 1000, 2))


def _stream(f, chunk: int = 1 << 16):
    """The rest of an open file, in chunks; closes it at the end (or when the client leaves)."""
    with f:
        while data := f.read(chunk):
            yield data
