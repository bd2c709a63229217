"""Search at scale: cbir's default index against the libraries a user would pick instead.

Two data distributions, both 256-d unit vectors from `clustered` (Gaussian blobs on the
sphere, within-blob noise with a decaying spectrum):

- ``clustered``: the original benchmark data (1,000 well-separated blobs; easy for IVF,
  whose 1,024 lists line up with the blobs).
- ``calibrated``: blob spread and spectrum chosen so that the local intrinsic dimensionality
  (LID, MLE over the 20 nearest neighbours) and the relative contrast (RC, mean distance /
  nearest-neighbour distance) of a sample match those of real cbir descriptors (the default
  pipeline on the museum database and queries, the museum-multi painting crops and the demo
  set), measured at the real set's size. Both sets' statistics are printed.

Systems, each in one process, all single-threaded (FAISS's OpenMP, hnswlib and every BLAS
pinned to one thread), timed interleaved round by round:

- ``cbir``: the index ``auto`` builds (`cbir.index.factory`, the code `cbir search` runs),
  with the search setting its own tuning picks for each recall target (held-out sample of
  the index's own vectors), measured on the benchmark's queries. ``cbir-ivf``: the same for
  auto's IVF + PQ + re-rank type at any size (what auto builds below ``GRAPH_MIN``, where it
  switches to an HNSW graph), to measure the crossover.
- ``hnswlib`` (M 16, efConstruction 200), ``faiss-HNSW32`` (efConstruction 200; where
  ``auto`` built an HNSW32 graph, that same graph searched through FAISS directly) and
  ``faiss-IVF-Flat`` (nlist ~ sqrt(N), as auto's IVF): each at its first ef / nprobe whose recall@10 on the
  benchmark's own queries reaches the target (an oracle choice, in the peers' favour).

Reported per system and target (0.95, 0.99): build s, memory MiB, recall@10, ms/query one at
a time and batched (all queries in one call), and the ratio to cbir (median of per-round
ratios; > 1 means slower than cbir).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_speed.py --sizes 100000
    nice -n 10 .venv/bin/python benchmarks/search_speed.py --sizes 1000000 --json out.json
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse on a machine shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = (0.95, 0.99)
EF_SWEEP = (10, 12, 16, 20, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
NPROBE_SWEEP = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128)
# The calibration grid: blob spread (norm of the noise) and spectrum decay.
SPREADS = (0.6, 0.9, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0)
DECAYS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


# -- descriptor statistics -----------------------------------------------------------
def descriptor_stats(x: np.ndarray, k: int = 20, queries: int = 200, seed: int = 0) -> dict:
    """LID and RC of a set of unit vectors (x (N, d)), over ``queries`` held-out points.

    LID: the MLE of Levina and Bickel (Amsaleg et al. 2015) from the k nearest Euclidean
    distances, -1 / mean(log(r_i / r_k)), averaged over queries. RC: mean distance to the
    other points / distance to the nearest one (He et al. 2012), averaged. Lower RC and
    higher LID make nearest-neighbour search harder."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    rows = rng.choice(len(x), min(queries, len(x) // 2), replace=False)
    others = np.setdiff1d(np.arange(len(x)), rows)
    q, db = x[rows], x[others]
    d2 = np.maximum(2 - 2 * (q @ db.T), 1e-12)  # unit vectors: |a-b|^2 = 2 - 2 a.b
    dist = np.sqrt(d2)
    near = np.sort(dist, axis=1)[:, :k]
    lid = -1.0 / np.mean(np.log(near[:, :-1] / near[:, -1:]), axis=1)
    rc = dist.mean(axis=1) / near[:, 0]
    return {"n": len(x), "dim": x.shape[1], "lid": round(float(np.median(lid)), 2),
            "rc": round(float(np.median(rc)), 3)}


def _gt_items(root: Path) -> list[tuple[str, list[float] | None]]:
    """(image, box) of a gt.json benchmark: database images, then queries (each painting of
    a multi-object photo as its own crop)."""
    gt = json.loads((root / "gt.json").read_text())
    out: list[tuple[str, list[float] | None]] = [(str((root / p).resolve()), None) for p in gt["database"]]
    for q in gt["queries"]:
        objects = q.get("objects")
        if objects:
            out += [(str(root / q["image"]), o["bbox"]) for o in objects]
        else:
            out.append((str(root / q["image"]), q.get("bbox")))
    return out


