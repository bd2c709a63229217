"""Which input handling should be the default? mAP and speed of each, on real benchmarks.

    .venv/bin/python benchmarks/input_size.py [BENCHMARK_DIR ...]

Runs every variant on the same images in one process and prints, per benchmark, mAP (overall
and per tag) and extraction ms/image, with the speed ratio against the first row (the default).
Speed is timed separately, round-robin over the variants on the same images (best of 3
rounds), so that load from other processes hits every variant alike.
Without arguments it uses ../shared/datasets/museum (when present) and the `cbir demo` benchmark.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from cbir.datasets import load_benchmark
from cbir.demo import build_demo_benchmark
from cbir.evaluation import evaluate
from cbir.pipeline import Extractor, resolve_spec

VARIANTS = [
    "efficientnet_lite0/bn2,long384,GeM3,L2",  # the default: whole image, longer side 384
    "efficientnet_lite0/bn2,long512,GeM3,L2",
    "efficientnet_lite0/bn2,long768,GeM3,L2",
    "efficientnet_lite0/bn2,long224,GeM3,L2",
    "efficientnet_lite0/bn2,crop224,GeM3,L2",  # ImageNet convention: shorter side + centre crop
    "efficientnet_lite0/bn2,crop512,GeM3,L2",
]


def interleaved_ms(extractors: list[Extractor], paths: list[Path], rounds: int = 3) -> list[float]:
    """Best-of-``rounds`` ms/image for each extractor, timed round-robin on the same images."""
    best = [float("inf")] * len(extractors)
    for ex in extractors:  # warm up: graph export, session creation
        ex.extract(paths[:1])
    for _ in range(rounds):
        for i, ex in enumerate(extractors):
            t0 = time.perf_counter()
            ex.extract(paths)
            best[i] = min(best[i], 1000 * (time.perf_counter() - t0) / len(paths))
    return best


def main(dirs: list[Path]) -> None:
    for d in dirs:
        bench = load_benchmark(d)
        extractors = [Extractor(resolve_spec(text)) for text in VARIANTS]
        rows = [(str(ex.spec), evaluate(bench, ex, warn=lambda m: None).summary) for ex in extractors]
        speed = interleaved_ms(extractors, [bench.path(p) for p in bench.database[:24]])
        for (_, s), ms in zip(rows, speed):
            s["extract_ms_per_image"] = ms
        base_ms = rows[0][1]["extract_ms_per_image"]
        tags = list(rows[0][1]["map_by_tag"])
        print(f"\n## {bench.name} ({len(bench.database)} database images, {len(bench.queries)} queries)\n")
        print("| pipeline | mAP | " + " | ".join(tags) + " | ms/image | time vs default |")
        print("|---|---|" + "---|" * len(tags) + "---|---|")
        for text, s in rows:
            per_tag = " | ".join(f"{s['map_by_tag'][t]:.4f}" for t in tags)
            ms = s["extract_ms_per_image"]
            print(f"| `{text}` | {s['map']:.4f} | {per_tag} | {ms:.1f} | {ms / base_ms:.2f}x |")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    if not args:
        museum = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "museum"
        if museum.exists():
            args.append(museum)
        args.append(build_demo_benchmark(Path(tempfile.gettempdir()) / "cbir-demo-benchmark"))
    main(args)
