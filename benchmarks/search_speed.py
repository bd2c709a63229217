"""Search at scale: build time, memory, ms/query (single-threaded) and recall@10 per index type.

Clustered synthetic vectors (``--clusters`` Gaussian blobs on the unit sphere, L2-normalised,
like image descriptors) are indexed with each index type through `cbir.index.factory` (the
code `cbir search` runs); queries are fresh points from the same blobs. Recall@10 is measured
against exact search; query timings are interleaved across types, round by round, and the
ratio to exact search is the median of per-round ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_speed.py                 # 100k and 1M
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_speed.py --sizes 100000 --types 'Flat;HNSW32;auto'

Types are separated by ';' (factory strings contain commas); ``{nlist}`` in a type is replaced
by the nlist that ``auto`` picks for the size, e.g. ``IVF{nlist},PQ32``. ``--nprobe`` sweeps
the IVF types.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse on a machine shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_TYPES = "Flat;HNSW32;IVF{nlist},PQ32;auto"


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.6, decay: float = 1.0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (generated in chunks, float32).

    The within-cluster noise has a decaying spectrum (variance ~ i^-decay along a fixed random
    basis), as real descriptors do (their PCA spectrum falls off); ``decay=0`` gives isotropic
    noise, where nearest neighbours in 256-d are nearly arbitrary (a worst case for any ANN).
    """
    rng = np.random.default_rng(seed)
    g = np.random.default_rng(12345)
    centres = g.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(g.standard_normal((d, d)))[0].astype(np.float32)
    scale = (np.arange(1, d + 1, dtype=np.float32) ** (-decay / 2))
    scale *= spread / np.sqrt((scale ** 2).sum())
    out = np.empty((n, d), np.float32)
    step = 1 << 16
    for i in range(0, n, step):
        m = min(step, n - i)
        noise = (rng.standard_normal((m, d), dtype=np.float32) * scale) @ basis
        x = centres[rng.integers(0, clusters, m)] + noise
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)[1] + 1  # ids are row + 1


def index_bytes(si) -> int:
    import faiss

    n = faiss.serialize_index(si.index).size
    return int(n + (si.vecs.nbytes if si.vecs is not None else 0))


def time_queries(si, q: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    out = np.empty((len(q), k), np.int64)
    t0 = time.perf_counter()
    for i in range(len(q)):
        out[i] = si.search(q[i:i + 1], k)[1][0]
    return (time.perf_counter() - t0) / len(q) * 1000, out


def run_size(n: int, args) -> list[dict]:
    import faiss

    from cbir.index.factory import SearchIndex, auto_factory, resolve

    d, k = args.dim, 10
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    x = clustered(n, d, args.clusters, seed=1, decay=args.decay)
    q = clustered(args.queries, d, args.clusters, seed=2, decay=args.decay)
    ids = np.arange(1, n + 1, dtype=np.int64)
    gt = exact_topk(x, q, k)
    print(f"\n== {n:,} vectors, dim {d}, {args.clusters} clusters, {args.queries} queries "
          f"(data + ground truth {time.perf_counter() - t0:.0f} s; auto -> {auto_factory(n, d)})", flush=True)

    nlist = resolve("auto" if n >= 50_000 else f"IVF{max(64, int(2 * n ** 0.5))},Flat", max(n, 50_000), d).nlist
    variants: list[tuple[str, str, dict]] = []  # (label, factory, params)
    for t in args.types.split(";"):
        t = t.strip().replace("{nlist}", str(nlist))
        if not t:
            continue
        concrete = resolve(t, n, d)
        if concrete.nlist:
            for npb in args.nprobe:
                for kf in (args.k_factor if concrete.refine else [0]):
                    variants.append((f"{t} nprobe={npb}" + (f" k_factor={kf}" if concrete.refine else ""),
                                     t, {"nprobe": npb, "k_factor": kf} if kf else {"nprobe": npb}))
        else:
            variants.append((t, t, {"efSearch": args.ef_search} if concrete.is_hnsw else {}))

    built: dict[str, SearchIndex] = {}
    rows: dict[str, dict] = {}
    for label, factory, params in variants:
        key = factory
        if key not in built:
            faiss.omp_set_num_threads(args.build_threads)
            before = rss_mib()
            si = SearchIndex(factory, d, {}).build(ids, x)
            built[key] = si
            build_s, mem = si.build_seconds, index_bytes(si)
            print(f"built {str(si.type):28s} in {build_s:6.1f} s, {mem / 2**20:7.0f} MiB "
                  f"(RSS +{rss_mib() - before:.0f} MiB)", flush=True)
            rows[f"__build_{key}"] = {"build_s": build_s, "mem_mib": mem / 2**20}
        b = rows[f"__build_{key}"]
        rows[label] = {"type": label, "factory": str(built[key].type), "params": params,
                       "build_s": round(b["build_s"], 1), "memory_mib": round(b["mem_mib"], 1), "ms": []}

    faiss.omp_set_num_threads(1)
    labels = [lab for lab, _, _ in variants]
    exact_label = next((lab for lab in labels if rows[lab]["factory"] == "Flat"), None)
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            _, factory, params = next(v for v in variants if v[0] == label)
            si = built[factory]
            si.params = dict(params)
            si._apply_params()
            nq = min(len(q), args.flat_queries) if rows[label]["factory"] == "Flat" else len(q)
            ms, found = time_queries(si, q[:nq], k)
            rows[label]["ms"].append(ms)
            if r == 0:
                rows[label]["recall@10"] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, gt[:nq])])), 4)
    times = {label: rows[label].pop("ms") for label in labels}
    out = []
    for label in labels:
        row = rows[label]
        row["ms_per_query"] = round(statistics.median(times[label]), 3)
        if exact_label:
            row["speedup_vs_exact"] = round(statistics.median(e / m for e, m in zip(times[exact_label], times[label])), 1)
        out.append(row)
    print(f"\n{'index type':44s} {'build s':>8s} {'MiB':>7s} {'ms/query':>9s} {'recall@10':>10s} {'x exact':>8s}")
    for row in out:
        print(f"{row['type']:44s} {row['build_s']:8.1f} {row['memory_mib']:7.0f} {row['ms_per_query']:9.3f} "
              f"{row['recall@10']:10.3f} {row.get('speedup_vs_exact', float('nan')):8.1f}")
    print(f"peak RSS so far: {vm_hwm_mib():.0f} MiB")
    del built, x
    return [dict(r, n=n) for r in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--decay", type=float, default=1.0, help="spectrum decay of the within-cluster noise (0: isotropic)")
    ap.add_argument("--flat-queries", type=int, default=100, help="queries timed for exact search (slow)")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"';'-separated index types (default {DEFAULT_TYPES!r})")
    ap.add_argument("--nprobe", default="4,16", help="nprobe values for IVF types")
    ap.add_argument("--k-factor", default="8", help="re-ranked shortlist = k_factor x k (RFlat types); a list sweeps")
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--build-threads", type=int, default=0, help="FAISS threads for building (0: all cores)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.nprobe = [int(v) for v in args.nprobe.split(",") if v]
    args.k_factor = [int(v) for v in args.k_factor.split(",") if v]
    if args.build_threads <= 0:
        args.build_threads = os.cpu_count() or 1
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        results += run_size(n, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