def real_descriptors(cache: Path, datasets: Path) -> dict[str, np.ndarray]:
    """Default-pipeline descriptors of the images the repo can reach, cached in ``cache``."""
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from cbir.demo import build_demo_benchmark
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, resolve_spec

    extractor = Extractor(resolve_spec(DEFAULT_PIPELINE), None, "onnx")
    sources = {"museum": datasets / "museum", "museum-multi": datasets / "museum-multi",
               "demo": build_demo_benchmark(Path(tempfile.mkdtemp()) / "demo")}
    seen: set = set()
    out = {}
    for name, root in sources.items():
        if not (Path(root) / "gt.json").exists():
            continue
        items = [(p, b) for p, b in _gt_items(Path(root)) if (p, tuple(b or ())) not in seen]
        seen |= {(p, tuple(b or ())) for p, b in items}  # museum-multi lists museum's database again
        x = extractor.extract([p for p, _ in items], [b for _, b in items])
        out[name] = x[~np.isnan(x[:, 0])]
        print(f"extracted {name}: {out[name].shape}", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def calibrate(real: np.ndarray, d: int, clusters: int) -> tuple[dict, dict]:
    """The (spread, decay) whose synthetic sample of the real set's size is closest to the
    real set in LID and RC (squared relative errors). Returns (params, synthetic stats)."""
    want = descriptor_stats(real)
    best = None
    for spread in SPREADS:
        for decay in DECAYS:
            got = descriptor_stats(clustered(len(real), d, clusters, seed=7, spread=spread, decay=decay))
            err = ((got["lid"] - want["lid"]) / want["lid"]) ** 2 + ((got["rc"] - want["rc"]) / want["rc"]) ** 2
            if best is None or err < best[0]:
                best = (err, {"spread": spread, "decay": decay}, got)
    return best[1], best[2]


# -- the systems -------------------------------------------------------------------
def recall10(found: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / gt.shape[1] for a, b in zip(found, gt)]))


class Cbir:
    """cbir's default index (`auto`), or another type, through `cbir.index.factory.SearchIndex`."""

    def __init__(self, x, ids, factory: str = "auto"):
        from cbir.index.factory import SearchIndex

        self.ids, self.x = ids, x
        self.si = SearchIndex(factory, x.shape[1], {}).build(ids, x, tune_target=TARGETS[0])
        self.desc = str(self.si.type)

    def nbytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.si.index).size + (self.si.vecs.nbytes if self.si.vecs is not None else 0))

    def settings(self, target, q, gt):
        """The product's own choice: tuned on held-out index vectors, not on ``q``."""
        rec = self.si.tune(target, ids=self.ids, vecs=self.x)
        yield dict(rec["params"])

    def search(self, q, k, s):
        return self.si.search(q, k, s, threads=1)[1]


class Hnswlib:
    name = "hnswlib"

    def __init__(self, x, ids, m=16, ef_construction=200, threads=2):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=len(x), M=m, ef_construction=ef_construction, random_seed=1)
        self.index.set_num_threads(threads)
        self.index.add_items(x, ids)
        self.index.set_num_threads(1)
        self.desc = f"M{m},efC{ef_construction}"

    def nbytes(self) -> int:
        with tempfile.NamedTemporaryFile() as f:
            self.index.save_index(f.name)
            return os.path.getsize(f.name)

    def settings(self, target, q, gt):
        for ef in EF_SWEEP:
            yield {"ef": ef}

    def search(self, q, k, s):
        self.index.set_ef(max(s["ef"], k))
        return self.index.knn_query(q, k, num_threads=1)[0].astype(np.int64)


