"""The embedded default: a small copy-detection benchmark made from scikit-image's photos.

As in INRIA Copydays, the database holds each original photograph plus two edited copies,
and the queries are other seeded edits of the same photograph: crops, rotations, flips with
colour shifts, and strong JPEG re-compression. Everything is derived from files an installed
package ships, so ``cbir demo`` needs no download and no ``../shared``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# scikit-image's bundled photographs (the ones that need no download).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "moon", "coins", "brick", "grass", "gravel", "page", "clock")


def photo(name: str, max_side: int = 640) -> Image.Image:
    """One of scikit-image's photographs, its longer side at most ``max_side``."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(lo, hi)
    cw, ch = int(w * np.sqrt(frac)), int(h * np.sqrt(frac))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    return Image.open(io.BytesIO(jpeg(img, quality))).convert("RGB")


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))


# Edits: name -> function(image, rng). Database copies are the milder ones.
DATABASE_EDITS: dict[str, Callable] = {
    "zoom": lambda im, rng: _crop(im, rng, 0.55, 0.7),
    "gray": lambda im, rng: ImageEnhance.Contrast(ImageOps.grayscale(im).convert("RGB")).enhance(1.3),
}
QUERY_EDITS: dict[str, Callable] = {
    "crop": lambda im, rng: _crop(im, rng, 0.12, 0.25),
    "rotate": lambda im, rng: im.rotate(float(rng.choice([-1, 1]) * rng.uniform(25, 45)), Image.BILINEAR, expand=True),
    "flip-colour": lambda im, rng: _crop(_colour(ImageOps.mirror(im), rng), rng, 0.4, 0.6),
    "jpeg": lambda im, rng: _jpeg(im.resize((im.width // 4, im.height // 4), Image.BILINEAR), 8),
}


def build_demo_benchmark(root: str | Path, seed: int = 0) -> Path:
    """Write the benchmark (``gt.json`` layout) under ``root``; returns ``root``."""
    root = Path(root)
    if (root / "gt.json").exists():
        return root
    rng = np.random.default_rng(seed)
    (root / "database").mkdir(parents=True, exist_ok=True)
    (root / "queries").mkdir(parents=True, exist_ok=True)
    database, queries, metadata = [], [], {}
    for name in PHOTOS:
        img = photo(name)
        group = [f"database/{name}.jpg"]
        img.save(root / group[0], quality=92)
        metadata[group[0]] = {"photo": name, "edit": "original"}
        for edit, fn in DATABASE_EDITS.items():
            rel = f"database/{name}_{edit}.jpg"
            fn(img, rng).save(root / rel, quality=90)
            group.append(rel)
            metadata[rel] = {"photo": name, "edit": edit}
        database += group
        for edit, fn in QUERY_EDITS.items():
            rel = f"queries/{name}_{edit}.jpg"
            fn(img, rng).save(root / rel, quality=90)
            queries.append({"image": rel, "positives": group, "junk": [], "tags": [edit]})
    (root / "metadata.json").write_text(json.dumps(metadata, indent=1))
    # gt.json last: its presence means the benchmark is complete.
    (root / "gt.json").write_text(json.dumps({"name": "cbir-demo", "database": database, "queries": queries}, indent=1))
    return root


def run_demo(workdir: str | Path, engine: str = "onnx", echo: Callable[[str], None] = print,
             progress: Callable | None = None) -> dict:
    """Build the benchmark, evaluate the default pipeline, index the database, run one search;
    then photos of walls with several of the photographs on each: localized, then searched."""
    from cbir.datasets import load_benchmark
    from cbir.evaluation import evaluate, format_summary
    from cbir.index import Searcher, update_index
    from cbir.localize import LocalizerError
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, resolve_spec
    from cbir.synth import synthesize

    workdir = Path(workdir)
    bench_dir = build_demo_benchmark(workdir / "benchmark")
    bench = load_benchmark(bench_dir)
    echo(f"demo benchmark: {bench_dir} ({len(bench.database)} database images, {len(bench.queries)} queries)")

    extractor = Extractor(resolve_spec(DEFAULT_PIPELINE), engine_name=engine)
    result = evaluate(bench, extractor, progress=progress)
    plot = workdir / "pr_curve.png"
    result.plot(plot)
    echo(format_summary(result.summary))
    echo(f"precision-recall curve: {plot}")

    index_dir = workdir / "index"
    report = update_index(bench_dir / "database", index_dir, engine=engine, progress=progress)
    echo(f"\nindex {index_dir}: {report.summary()}")
    query = bench_dir / "queries" / "chelsea_crop.jpg"
    hits = Searcher(index_dir, engine=engine).search(query, k=3)
    echo(f"\ncbir search {query} --index {index_dir} -k 3")
    for rank, h in enumerate(hits, 1):
        echo(f"{rank:3d}  {h.score:.4f}  {h.path}")
    if not (workdir / "walls" / "gt.json").exists():  # 16 walls, 1-3 of the originals hung on each
        originals = [bench_dir / "database" / f"{name}.jpg" for name in PHOTOS]
        synthesize(originals, workdir / "walls", 16, seed=0, long_side=640, warn=lambda m: None)
    walls = load_benchmark(workdir / "walls")
    n_obj = sum(len(q.objects or ()) for q in walls.queries)
    echo(f"\nseveral objects per photo: {walls.root} ({len(walls.queries)} wall photos, {n_obj} photographs "
         f"hung on them, {len(walls.database)} in the collection)")
    echo(f"{'localizer':10s} {'object mAP':>10s} {'det AP50':>9s} {'count acc':>9s} {'ms/photo':>9s}")
    for name in ("whole", "saliency", "yolo"):  # yolo: the detector trained here, the best on museum-multi
        try:
            r = evaluate(walls, Extractor(resolve_spec(DEFAULT_PIPELINE), engine_name=engine), localizer=name,
                         warn=lambda m: None)
        except LocalizerError as e:  # e.g. the saliency model's package is missing
            echo(f"{name:10s} skipped: {e}")
            continue
        s = r.summary
        echo(f"{name:10s} {s['object_map']:10.4f} {s['det_ap50']:9.4f} {s['count_accuracy']:9.3f} "
             f"{s['search_ms_per_image']:9.0f}")
    echo(f"cbir eval {walls.root} --localizer yolo   (the full table)")
    echo("\nTry your own:  .venv/bin/cbir search PHOTO.jpg --index " + str(index_dir) + " --localizer yolo")
    echo("Evaluate:      .venv/bin/cbir eval " + str(bench_dir) + " --plot pr.png")
    return result.summary
