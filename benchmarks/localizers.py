"""Localizers side by side under the multi-object protocol: one table per benchmark.

    .venv/bin/python benchmarks/localizers.py                      # whole, saliency, gt + every trained one
    .venv/bin/python benchmarks/localizers.py --localizers whole,pspnet --json out.json
    .venv/bin/python benchmarks/localizers.py --localizers whole,yolo,yolo+SV50   # + re-ranking steps

The database is extracted once per benchmark and the acceptance threshold calibrated once on
it (edits of the database images, `cbir.identify`), so every localizer is scored on the same
vectors and threshold. Times are CPU ms per photo on this machine, with the ratio to `whole`
measured in the same run (absolute times vary with load; the ratio much less).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
BENCHMARKS = {"museum-multi": (DATASETS / "museum-multi", ()), "museum background": (DATASETS / "museum", ("background",))}
COLUMNS = [("object_map", "object mAP"), ("det_ap50", "det AP50"), ("det_ap", "det AP"), ("count_accuracy", "count acc"),
           ("mask_f1", "pixel F1"), ("mask_iou", "pixel IoU"), ("mask_precision", "pixel P"), ("mask_recall", "pixel R"),
           ("id_precision", "id P"), ("id_recall", "id R"), ("id_rejection", "id rej"), ("map", "photo mAP")]


def main() -> None:
    from cbir.datasets import load_benchmark
    from cbir.evaluation.objects import evaluate_objects
    from cbir.identify import calibrate, top2_in
    from cbir.localize import LocalizerError, list_localizers
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, resolve_spec
    from cbir.rerank import check_order, parse_rerank

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--localizers", default=None, help="comma-separated; default: whole, every registered one, gt; "
                    "NAME+STEPS adds re-ranking steps to the search (yolo+SV50, saliency+QE5+SV50)")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    ap.add_argument("--json", type=Path, help="also write every figure here")
    a = ap.parse_args()
    names = a.localizers.split(",") if a.localizers else ["whole"] + [n for n in list_localizers() if n != "whole"] + ["gt"]
    out: dict = {}
    for bname in a.benchmarks.split(","):
        root, tags = BENCHMARKS[bname]
        if not (root / "gt.json").exists():
            sys.exit(f"needs {root} (../shared/datasets beside the repository)")
        bench = load_benchmark(root).with_tags(tags)
        ex = Extractor(resolve_spec(DEFAULT_PIPELINE))
        paths = [bench.path(p) for p in bench.database]
        db = ex.extract(paths)
        cal = calibrate(lambda imgs: ex.extract(imgs), paths, top2_in(db), warn=lambda m: None)
        rows = {}
        for name in names:
            localizer, *tokens = name.split("+")
            steps = [parse_rerank(t) for t in tokens]
            if None in steps:
                sys.exit(f"{name}: not a re-ranking step in {tokens} (see `cbir pipelines`)")
            check_order(steps)
            try:
                s, _, _ = evaluate_objects(bench, ex, localizer, db, steps, calibration=cal, warn=lambda m: None)
            except LocalizerError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
                continue
            rows[name] = s
            print(f"{bname} {name}: object mAP {s['object_map']:.4f}", file=sys.stderr)
        base = rows.get("whole", {}).get("search_ms_per_image")
        print(f"\n{bname} ({len(bench.queries)} photos; acceptance threshold {cal.threshold:.3f})\n")
        print("| localizer | " + " | ".join(h for _, h in COLUMNS) + " | localize ms | localize+search ms | vs whole |")
        print("|---" * (len(COLUMNS) + 4) + "|")
        for name, s in rows.items():
            ratio = f"{s['search_ms_per_image'] / base:.1f}x" if base else "-"
            print(f"| `{name}` | " + " | ".join(f"{s[k]:.3f}" for k, _ in COLUMNS) +
                  f" | {s['localize_ms_per_image']:.0f} | {s['search_ms_per_image']:.0f} | {ratio} |")
        out[bname] = rows
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