class Faiss:
    """A plain FAISS index (ids = the benchmark's ids through an IDMap where needed)."""

    def __init__(self, name, factory, x, ids, knob, index=None):
        import faiss

        self.name, self.desc, self.knob = name, factory, knob
        if index is not None:  # the same FAISS structure cbir built: searched directly
            self.index = self.base = index
            self.desc = f"{factory} (cbir's graph)"
            return
        base = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in factory:
            faiss.downcast_index(base).hnsw.efConstruction = 200
        if not base.is_trained:
            sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 40 * 4096), replace=False)]
            base.train(sample)
        self.index = base if factory.startswith("IVF") else faiss.IndexIDMap(base)
        self.index.add_with_ids(x, ids)
        self.base = base

    def nbytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.index).size)

    def settings(self, target, q, gt):
        for v in (NPROBE_SWEEP if self.knob == "nprobe" else EF_SWEEP):
            yield {self.knob: v}

    def search(self, q, k, s):
        import faiss

        if self.knob == "nprobe":
            p = faiss.SearchParametersIVF()
            p.nprobe = s["nprobe"]
        else:
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(s["efSearch"], k)
        return self.index.search(q, k, params=p)[1]


def pick(system, target, q, gt, k=10):
    """The system's first setting reaching ``target`` on (q, gt), or its last (best) one."""
    last = None
    for s in system.settings(target, q, gt):
        r = recall10(system.search(q, k, s), gt)
        last = (s, r)
        if r >= target:
            break
    return last


def time_single(system, q, k, s) -> float:
    t0 = time.perf_counter()
    for i in range(len(q)):
        system.search(q[i:i + 1], k, s)
    return (time.perf_counter() - t0) / len(q) * 1000


def time_batch(system, q, k, s) -> float:
    t0 = time.perf_counter()
    system.search(q, k, s)
    return (time.perf_counter() - t0) / len(q) * 1000


