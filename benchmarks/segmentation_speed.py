"""Throughput of the segmentation confusion matrix: one bincount vs naive baselines.

    OMP_NUM_THREADS=1 python benchmarks/segmentation_speed.py [--mpix 4] [--classes 19] [--repeat 5]

Every method gets the same Cityscapes-like batch (19 classes, 10% of pixels = 255 ignored)
in the same process, single-threaded; the table gives the best of ``--repeat`` runs in
Mpixel/s and the speed-up of ``cbir.metrics`` over each baseline. Baselines:

* ``per-class masks``: for each class, boolean masks of target and prediction and three
  reductions (TP, FP, FN), as a textbook IoU loop does;
* ``sklearn``: ``sklearn.metrics.confusion_matrix`` on the valid pixels.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from cbir.metrics.classification import confusion_matrix  # noqa: E402


def per_class_masks(target: np.ndarray, pred: np.ndarray, n: int, ignore: int) -> np.ndarray:
    valid = target != ignore
    out = np.zeros((n, 3), dtype=np.int64)
    for c in range(n):
        t, p = (target == c) & valid, (pred == c) & valid
        out[c] = np.count_nonzero(t & p), np.count_nonzero(p & ~t), np.count_nonzero(t & ~p)
    return out


def sklearn_cm(target: np.ndarray, pred: np.ndarray, n: int, ignore: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix as sk_cm

    valid = target != ignore
    return sk_cm(target[valid], pred[valid], labels=np.arange(n))


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (page faults, imports)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpix", type=float, default=4.0, help="megapixels per batch")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    n, ignore = args.classes, 255
    size = int(args.mpix * 1e6)
    r = np.random.default_rng(0)
    target = r.integers(0, n, size).astype(np.uint8)
    target[r.random(size) < 0.1] = ignore
    pred64 = np.where(r.random(size) < 0.7, np.minimum(target, n - 1), r.integers(0, n, size)).astype(np.int64)
    pred8 = pred64.astype(np.uint8)

    # Same answer from every method before timing anything.
    cm = confusion_matrix(target, pred64, n, ignore)
    assert np.array_equal(cm, sklearn_cm(target, pred64, n, ignore))
    tp = np.diag(cm)
    assert np.array_equal(per_class_masks(target, pred64, n, ignore), np.c_[tp, cm.sum(0) - tp, cm.sum(1) - tp])

    rows = [
        ("cbir bincount", "uint8 / uint8", lambda: confusion_matrix(target, pred8, n, ignore)),
        ("cbir bincount", "uint8 / int64", lambda: confusion_matrix(target, pred64, n, ignore)),
        ("per-class masks", "uint8 / int64", lambda: per_class_masks(target, pred64, n, ignore)),
        ("sklearn", "uint8 / int64", lambda: sklearn_cm(target, pred64, n, ignore)),
    ]
    results = [(name, dt, size / best_time(fn, args.repeat) / 1e6) for name, dt, fn in rows]
    ours = results[1][2]  # the common case: uint8 label maps vs int64 argmax output
    print(f"{size / 1e6:.1f} Mpixel batch, {n} classes, 10% ignored, best of {args.repeat}, OMP_NUM_THREADS=1")
    print(f"{'method':<18}{'target / pred':<16}{'Mpixel/s':>10}{'cbir (int64) x':>16}")
    for name, dt, mps in results:
        print(f"{name:<18}{dt:<16}{mps:>10.1f}{ours / mps:>16.1f}")


if __name__ == "__main__":
    main()
