"""The service's errors: the exceptions routes raise, the one table of their HTTP statuses,
and the handlers that make every error a JSON ``{"detail": "<one sentence>"}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cbir.images import ImageError, TooManyPixels
from cbir.metadata import MetaError


class ServiceError(Exception):
    """A request the service refuses; ``str(e)`` is the one sentence sent back as ``detail``."""


class BadRequest(ServiceError):
    """A request malformed below the API, e.g. in its Content-Length header."""


class ReadOnly(ServiceError):
    """A write to a server started with ``--read-only``."""


class NotFound(ServiceError):
    """No such image, or its file cannot be served now."""


class WriteConflict(ServiceError):
    """The index cannot be written now: another process holds it, or the write failed."""


class FileChanged(ServiceError):
    """An image's file is no longer what was indexed."""


class TooLarge(ServiceError):
    """An upload over the size limit."""


class NotAnImage(ServiceError):
    """An upload that is not an image in a format the service accepts."""


class Invalid(ServiceError):
    """A malformed parameter or upload."""


class Busy(ServiceError):
    """Too many uploads in flight: the client should retry shortly."""


# The one place a refusal gets its status. The first type in an exception's MRO decides, so
# a `TooManyPixels` is a 413 although it is also an `ImageError`.
STATUS: dict[type[Exception], int] = {
    BadRequest: 400, ReadOnly: 403, NotFound: 404, WriteConflict: 409, FileChanged: 410, TooLarge: 413,
    TooManyPixels: 413, NotAnImage: 415, Invalid: 422, ImageError: 422, MetaError: 422, Busy: 503,
}
DESCRIPTIONS = {403: "Read-only server", 404: "No such image", 409: "The index is busy or not writable",
                410: "The image's file changed since it was indexed", 413: "Upload or image too large",
                415: "Not an image", 422: "Invalid parameter or unreadable image",
                503: "Too many uploads in flight; retry after the Retry-After seconds"}


class ErrorBody(BaseModel):
    detail: str = Field(description="One sentence that names the problem.")


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that can answer with these error statuses."""
    return {c: {"model": ErrorBody, "description": DESCRIPTIONS[c]} for c in codes}


def install(app: FastAPI) -> None:
    """Register the handlers: refusals by `STATUS`, and FastAPI's own errors as sentences."""
    for exc_type in STATUS:
        app.add_exception_handler(exc_type, refused)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def status_of(exc: Exception) -> int:
    """A refusal's status: that of the first type in its MRO that `STATUS` names."""
    return next(STATUS[t] for t in type(exc).__mro__ if t in STATUS)


async def refused(request: Request, exc: Exception) -> JSONResponse:
    """A refusal raised by a route: its status by `STATUS`, its message as the detail."""
    return JSONResponse({"detail": str(exc)}, status_code=status_of(exc))


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's errors (at most three) as one sentence: ``k: input should be ...``."""
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")) or "request"
        msg = str(e.get("msg", "is invalid"))
        parts.append(f"{where} is required" if e.get("type") == "missing" else f"{where}: {msg[:1].lower()}{msg[1:]}")
    return JSONResponse({"detail": ("; ".join(parts) or "the request is invalid")[:500]}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's 404 and 405 say what was asked for."""
    if exc.status_code == 404 and exc.detail in (None, "Not Found"):
        detail = f"there is no {request.url.path[:200]} here; the API is under /api (see /docs)"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path[:200]}"
    else:
        detail = str(exc.detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, never client input: no traceback or path goes to the client."""
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