def run(n: int, dist: str, gen: dict, args) -> list[dict]:
    import faiss

    from cbir.index.factory import auto_factory, ivf_nlist, pq_m

    d, k = args.dim, 10
    t0 = time.perf_counter()
    x = clustered(n, d, args.clusters, seed=1, **gen)
    q = clustered(args.queries, d, args.clusters, seed=2, **gen)
    ids = np.arange(1, n + 1, dtype=np.int64)
    faiss.omp_set_num_threads(args.build_threads)
    gt = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)[1] + 1
    print(f"\n== {dist} ({gen}): {n:,} x {d}, {args.queries} queries; auto -> {auto_factory(n, d)}; "
          f"data + ground truth {time.perf_counter() - t0:.0f} s", flush=True)
    nlist = ivf_nlist(n)
    makers = {
        "cbir": lambda: Cbir(x, ids),
        # auto's IVF + PQ type at any size (what auto builds below GRAPH_MIN): the crossover
        "cbir-ivf": lambda: Cbir(x, ids, f"IVF{nlist}_HNSW32,PQ{pq_m(d)},RFlat"),
        "hnswlib": lambda: Hnswlib(x, ids, threads=args.build_threads),
        # Where auto built HNSW32 (efConstruction 200, as here) the peer searches that very
        # graph through FAISS directly: the same structure, without building it twice.
        "faiss-HNSW32": lambda: Faiss("faiss HNSW32", "HNSW32", x, ids, "efSearch",
                                      index=systems["cbir"].si.index if shared_graph() else None),
        "faiss-IVF-Flat": lambda: Faiss("faiss IVF-Flat", f"IVF{nlist},Flat", x, ids, "nprobe"),
    }
    systems, builds = {}, {}

    def shared_graph() -> bool:
        return "cbir" in systems and systems["cbir"].desc == "HNSW32"

    for key in args.systems.split(","):
        faiss.omp_set_num_threads(args.build_threads)
        t1 = time.perf_counter()
        shared = key == "faiss-HNSW32" and shared_graph()
        systems[key] = makers[key]()
        builds[key] = builds["cbir"] if shared else (time.perf_counter() - t1, systems[key].nbytes() / 2**20)
        print(f"built {key:15s} {systems[key].desc:28s} in {builds[key][0]:6.1f} s, {builds[key][1]:7.0f} MiB",
              flush=True)

    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    rows = []
    with threadpool_limits(limits=1):  # every BLAS too: one thread everywhere
        for target in TARGETS:
            for key, system in systems.items():
                s, r = pick(system, target, q, gt, k)
                rows.append({"n": n, "data": dist, "target": target, "system": key, "desc": system.desc,
                             "setting": s, "recall@10": round(r, 4), "build_s": round(builds[key][0], 1),
                             "memory_mib": round(builds[key][1]), "single": [], "batch": []})
        tq = q[: args.timed]
        for rnd in range(args.rounds):  # interleaved: every config once per round, rotating order
            order = rows[rnd % len(rows):] + rows[: rnd % len(rows)]
            for row in order:
                system = systems[row["system"]]
                row["single"].append(time_single(system, tq, k, row["setting"]))
                row["batch"].append(time_batch(system, q, k, row["setting"]))
    for row in rows:
        ref = next(r for r in rows if r["system"] == "cbir" and r["target"] == row["target"]) if "cbir" in systems else None
        row["ms_single"] = round(statistics.median(row["single"]), 4)
        row["ms_batch"] = round(statistics.median(row["batch"]), 4)
        if ref is not None:
            row["vs_cbir_single"] = round(statistics.median(a / b for a, b in zip(row["single"], ref["single"])), 2)
            row["vs_cbir_batch"] = round(statistics.median(a / b for a, b in zip(row["batch"], ref["batch"])), 2)
    for row in rows:
        row.pop("single"), row.pop("batch")
    print(f"\n{'target':>6s} {'system':15s} {'index':28s} {'setting':26s} {'build s':>8s} {'MiB':>6s} "
          f"{'recall':>7s} {'ms/q 1':>8s} {'ms/q B':>8s} {'x cbir 1':>9s} {'x cbir B':>9s}")
    for row in rows:
        setting = ",".join(f"{a}={b}" for a, b in row["setting"].items())
        print(f"{row['target']:6.2f} {row['system']:15s} {row['desc']:28s} {setting:26s} {row['build_s']:8.1f} "
              f"{row['memory_mib']:6d} {row['recall@10']:7.3f} {row['ms_single']:8.3f} {row['ms_batch']:8.3f} "
              f"{row.get('vs_cbir_single', float('nan')):9.2f} {row.get('vs_cbir_batch', float('nan')):9.2f}")
    print(f"peak RSS so far: {vm_hwm_mib():.0f} MiB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    ap.add_argument("--data", default="clustered,calibrated", help="distributions: clustered, calibrated")
    ap.add_argument("--systems", default="cbir,hnswlib,faiss-HNSW32,faiss-IVF-Flat")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall (and the batched timing)")
    ap.add_argument("--timed", type=int, default=300, help="queries timed one at a time per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--build-threads", type=int, default=0, help="threads for building (0: all cores)")
    ap.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/datasets")
    ap.add_argument("--real-cache", type=Path, default=Path(tempfile.gettempdir()) / "cbir-real-descriptors.npz",
                    help="where the real descriptors are cached (extraction takes minutes)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.build_threads <= 0:
        args.build_threads = os.cpu_count() or 1

    gens = {"clustered": {}}
    if "calibrated" in args.data:
        real = real_descriptors(args.real_cache, args.datasets)
        allreal = np.concatenate(list(real.values()))
        print(f"\n{'descriptor set':34s} {'n':>6s} {'dim':>5s} {'LID':>6s} {'RC':>6s}")
        for name, xr in list(real.items()) + [("all real", allreal)]:
            st = descriptor_stats(xr)
            print(f"{name:34s} {st['n']:6d} {st['dim']:5d} {st['lid']:6.2f} {st['rc']:6.3f}")
        params, syn = calibrate(allreal, args.dim, args.clusters)
        gens["calibrated"] = params
        base = descriptor_stats(clustered(len(allreal), args.dim, args.clusters, seed=7))
        print(f"{'synthetic clustered (default)':34s} {base['n']:6d} {base['dim']:5d} {base['lid']:6.2f} {base['rc']:6.3f}")
        print(f"{'synthetic calibrated ' + str(params):34s} {syn['n']:6d} {syn['dim']:5d} {syn['lid']:6.2f} {syn['rc']:6.3f}",
              flush=True)
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        for dist in args.data.split(","):
            results += run(n, dist, gens[dist], args)
            if args.json:  # after each run: a long run killed later keeps what it measured
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
