"""Load benchmark of the search service: N concurrent clients on loopback, search by upload.

Starts `cbir serve` on a free 127.0.0.1 port over an index, then for each client count sends
a bounded number of `POST /api/search` requests (query images round-robin, k=10) from that
many threads with keep-alive connections, and prints requests/s and p50/p99 latency.

The baseline, measured in this process before the load, is `Searcher.search` on the same
query bytes without HTTP: its per-query time is what one search costs the engine. The ratios
show what HTTP, multipart parsing, the server and concurrency add (latency) and how much of the
engine's serial throughput the server delivers (throughput).

    .venv/bin/python benchmarks/serve_load.py                       # museum set if ../shared exists
    .venv/bin/python benchmarks/serve_load.py --index IDX --queries DIR --clients 1,2,4,8

Everything runs on loopback; every loop is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT.parent / "shared" / "datasets" / "museum"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def default_index(cache: Path) -> tuple[Path, list[Path]]:
    """The museum set's index (built once into ``cache``) and its plain queries; else the sample photos."""
    from cbir.index import update_index
    from cbir.service import samples

    if (MUSEUM / "gt.json").exists():
        index = cache / "museum-index"
        if not (index / "index.json").exists():
            print(f"building the museum index in {index} (once; about a minute)...", file=sys.stderr)
        update_index(MUSEUM / "database", index, warn=lambda *_: None)
        queries = sorted((MUSEUM / "queries").glob("qsd1_*.jpg"))[:20]
        return index, queries
    _, index = samples.build_index(cache / "samples")
    qdir = cache / "samples" / "queries"
    qdir.mkdir(exist_ok=True)
    queries = []
    for name in samples.PHOTOS:
        q = qdir / f"{name}-crop.jpg"
        q.write_bytes(samples.crop_query(name))
        queries.append(q)
    return index, queries


def baseline(searcher, queries: list[bytes], rounds: int) -> list[float]:
    """ms of each in-process `Searcher.search` (no HTTP) over the queries."""
    s = searcher
    s.search(queries[0], 10)  # warm up
    times = []
    for i in range(rounds):
        q = queries[i % len(queries)]
        t0 = time.perf_counter()
        s.search(q, 10)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def load(url: str, queries: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def worker():
        # TCP_NODELAY, as browsers do: without it the request's header and body writes meet
        # Nagle's algorithm and delayed ACKs, and every request waits ~40 ms for nothing.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=url, timeout=60, transport=transport) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                files = {"file": (f"q{i}.jpg", queries[i % len(queries)], "image/jpeg")}
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/search", files=files, data={"k": "10"})
                    ok = r.status_code == 200
                    why = f"{r.status_code} {r.text[:100]}"
                    sms = r.json()["ms"] if ok else None
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    if ok:
                        lat.append(ms)
                        server_ms.append(sms)
                    else:
                        errors.append(why)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "n": len(lat), "errors": len(errors), "first_error": errors[0] if errors else "",
            "rps": len(lat) / wall, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "server_p50": percentile(server_ms, 50)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, help="Index directory (default: the museum set's, else the sample photos').")
    ap.add_argument("--queries", type=Path, help="Folder of query images (default: the index's benchmark queries).")
    ap.add_argument("--clients", default="1,2,4,8", help="Comma-separated client counts.")
    ap.add_argument("--requests", type=int, default=80, help="Requests per client count.")
    ap.add_argument("--max-seconds", type=float, default=60, help="Time bound per client count.")
    ap.add_argument("--workers", type=int, default=2, help="`cbir serve --workers` (concurrent extractions).")
    ap.add_argument("--threads", type=int, default=None, help="`cbir serve --threads` (ONNX Runtime threads each).")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cbir-serve-bench",
                    help="Where a default index is built once and kept.")
    a = ap.parse_args()

    from cbir.images import list_images
    from cbir.service.process import running_server

    if a.index:
        index = a.index
        qpaths = list_images(a.queries) if a.queries else []
        if not qpaths:
            ap.error("--index needs --queries DIR")
    else:
        index, qpaths = default_index(a.cache)
        if a.queries:
            qpaths = list_images(a.queries)
    queries = [p.read_bytes() for p in qpaths[:50]]
    counts = [int(c) for c in a.clients.split(",")]

    import os

    from cbir.index import Searcher

    # The baseline is taken before and after the load, and the median of both used: on a
    # shared machine the background load drifts, and this keeps the ratios honest.
    searcher = Searcher(index)
    # As many ONNX Runtime threads as one server worker gets, so that at one client the ratio
    # is what HTTP and the server add, not a difference in threading.
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    searcher.extractor.threads = threads
    rounds = max(10, len(queries))
    before = baseline(searcher, queries, rounds)
    extra = ["--read-only", "--workers", str(a.workers)] + (["--threads", str(a.threads)] if a.threads else [])
    from cbir.index import Index

    n_images = len(Index(index))
    print(f"index {index} ({n_images} images), {len(queries)} query images, {os.cpu_count()} CPU cores, "
          f"server --workers {a.workers} --threads {threads}")
    rows = []
    with running_server(index, *extra) as url:
        load(url, queries, 1, min(5, a.requests), 30)  # warm up the server
        for c in counts:
            rows.append(load(url, queries, c, a.requests, a.max_seconds))
    after = baseline(searcher, queries, rounds)
    base_ms = statistics.median(before + after)
    serial_rps = 1000 / base_ms
    print(f"baseline: Searcher.search in-process, no HTTP, {threads} ONNX Runtime thread(s): {base_ms:.1f} ms/query "
          f"(median; {statistics.median(before):.1f} "
          f"before the load, {statistics.median(after):.1f} after) = {serial_rps:.1f} queries/s serial\n")
    head = (f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'server p50':>10} {'p50/baseline':>12} {'req/s/serial':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['clients']:>7} {r['n']:>8} {r['errors']:>6} {r['rps']:>7.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
              f"{r['server_p50']:>10.1f} {r['p50'] / base_ms:>11.2f}x {r['rps'] / serial_rps:>11.2f}x")
    print("\nlatency is as the client sees it; `server p50`: the server's own time for the search (decode, "
          "network, k-NN), without HTTP and without waiting for a free worker")
    bad = [r for r in rows if r["errors"]]
    for r in bad:
        print(f"{r['clients']} clients: {r['errors']} failed requests, e.g. {r['first_error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
