"""A tiny `cbir synth`-like folder: a few collection 'paintings' (scikit-image photos) pasted
on noise walls, one or two per composite, with gt.json objects, boxes and masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PAINTINGS = ("chelsea", "coffee", "astronaut", "rocket")


def make_collection(root: Path) -> list[str]:
    import skimage.data

    (root / "museum" / "database").mkdir(parents=True, exist_ok=True)
    names = []
    for name in PAINTINGS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((200, 200))
        rel = f"museum/database/{name}.jpg"
        img.save(root / rel, quality=90)
        names.append(rel)
    return names


def make_synth(root: Path, folder: str, n: int, seed: int, size=(320, 240)) -> Path:
    """``root/folder`` with ``n`` composites; the collection lives in ``root/museum``."""
    coll = make_collection(root) if not (root / "museum").exists() else \
        [f"museum/database/{p}.jpg" for p in PAINTINGS]
    r = np.random.default_rng(seed)
    out = root / folder
    (out / "queries").mkdir(parents=True, exist_ok=True)
    queries = []
    w, h = size
    for i in range(n):
        wall = (r.normal(0, 1, (h // 8, w // 8, 3)) * 25 + r.uniform(80, 180, 3)).clip(0, 255).astype(np.uint8)
        canvas = Image.fromarray(wall).resize((w, h), Image.BILINEAR)
        mask = np.zeros((h, w), np.uint8)
        k = int(r.integers(1, 3))
        picks = r.choice(len(coll), k, replace=False)
        objects = []
        for j, p in enumerate(picks):
            img = Image.open(root / coll[p])
            s = r.uniform(0.3, 0.45) * h / img.height
            pw, ph = int(img.width * s), int(img.height * s)
            slot_w = w // k
            x0 = int(j * slot_w + r.integers(0, max(1, slot_w - pw)))
            y0 = int(r.integers(0, h - ph))
            canvas.paste(img.resize((pw, ph)), (x0, y0))
            mask[y0:y0 + ph, x0:x0 + pw] = 255
            objects.append({"bbox": [x0, y0, x0 + pw, y0 + ph], "positives": ["../" + coll[p]],
                            "polygon": [[x0, y0], [x0 + pw, y0], [x0 + pw, y0 + ph], [x0, y0 + ph]]})
        name = f"queries/s_{i:04d}.jpg"
        canvas.save(out / name, quality=90)
        Image.fromarray(mask).save(out / f"queries/s_{i:04d}_mask.png")
        queries.append({"image": name, "positives": sorted({o["positives"][0] for o in objects}), "junk": [],
                        "tags": ["synth"], "mask": f"queries/s_{i:04d}_mask.png",
                        "objects": sorted(objects, key=lambda o: o["bbox"][0])})
    (out / "gt.json").write_text(json.dumps({"name": folder, "database": [f"../{c}" for c in coll],
                                             "queries": queries}))
    return out
