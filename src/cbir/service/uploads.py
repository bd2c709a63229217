"""What clients send, checked before any real work: the request body's size and the number of
uploads in flight (an ASGI middleware), each uploaded file's type and pixel count (from its
header, before decoding), and a query box."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError
from starlette.responses import JSONResponse

from cbir.images import TooManyPixels, parse_box
from cbir.service.errors import BadRequest, Busy, Invalid, NotAnImage, ServiceError, TooLarge, status_of

# Pillow format name -> file suffix for stored uploads. Anything else (EPS, PSD, ICO, ...) is refused.
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
           "WEBP": "webp", "PPM": "ppm"}
ACCEPTED = "JPEG, PNG, GIF, BMP, TIFF, WebP, PPM"
FORM_SLACK = 64 * 1024  # multipart framing and small fields on top of the file itself


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before any parsing (a declared
    Content-Length at once, a chunked body as it streams in; the rest is read and dropped, up to a
    bound, so that the client sees the 413, not a reset connection). An upload in flight holds
    several copies of its body (buffered, parsed, decoded): beyond ``max_inflight``, a 503."""

    def __init__(self, app, max_bytes: int, max_inflight: int) -> None:
        self.app, self.max_bytes, self.max_inflight = app, max_bytes, max_inflight
        self.inflight = 0  # only touched from the event loop, between awaits: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            await self._drain(receive, None)
            busy = Busy(f"this server is already receiving {self.max_inflight} uploads, its limit "
                        f"(set with `cbir serve --max-uploads`); retry shortly")
            return await _refusal(busy, {"retry-after": "1"})(scope, receive, send)
        self.inflight += 1
        try:
            return await self._limited(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _limited(self, scope, receive, send):
        declared = dict(scope.get("headers", [])).get(b"content-length")
        try:
            declared = None if declared is None else int(declared)
        except ValueError:
            return await _refusal(BadRequest("the Content-Length header is not a number"))(scope, receive, send)
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, declared)
            return await _refusal(self._too_large(declared))(scope, receive, send)
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
                return await _refusal(self._too_large(total))(scope, receive, send)
            chunks.append(body)
        buffered = iter([{"type": "http.request", "body": b"".join(chunks), "more_body": False}])

        async def replay():  # the whole body once, then what the server sends (a disconnect)
            return next(buffered, None) or await receive()

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

    def _too_large(self, n: int) -> TooLarge:
        return TooLarge(f"the upload is {_mb(n)}, over this server's limit of {_mb(self.max_bytes - FORM_SLACK)} "
                        f"per request (set with `cbir serve --max-upload-mb`)")


def _refusal(exc: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal as the exception handlers send it (this middleware runs outside them); it closes the connection."""
    return JSONResponse({"detail": str(exc)}, status_of(exc), {"connection": "close", **(headers or {})})


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 100_000 else f"{n} bytes"


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (pixels of the query image) -> a box; `Invalid` with a sentence otherwise."""
    if text is None or not text.strip():
        return None
    try:
        return parse_box(text)
    except ValueError:
        raise Invalid(f"bbox {text[:80]!r} must be four numbers x0,y0,x1,y1 (pixels) with x1 > x0 and y1 > y0") from None


@dataclass
class Upload:
    """An uploaded file that passed the checks: its bytes, format and name."""

    data: bytes
    name: str
    format: str
    sha256: str


def check_upload(data: bytes, filename: str | None, content_type: str | None, max_bytes: int, max_pixels: int) -> Upload:
    """Size, declared type, sniffed format and pixel count of an upload, checked before any decoding."""
    name = PurePosixPath((filename or "upload").replace("\\", "/")).name[:200] or "upload"
    if len(data) > max_bytes:
        raise TooLarge(f"{name} is {_mb(len(data))}, over this server's limit of {_mb(max_bytes)}")
    if not data:
        raise Invalid(f"{name} is empty")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise NotAnImage(f"{name} was sent as {ctype[:60]}; only images are accepted ({ACCEPTED})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            img = Image.open(io.BytesIO(data))  # reads the header only
            fmt, (w, h) = img.format, img.size
    except UnidentifiedImageError:
        raise NotAnImage(f"{name} is not an image file, or not in a format this server reads ({ACCEPTED})") from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{name} declares far too many pixels, a decompression bomb refused ({e})") from None
    except Exception as e:  # Pillow raises many kinds on malformed headers
        raise Invalid(f"{name} is a corrupt or truncated image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if fmt not in FORMATS:
        raise NotAnImage(f"{name} is in {fmt} format; only {ACCEPTED} are accepted")
    if w * h > max_pixels:
        raise TooManyPixels(f"{name} is {w}x{h} = {w * h / 1e6:.1f} Mpixel, over this server's limit of "
                            f"{max_pixels / 1e6:.0f} Mpixel (set with `cbir serve --max-megapixels`)")
    return Upload(data, name, fmt, hashlib.sha256(data).hexdigest())
