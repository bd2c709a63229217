"""Is AVE pooling more robust than SUM pooling to resizing? A measurement.

The user's notes guess that AVE pooling, being SUM divided by the map size, smooths away the
effect of image size: an image and its 2x resized copy should be more similar under AVE than
under SUM. This script measures it on real images with the default backbone's last conv map
(``efficientnet_lite0/bn2``):

1. per image, the descriptor of the image fed at long side S and of its 2x copy (long 2S):
   cosine similarity, norm ratio and relative Euclidean distance, for SUM and AVE, without
   and with L2 normalisation;
2. mAP on a benchmark with the queries at half the database's input size (and, as the
   control, at the same size), ranking by inner product with and without L2.

Usage::

    .venv/bin/python benchmarks/ave_vs_sum.py ../shared/datasets/museum [--size 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cbir.datasets import load_benchmark
from cbir.evaluation import query_keys, score_vectors
from cbir.pipeline import Extractor, resolve_spec
from cbir.pooling import functional as F


def pooled(paths, bboxes, size: int) -> dict[str, np.ndarray]:
    """SUM and AVE of the bn2 map of each image at long side ``size`` (no normalisation)."""
    ex = Extractor(resolve_spec(f"efficientnet_lite0/bn2,long{size},SUM"))
    out = {"SUM": [], "AVE": []}
    for p, b in zip(paths, bboxes):
        (m,) = ex.engine.run(ex.load(p, b)[None])
        x = torch.from_numpy(m)
        out["SUM"].append(F.spoc(x).numpy()[0])
        out["AVE"].append(F.ave(x).numpy()[0])
    return {k: np.stack(v).astype(np.float64) for k, v in out.items()}


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark", type=Path)
    ap.add_argument("--size", type=int, default=256, help="the smaller input size S (the copy is at 2S)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    bench = load_benchmark(args.benchmark)
    S = args.size
    db_paths = [bench.path(p) for p in bench.database]
    keys = list(query_keys(bench))
    q_paths, q_boxes = [bench.path(k[0]) for k in keys], [k[1] for k in keys]

    print(f"extracting {len(db_paths)} database and {len(q_paths)} query images at long{S} and long{2 * S} ...",
          file=sys.stderr)
    db = {S: pooled(db_paths, [None] * len(db_paths), S), 2 * S: pooled(db_paths, [None] * len(db_paths), 2 * S)}
    qs = {S: pooled(q_paths, q_boxes, S), 2 * S: pooled(q_paths, q_boxes, 2 * S)}

    res: dict = {"benchmark": bench.name, "S": S, "pairs": {}, "map": {}}
    for name in ("SUM", "AVE"):
        a, b = db[S][name], db[2 * S][name]
        cos = (l2(a) * l2(b)).sum(1)
        res["pairs"][name] = {
            "cosine": float(cos.mean()),
            "norm_ratio_2x": float((np.linalg.norm(b, axis=1) / np.linalg.norm(a, axis=1)).mean()),
            "rel_euclidean": float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).mean()),
            "rel_euclidean_after_L2": float(np.linalg.norm(l2(a) - l2(b), axis=1).mean()),
        }
        for qsize, label in ((2 * S, "same size"), (S, "queries at half size")):
            for norm in (False, True):
                d, q = db[2 * S][name], qs[qsize][name]
                if norm:
                    d, q = l2(d), l2(q)
                m = score_vectors(bench, d.astype(np.float32), q.astype(np.float32)).summary["map"]
                res["map"][f"{name}{',L2' if norm else ''} ({label})"] = round(float(m), 4)

    print(f"\n{bench.name}: {len(db_paths)} images, each at long{S} and at long{2 * S}\n")
    print("| pooling | cosine(img, 2x img) | norm ratio 2x/1x | rel. Euclidean distance | same, after L2 |")
    print("|---|---:|---:|---:|---:|")
    for name, r in res["pairs"].items():
        print(f"| {name} | {r['cosine']:.4f} | {r['norm_ratio_2x']:.2f} | {r['rel_euclidean']:.3f} | {r['rel_euclidean_after_L2']:.3f} |")
    print(f"\nmAP, database at long{2 * S}, ranking by inner product\n")
    print("| descriptor | queries at the same size | queries at half size |")
    print("|---|---:|---:|")
    for name in ("SUM", "AVE", "SUM,L2", "AVE,L2"):
        print(f"| {name} | {res['map'][f'{name} (same size)']:.4f} | {res['map'][f'{name} (queries at half size)']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
