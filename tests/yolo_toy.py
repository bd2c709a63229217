"""A tiny benchmark-format detection set: coloured, textured rectangles ("paintings") on noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_toy_set(folder: Path, n: int = 8, size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "queries").mkdir(parents=True, exist_ok=True)
    queries = []
    w, h = size
    for i in range(n):
        img = (rng.normal(120, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
        objects = []
        k = 1 + i % 2
        for j in range(k):
            bw, bh = int(rng.integers(w // 5, w // 3)), int(rng.integers(h // 4, h // 2))
            x0 = int(rng.integers(j * w // k, (j + 1) * w // k - bw))
            y0 = int(rng.integers(0, h - bh))
            patch = rng.integers(0, 255, (1, 1, 3)) + rng.normal(0, 40, (bh, bw, 3))
            img[y0:y0 + bh, x0:x0 + bw] = patch.clip(0, 255).astype(np.uint8)
            img[y0:y0 + bh, x0:x0 + 3] = img[y0:y0 + bh, x0 + bw - 3:x0 + bw] = 20  # a dark frame
            img[y0:y0 + 3, x0:x0 + bw] = img[y0 + bh - 3:y0 + bh, x0:x0 + bw] = 20
            objects.append({"bbox": [x0, y0, x0 + bw, y0 + bh], "positives": []})
        name = f"queries/toy_{i:03d}.jpg"
        Image.fromarray(img).save(folder / name, quality=92)
        queries.append({"image": name, "positives": [], "junk": [], "tags": [], "objects": objects})
    (folder / "gt.json").write_text(json.dumps({"name": "toy", "database": [], "queries": queries}))
    return folder
