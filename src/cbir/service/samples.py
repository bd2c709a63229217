"""A small sample index of real photographs (the ones scikit-image ships), and queries for it.

Used by the service's tests, its load benchmark and its screenshot when no benchmark data is
at hand: no download, a few seconds to index.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from cbir.demo import jpeg, photo

# name -> catalog metadata (shown on the page like the museum set's artist and title).
PHOTOS: dict[str, dict[str, str]] = {
    "astronaut": {"title": "Eileen Collins, astronaut", "artist": "NASA"},
    "chelsea": {"title": "Chelsea the cat", "artist": "Stefan van der Walt"},
    "coffee": {"title": "A cup of coffee", "artist": "Rachel Michetti"},
    "rocket": {"title": "Falcon 9 on the launch pad", "artist": "SpaceX"},
    "hubble_deep_field": {"title": "Hubble eXtreme Deep Field", "artist": "NASA"},
    "immunohistochemistry": {"title": "Immunohistochemical staining of colonic glands"},
}


def write_photos(root: str | Path) -> Path:
    """``root/<name>.jpg`` for every sample photo, and ``root/metadata.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        (root / f"{name}.jpg").write_bytes(jpeg(photo(name), 92))
    (root / "metadata.json").write_text(json.dumps({f"{n}.jpg": m for n, m in PHOTOS.items()}, indent=1))
    return root


def build_index(root: str | Path, engine: str = "onnx") -> tuple[Path, Path]:
    """Photos in ``root/photos``, their index in ``root/index`` (reused if already built)."""
    from cbir.index import update_index

    root = Path(root)
    photos, index = root / "photos", root / "index"
    if not (index / "index.json").exists() or not (photos / "metadata.json").exists():
        write_photos(photos)
        update_index(photos, index, engine=engine, warn=lambda *_: None)
    return photos, index


def crop_query(name: str = "chelsea", box=(0.22, 0.12, 0.78, 0.95)) -> bytes:
    """An edited copy of a sample photo: a crop of it, re-encoded."""
    img = photo(name)
    return jpeg(img.crop(tuple(int(f * side) for f, side in zip(box, img.size * 2))), 85)


def composite_query(left: str = "coffee", right: str = "chelsea", side: int = 320) -> tuple[bytes, tuple, tuple]:
    """Two photos side by side: (JPEG bytes, box of the left one, box of the right one) in pixels."""
    a, b = photo(left, side), photo(right, side)
    h = max(a.height, b.height)
    canvas = Image.new("RGB", (a.width + b.width, h), (255, 255, 255))
    canvas.paste(a, (0, (h - a.height) // 2))
    canvas.paste(b, (a.width, (h - b.height) // 2))
    return jpeg(canvas, 90), (0, 0, a.width, h), (a.width, 0, a.width + b.width, h)
