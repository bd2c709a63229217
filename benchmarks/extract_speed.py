"""Extraction speed: cbir's indexing path against a naive pipeline and against the model alone.

Runs, in one process, interleaved round by round and on the same images:

  (a) naive   PIL full decode + resize, one PyTorch forward per image, GeM, L2
  (b) model   the engine alone on pre-decoded, pre-batched arrays (the limit for (c))
  (c) cbir    the real indexing path: `cbir.index.update_index` into a fresh index
              (hashing, decode pool, engine, post-processing, SQLite + segment commits)

and prints images/s for each (median over rounds) with the ratios c/a and c/b (median of the
per-round ratios, so that load from other processes hits both sides of a ratio alike).
``--int8`` adds (d), the indexing path on the int8 engine, and the mAP of both engines on
the museum benchmark. Peak RSS is printed, and ``--rss-images N`` checks in a child process
that extraction over N images holds a bounded number of decoded images (RSS stays flat).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/extract_speed.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/extract_speed.py --int8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT.parent / "shared" / "datasets" / "museum"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float:
    """Peak RSS of this process image (unlike ru_maxrss, not inherited across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mib()


def naive_runner(files: list[Path], spec):
    """(a): what one writes first — full decode, PIL resize, per-image eager PyTorch."""
    import torch
    from PIL import Image

    from cbir.models import get_backbone
    from cbir.pooling import parse_pooling, pool

    bb = get_backbone(spec.backbone)
    module = bb.torch_module([spec.layer])
    method, value = parse_pooling(spec.pooling)

    def run() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for f in files:
                img = Image.open(f).convert("RGB")
                img = img.resize(spec.resize.target_size(*img.size), Image.BILINEAR)
                x = torch.from_numpy(bb.prepare(np.asarray(img)[None]))
                (fmap,) = module(x)
                v = pool(fmap, method, value)
                out.append(torch.nn.functional.normalize(v, dim=1)[0].numpy())
        return np.stack(out)

    return run


def model_runner(extractor, files: list[Path]):
    """(b): the engine alone, on the batches the indexing path forms, decoded beforehand."""
    from cbir.images import batches_by_shape

    bs = extractor.resolved_batch_size()
    arrays = [(i, extractor.load(f)) for i, f in enumerate(files)]
    batches = [b for _, b in batches_by_shape(iter(arrays), bs, max_pending=bs)]
    engine = extractor.engine
    workers = max(1, extractor.infer_workers)

    def run() -> None:
        if workers == 1:
            for b in batches:
                engine.run(b)
            return
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(workers) as ex:
            list(ex.map(engine.run, batches))

    return run


def index_runner(files: list[Path], pipeline: str, engine: str, work: Path):
    """(c): `update_index` on a folder of links to the images, into a fresh index each time."""
    from cbir.index import update_index

    src = work / "images"
    src.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        link = src / f"{i:06d}{f.suffix}"
        if not link.exists():
            link.symlink_to(f)
    counter = iter(range(10**9))

    def run() -> None:
        dest = work / f"index-{engine}-{next(counter)}"
        report = update_index(src, dest, pipeline, engine=engine, warn=lambda m: None)
        assert report.added == len(files), report.summary()

    return run


def museum_map(pipeline: str, engine: str) -> float:
    from cbir.datasets import load_benchmark
    from cbir.evaluation import evaluate
    from cbir.pipeline import Extractor, resolve_spec

    ex = Extractor(resolve_spec(pipeline), engine_name=engine)
    return float(evaluate(load_benchmark(MUSEUM), ex, warn=lambda m: None).summary["map"])


def rss_child(n: int, images: Path, pipeline: str) -> dict:
    """Extract ``n`` images (the folder's, cycled) and watch RSS: it must not grow with n.

    (ONNX Runtime's arena grows to the largest input seen, so RSS rises during the first pass
    over the folder's sizes; after that it must stay flat however many images follow.)
    """
    from cbir.images import list_images
    from cbir.pipeline import Extractor, resolve_spec

    files = list_images(images)
    sources = [files[i % len(files)] for i in range(n)]
    ex = Extractor(resolve_spec(pipeline))
    marks, done, trace = sorted({min(n, len(files)), n // 2, 3 * n // 4, n}), 0, {}
    for keys, _ in ex.iter_batches(sources):
        done += len(keys)
        while marks and done >= marks[0]:
            trace[marks.pop(0)] = round(rss_mib(), 1)
    return {"images": n, "folder": len(files), "rss_mib_after": trace, "peak_rss_mib": round(vm_hwm_mib(), 1),
            "decoded_image_mib": round(512 * 384 * 3 / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=MUSEUM / "database", help="folder of images")
    ap.add_argument("--n", type=int, default=160, help="images per round (default 160)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipeline", default=None, help="default: cbir's default pipeline")
    ap.add_argument("--int8", action="store_true", help="also the int8 engine, with its museum mAP")
    ap.add_argument("--rss-images", type=int, default=1200, help="images for the memory check (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from cbir.images import list_images
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, resolve_spec
    from cbir.models import batch_size as tuning

    pipeline = args.pipeline or DEFAULT_PIPELINE
    if args._rss_child:
        print(json.dumps(rss_child(args._rss_child, args.images, pipeline)))
        return

    files = list_images(args.images)[: args.n]
    spec = resolve_spec(pipeline)
    extractor = Extractor(spec)
    import torch

    print(f"pipeline {spec}; {len(files)} images from {args.images}; {os.cpu_count()} cores; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} (torch threads {torch.get_num_threads()})")
    per_image = tuning.measure(extractor)
    print("batch size by measurement (ms/image at the pipeline's input size): "
          + ", ".join(f"{bs}: {t * 1000:.1f}" for bs, t in per_image.items())
          + f" -> {tuning.choose(per_image)} (in use: {extractor.resolved_batch_size()}, "
            f"decode_workers={extractor.decode_workers}, infer_workers={extractor.infer_workers})")

    with tempfile.TemporaryDirectory(prefix="cbir-extract-bench-") as tmp:
        work = Path(tmp)
        runners = {
            "a naive": naive_runner(files, spec),
            "b model": model_runner(extractor, files),
            "c cbir": index_runner(files, pipeline, "onnx", work),
        }
        if args.int8:
            runners["d cbir int8"] = index_runner(files, pipeline, "onnx-int8", work)
            _ = Extractor(spec, engine_name="onnx-int8").engine  # quantize once, outside the timing
        for run in runners.values():  # warm-up: graph export, sessions, page cache
            run()
        rates: dict[str, list[float]] = {k: [] for k in runners}
        names = list(runners)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                runners[name]()
                rates[name].append(len(files) / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + "  ".join(f"{k} {rates[k][-1]:6.1f}" for k in names), flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {
        "c/a": statistics.median(c / a for c, a in zip(rates["c cbir"], rates["a naive"])),
        "c/b": statistics.median(c / b for c, b in zip(rates["c cbir"], rates["b model"])),
    }
    if args.int8:
        ratio["d/c"] = statistics.median(d / c for d, c in zip(rates["d cbir int8"], rates["c cbir"]))
    print()
    print(f"{'path':28s} {'img/s':>8s}")
    labels = {"a naive": "(a) naive PIL + torch/image", "b model": "(b) model alone (limit)",
              "c cbir": "(c) cbir index (onnx)", "d cbir int8": "(d) cbir index (onnx-int8)"}
    for k in names:
        print(f"{labels[k]:28s} {med[k]:8.1f}")
    print("ratios (median of per-round ratios): " + "  ".join(f"{k} = {v:.2f}" for k, v in ratio.items()))
    result = {"pipeline": str(spec), "images": len(files), "rounds": args.rounds,
              "img_per_s": {k: round(v, 1) for k, v in med.items()},
              "ratios": {k: round(v, 3) for k, v in ratio.items()}}
    if args.int8:
        maps = {e: museum_map(pipeline, e) for e in ("onnx", "onnx-int8")}
        print(f"museum mAP: onnx {maps['onnx']:.4f}   onnx-int8 {maps['onnx-int8']:.4f}   "
              f"(int8 speed x{ratio['d/c']:.2f}, mAP {maps['onnx-int8'] - maps['onnx']:+.4f})")
        result["museum_map"] = maps
    print(f"peak RSS of this process: {vm_hwm_mib():.0f} MiB (all four paths, the pre-decoded images of (b)"
          + (", int8 calibration" if args.int8 else "") + ")")
    result["peak_rss_mib"] = round(vm_hwm_mib(), 1)
    if args.rss_images:
        out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--pipeline", pipeline,
                              "--_rss-child", str(args.rss_images)], capture_output=True, text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        trace = ", ".join(f"{k}: {v:.0f}" for k, v in mem["rss_mib_after"].items())
        print(f"memory check: {mem['images']} images (the folder's {mem['folder']}, cycled); RSS MiB after "
              f"n images: {trace} (peak {mem['peak_rss_mib']:.0f}); one decoded 512x384 image is "
              f"{mem['decoded_image_mib']} MiB")
        result["memory"] = mem
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
