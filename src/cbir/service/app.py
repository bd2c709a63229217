"""The search service: a FastAPI app over one index, with a web page at ``/``; what it serves,
its limits and its errors are in docs/service.md.

The pieces: `routes` (three routers), `state` (the `Service` they share, by dependency),
`errors` (the exceptions they raise and the one table of statuses), `uploads` (body, file and
box checks) and `schemas` (the response bodies).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from cbir.index import Index, Searcher
from cbir.service import errors
from cbir.service.routes import STATIC, image_routes, search_routes, service_routes
from cbir.service.state import DEFAULT_SERVICE_MAX_PIXELS, Service
from cbir.service.uploads import FORM_SLACK, BodyLimit


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
    max_uploads: int = 8,  # uploads (search or add) received at once; each holds its body in memory
    localizer: str | None = None,
    rerank: str | None = None,  # re-ranking steps after the index's pipeline, e.g. "SV50"
) -> FastAPI:
    """The service over ``index_dir`` (or an existing ``searcher``), model loaded and warmed up."""
    if max_upload_mb <= 0 or max_megapixels <= 0 or workers < 1 or max_uploads < 1:
        raise ValueError("max_upload_mb and max_megapixels must be positive, workers and max_uploads at least 1")
    if searcher is None:
        if index_dir is None:
            raise ValueError("give index_dir or searcher")
        # ONNX Runtime threads per extraction: share the cores among the concurrent workers.
        pipeline = f"{Index(index_dir).pipeline},{rerank}" if rerank else None
        searcher = Searcher(index_dir, weights, engine, threads=threads or max(1, (os.cpu_count() or 1) // workers),
                            localizer=localizer, pipeline=pipeline)
    svc = Service(searcher, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=int(max_megapixels * 1e6),
                  workers=workers, read_only=read_only, max_uploads=max_uploads)
    svc.warm_up()

    app = FastAPI(title="cbir search service", version="1",
                  description="Content-based image retrieval over one index: search by example image (optionally a "
                              "box of it), more like an indexed image, fetch images and thumbnails by id, add and "
                              "delete images. Every error is `{\"detail\": sentence}` with a 4xx status.")
    app.state.service = svc  # what `cbir.service.state.get_service` hands the routes
    app.add_middleware(BodyLimit, max_bytes=svc.max_upload_bytes + FORM_SLACK, max_inflight=svc.max_uploads)
    errors.install(app)
    for router in (service_routes, search_routes, image_routes):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")  # added last, so outermost: BodyLimit's own answers get the header too
    async def nosniff(request: Request, call_next) -> Response:
        """Every response is what its Content-Type says: browsers must not sniff it."""
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return app
