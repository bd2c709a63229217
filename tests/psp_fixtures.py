"""Tiny `cbir synth`-like folders for the PSPNet tests: textured rectangles on noise walls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_folder(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 240), masks: bool = True,
                big: bool = False) -> Path:
    """``n`` photos with 1-2 paintings each (bright textured rectangles, some rotated) on a
    smooth noisy wall; gt.json in the synth layout (objects with bbox and polygon, a mask).
    ``big``: one painting per photo, filling about half of it."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "queries").mkdir(exist_ok=True)
    queries = []
    w, h = size
    for i in range(n):
        wall = rng.normal(rng.uniform(60, 120), 6, (h, w, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(wall)
        mask = Image.new("L", size, 0)
        objs = []
        k = 1 if big else 1 + i % 2
        for j in range(k):
            cx = w * (j + 0.5) / k + rng.uniform(-10, 10)
            cy = h / 2 + rng.uniform(-15, 15)
            lo, hi = ((0.55, 0.75) if big else (0.25, 0.38))
            pw, ph = rng.uniform(lo, hi) * w, rng.uniform(lo + 0.1, hi + 0.1) * h
            a = np.deg2rad(rng.uniform(-8, 8))
            c, s = np.cos(a), np.sin(a)
            corners = np.array([[-pw / 2, -ph / 2], [pw / 2, -ph / 2], [pw / 2, ph / 2], [-pw / 2, ph / 2]])
            poly = corners @ np.array([[c, s], [-s, c]]) + (cx, cy)
            tex = rng.integers(150, 256, (8, 8, 3), dtype=np.uint8)
            tex_img = Image.fromarray(tex).resize(size, Image.NEAREST)
            pm = Image.new("L", size, 0)
            ImageDraw.Draw(pm).polygon([tuple(p) for p in poly], fill=255)
            img.paste(tex_img, (0, 0), pm)
            mask.paste(255, (0, 0), pm)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            objs.append({"bbox": [float(x0), float(y0), float(x1), float(y1)], "positives": [],
                         "polygon": poly.round(1).tolist()})
        name = f"queries/q{i:03d}.jpg"
        img.save(root / name, quality=92)
        q = {"image": name, "positives": [], "junk": [], "tags": [], "objects": objs}
        if masks:
            mask.save(root / f"queries/q{i:03d}_mask.png")
            q["mask"] = f"queries/q{i:03d}_mask.png"
        queries.append(q)
    (root / "gt.json").write_text(json.dumps({"name": root.name, "database": [], "queries": queries}))
    return root
