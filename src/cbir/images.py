"""Reading images safely, and scaling them for a network.

Every failure (missing file, not an image, truncated or corrupt data, too many pixels) is an
`ImageError` whose one-line message names the file, so a batch can skip it and go on.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Decompression bombs: a small file that decodes to a huge bitmap. 100 Mpixel is a 40 MP
# camera photo with room to spare.
DEFAULT_MAX_PIXELS = 100_000_000
# Grayscale modes wider than 8 bits, which need scaling (not clipping) to 8 bits.
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class ImageError(ValueError):
    """An image that cannot be used; ``str(e)`` is one line naming it."""


class TooManyPixels(ImageError):
    """An image over the pixel cap, or a decompression bomb: refused before it is decoded."""


@dataclass(frozen=True)
class Resize:
    """How an image is scaled before the network. ``long``: longer side to ``size``, aspect kept
    (no content lost; the network sees any size). ``crop``: shorter side to ``size``, then the
    centre ``size`` x ``size`` square (the ImageNet classification convention; loses the borders)."""

    mode: str  # "long" | "crop"
    size: int

    @classmethod
    def parse(cls, token: str) -> "Resize | None":
        for mode in ("long", "crop"):
            if token.startswith(mode) and token[len(mode):].isdigit():
                size = int(token[len(mode):])
                if not 16 <= size <= 4096:
                    raise ValueError(f"input size {size} in {token!r} is outside 16..4096")
                return cls(mode, size)
        return None

    def __str__(self) -> str:
        return f"{self.mode}{self.size}"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image after scaling, before any crop."""
        s = self.size / (max if self.mode == "long" else min)(width, height)
        return max(1, round(width * s)), max(1, round(height * s))


def list_images(root: str | Path, unreadable: list[OSError] | None = None) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden files and folders skipped. A folder
    that cannot be listed is left out, its error (``filename``: the folder) appended to
    ``unreadable`` if given, so that a caller can tell "empty" from "could not look"."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"{root}: no such directory")
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append if unreadable is not None else None):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                out.append(Path(dirpath) / f)
    return sorted(out)


def open_image(source: str | Path | bytes | Image.Image, resize: Resize | None = None,
               bbox: tuple[float, float, float, float] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes, or a decoded image) to RGB, crop ``bbox``, scale by ``resize``.
    JPEGs much larger than the target are decoded at a reduced DCT scale (Pillow's ``draft``):
    faster, and after the final antialiased resize it looks the same."""
    if isinstance(source, Image.Image):  # already decoded (a region of a photo, say)
        img = source if source.mode == "RGB" else source.convert("RGB")
        img = crop_box(img, bbox, "image region") if bbox is not None else img
        return scale(img, resize) if resize is not None else img
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        with fp, warnings.catch_warnings():
            # Our own pixel cap below decides; Pillow's warning threshold (89 Mpixel) would
            # otherwise fire first. Its hard error (2x that) still stops a real bomb.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise TooManyPixels(f"{name}: {w}x{h} is {w * h / 1e6:.0f} Mpixel, over the limit of {max_pixels / 1e6:.0f}")
            if resize is not None and bbox is None and img.format == "JPEG":
                img.draft("RGB", resize.target_size(w, h))
            img.load()
            # Both return a copy even when there is nothing to do: only call them when needed.
            if img.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in WIDE_MODES:
                img = to_8bit(img)
            if img.mode != "RGB":
                img = img.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file, or a format Pillow cannot read") from None
    except Image.DecompressionBombError:
        raise TooManyPixels(f"{name}: decompression bomb refused (too many pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if bbox is not None:
        img = crop_box(img, bbox, name)
    if resize is not None:
        img = scale(img, resize)
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image scaled to 8-bit ``L``.

    Pillow's own conversion clips every value above 255, so a 16-bit photo would become blank
    white. 16-bit modes (and ``I`` holding 16-bit values, as from a 16-bit PNG) are scaled by
    their full range, 65535 -> 255, so that a 16-bit copy of an 8-bit image matches it;
    floats in [0, 1] by 255; anything else is stretched from its minimum to its maximum."""
    a = np.asarray(img).astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def crop_box(img: Image.Image, bbox: tuple[float, float, float, float], name: str = "image") -> Image.Image:
    x0, y0, x1, y1 = (float(v) for v in bbox)
    w, h = img.size
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ImageError(f"{name}: box {list(bbox)} is empty inside the {w}x{h} image")
    return img.crop((round(x0), round(y0), round(x1), round(y1)))


def scale(img: Image.Image, resize: Resize) -> Image.Image:
    tw, th = resize.target_size(*img.size)
    img = img.resize((tw, th), Image.BILINEAR)
    if resize.mode == "crop":
        left, top = (tw - resize.size) // 2, (th - resize.size) // 2
        img = img.crop((left, top, left + resize.size, top + resize.size))
    return img


def to_array(img: Image.Image) -> np.ndarray:
    """PIL RGB image -> uint8 ``(H, W, 3)``."""
    return np.asarray(img, dtype=np.uint8)


def batches_by_shape(items: Iterator[tuple[int, np.ndarray]], batch_size: int,
                     max_pending: int | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
    """Group ``(key, HWC array)`` items into ``(keys, NHWC batch)`` of equal shape. Past
    ``max_pending`` images waiting for a partner of their shape, the oldest group goes out as it
    is, so memory stays at about one batch however many shapes."""
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    n_pending = 0
    for key, arr in items:
        group = pending.setdefault(arr.shape, [])
        group.append((key, arr))
        n_pending += 1
        full = len(group) >= batch_size
        if full or (max_pending is not None and n_pending > max_pending):
            # the full group, or the oldest one (dicts keep insertion order)
            group = pending.pop(arr.shape if full else next(iter(pending)))
            n_pending -= len(group)
            yield [k for k, _ in group], np.stack([a for _, a in group])
    for group in pending.values():
        yield [k for k, _ in group], np.stack([a for _, a in group])


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> four finite numbers with x1 > x0 and y1 > y0; ValueError otherwise
    (each caller words the error for its own user: a CLI option, a form field)."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"not a box: {text!r}")
    return box  # type: ignore[return-value]
