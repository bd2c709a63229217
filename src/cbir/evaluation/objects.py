"""The multi-object protocol (``../shared/datasets/README.md``): localize, then search each object.

Every photo is answered with predicted objects (a `Region` each: box, optional polygon and
mask, score) and, per object, a ranking of the database. Measured, as the README defines:

- detection: predicted boxes against every object's box (also those not in the collection),
  one class, COCO AP@[.5:.95] and AP50 (`cbir.metrics.detection`);
- masks: the union of the predicted masks (boxes where a region has none) against the photo's
  mask, pixel precision / recall / F1 / IoU per photo, averaged over photos;
- object mAP: each object in the collection is matched to the prediction of highest IoU >= 0.5
  (greedy, each prediction used once); its AP is that prediction's ranking's AP, 0 unmatched;
- identification: a prediction names its top-1 when the score passes the acceptance threshold
  (`cbir.identify`, calibrated on the database, never on the queries);
- count accuracy: photos with as many predictions as objects.

A photo-level ranking (each database image scored by its best region) gives ``map``, so the
``whole`` localizer reproduces what searching the whole photo scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cbir.datasets import Benchmark, DatasetError, GroundTruthObject, Query
from cbir.evaluation.ranking import interpolated_pr, similarities
from cbir.identify import Calibration, calibrate, top2_in
from cbir.images import ImageError, open_image
from cbir.localize import Localizer, Region, create_localizer
from cbir.localize.geometry import extraction_source
from cbir.metrics.classification import precision_recall_fscore
from cbir.metrics.detection import DetectionMAP
from cbir.metrics.retrieval import RetrievalMAP, positive_ranks
from cbir.pipeline import Extractor
from cbir.verify import SpatialVerifier, verifier_for

MATCH_IOU = 0.5


class GroundTruthBoxes(Localizer):
    """The benchmark's own object boxes as predictions: the upper bound localization can reach."""

    name = "gt"

    def __init__(self) -> None:
        self.objects: list[GroundTruthObject] = []

    def localize(self, image: Image.Image) -> list[Region]:
        return [Region(o.bbox, 1.0) for o in self.objects]


def photo_objects(q: Query, size: tuple[int, int]) -> list[GroundTruthObject]:
    """A query's objects: its ``objects`` (maybe none), else its box, else the whole photo."""
    if q.objects is not None:
        return list(q.objects)
    w, h = size
    return [GroundTruthObject(q.bbox if q.bbox else (0.0, 0.0, float(w), float(h)), q.positives)]


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(len(a), len(b))`` of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def greedy_match(iou: np.ndarray, threshold: float = MATCH_IOU) -> dict[int, int]:
    """Rows (objects) -> columns (predictions), highest IoU first, each used once, IoU >= threshold."""
    pairs = [(iou[i, j], i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1]) if iou[i, j] >= threshold]
    out, used = {}, set()
    for _, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def union_mask(regions: list[Region], size: tuple[int, int]) -> np.ndarray:
    """bool ``(H, W)``: the regions' masks, their boxes where a region has none."""
    w, h = size
    m = np.zeros((h, w), bool)
    for r in regions:
        if r.mask is not None and r.mask.shape == (h, w):
            m |= r.mask
        else:
            x0, y0, x1, y1 = (int(round(v)) for v in r.box)
            m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return m


def ground_truth_mask(bench: Benchmark, q: Query, objects: list[GroundTruthObject], size: tuple[int, int]) -> np.ndarray:
    """The photo's mask PNG (checked against the photo and its objects), else the objects' boxes."""
    w, h = size
    if q.mask is None:
        return union_mask([Region(o.bbox) for o in objects], size)
    try:
        with Image.open(bench.path(q.mask)) as im:
            mask = np.asarray(im.convert("L")) > 127
    except (OSError, ValueError) as e:
        raise DatasetError(f"{bench.path(q.mask)}: cannot read the mask ({e})") from None
    if mask.shape != (h, w):
        raise DatasetError(f"{bench.path(q.mask)}: mask is {mask.shape[1]}x{mask.shape[0]} but its photo "
                           f"{q.image} is {w}x{h}")
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
            raise DatasetError(f"{q.image}: object box {list(o.bbox)} lies outside its {w}x{h} mask and photo")
    return mask


def mask_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Pixel precision, recall, F1 and IoU of the object class in one photo.

    Nothing predicted has precision 1 (no wrong pixel); nothing to find has recall 1; so a bare
    wall answered with nothing scores 1 throughout, and anything else as usual.
    """
    cm = np.bincount(gt.ravel().astype(np.int64) * 2 + pred.ravel().astype(np.int64), minlength=4).reshape(2, 2)
    p, r, _, _ = precision_recall_fscore(cm, None, zero_division=1.0)
    p, r = float(p[1]), float(r[1])
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "iou": float(tp / (tp + fp + fn)) if tp + fp + fn else 1.0}


@dataclass
class PhotoResult:
    """One photo: its ground truth, what the localizer found, and each region's similarities."""

    query: Query
    objects: list[GroundTruthObject]
    regions: list[Region]
    sims: np.ndarray  # (R, N) region x database similarities (-inf: unreadable database image)
    localize_ms: float
    total_ms: float
    mask_scores: dict[str, float]
    readable: bool = True


def run_photos(bench: Benchmark, extractor: Extractor, localizer: Localizer, db: np.ndarray,
               similarity: Callable[[np.ndarray], np.ndarray], queries: list[Query],
               warn: Callable[[str], None] = print, progress: Callable | None = None,
               verifier: SpatialVerifier | None = None) -> list[PhotoResult]:
    """Localize and search every query photo (once per distinct image); ``verifier``: each
    region's shortlist re-ordered by spatial verification (`cbir.verify`, the ``SV`` step)."""
    out: list[PhotoResult] = []
    bar = progress(total=len(queries), desc="photos", unit="img") if progress else None
    for q in queries:
        t0 = time.perf_counter()
        try:
            image = open_image(bench.path(q.image))
        except ImageError as e:
            warn(f"warning: {e}")
            out.append(PhotoResult(q, [], [], np.zeros((0, len(db)), np.float32), 0.0, 0.0,
                                   {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0}, readable=False))
            if bar:
                bar.update(1)
            continue
        objects = photo_objects(q, image.size)
        if isinstance(localizer, GroundTruthBoxes):
            localizer.objects = objects
        regions = localizer(image)
        t1 = time.perf_counter()
        if regions:
            sources = [extraction_source(bench.path(q.image), image, r) for r in regions]
            vecs = extractor.extract(sources, on_error=lambda i, e: warn(f"warning: {q.image} region {i}: {e}"))
            sims = similarity(vecs)
            if verifier is not None:
                for i, source in enumerate(sources):
                    crop = source if isinstance(source, Image.Image) else image
                    sims[i] = verifier.rerank(crop, sims[i], lambda j: bench.path(bench.database[j]))
        else:
            sims = np.zeros((0, len(db)), np.float32)
        t2 = time.perf_counter()
        gt_mask = ground_truth_mask(bench, q, objects, image.size)
        out.append(PhotoResult(q, objects, regions, sims, 1000 * (t1 - t0), 1000 * (t2 - t0),
                               mask_scores(union_mask(regions, image.size), gt_mask)))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out


def score_photos(bench: Benchmark, photos: list[PhotoResult], db: np.ndarray, threshold: float) -> tuple[dict, list[dict], dict]:
    """The protocol's figures from localized, searched photos: (summary, per-object rows, curves)."""
    db_ids = np.asarray(bench.database, dtype=object)
    valid_db = ~np.isnan(db[:, 0])
    det = DetectionMAP(style="coco")
    obj_metric, photo_metric = RetrievalMAP(), RetrievalMAP()
    pr: dict[str, list[np.ndarray]] = {}
    rows: list[dict] = []
    named = correct_names = known = known_named_right = unknown = unknown_rejected = 0
    count_ok = 0
    for ph in photos:
        q, regions = ph.query, ph.regions
        pred_boxes = np.asarray([r.box for r in regions], np.float64).reshape(-1, 4)
        gt_boxes = np.asarray([o.bbox for o in ph.objects], np.float64).reshape(-1, 4)
        det.update({"boxes": pred_boxes, "scores": np.asarray([r.score for r in regions], np.float64),
                    "labels": np.zeros(len(regions), np.int64)},
                   {"boxes": gt_boxes, "labels": np.zeros(len(gt_boxes), np.int64)})
        count_ok += len(regions) == len(ph.objects)
        orders = [np.argsort(-s, kind="stable") for s in ph.sims]
        rankings = [db_ids[o][valid_db[o]] for o in orders]
        top = [(str(r[0]) if len(r) else "", float(s[o[0]]) if len(r) else -np.inf) for r, s, o in zip(rankings, ph.sims, orders)]
        accepted = [score >= threshold for _, score in top]
        # Photo level: each database image scored by its best region.
        if len(ph.sims):
            o = np.argsort(-ph.sims.max(axis=0), kind="stable")
            photo_ranking = db_ids[o][valid_db[o]]
        else:
            photo_ranking = np.asarray([], dtype=object)
        if photo_metric.update(photo_ranking, q.positives, q.junk, q.tags) is not None:
            pos = set(q.positives) - set(q.junk)
            curve = interpolated_pr(positive_ranks(photo_ranking, pos, q.junk), len(pos))
            for tag in ("all",) + q.tags:
                pr.setdefault(tag, []).append(curve)
        # Object mAP: objects in the collection, matched greedily at IoU >= 0.5.
        iou = box_iou_matrix(gt_boxes, pred_boxes)
        in_coll = [i for i, o in enumerate(ph.objects) if o.positives]
        match_known = greedy_match(iou[in_coll]) if in_coll else {}
        match_known = {in_coll[i]: j for i, j in match_known.items()}
        # Identification: every object (also unknowns) matched the same way.
        match_all = greedy_match(iou)
        matched_preds = set(match_all.values())
        for i, o in enumerate(ph.objects):
            j = match_known.get(i) if o.positives else match_all.get(i)
            ap = None
            if o.positives:
                ranking = rankings[j] if j is not None else []
                ap = obj_metric.update(ranking, o.positives, q.junk, q.tags)
                if ap is None:  # every positive is junk: not scored
                    continue
            name, score = top[j] if j is not None else ("", float("nan"))
            is_named = j is not None and accepted[j]
            right = is_named and name in o.positives
            if o.positives:
                known += 1
                known_named_right += right
            else:
                unknown += 1
                unknown_rejected += not is_named
            rows.append({"query": q.image, "object": i, "tags": " ".join(q.tags),
                         "in_collection": bool(o.positives), "iou": round(float(iou[i, j]), 4) if j is not None else 0.0,
                         "ap": round(ap, 6) if ap is not None else "", "top1": name,
                         "score": round(score, 5) if np.isfinite(score) else "", "named": is_named, "correct": right})
        for j in range(len(regions)):
            named += accepted[j]
            correct_names += accepted[j] and any(top[j][0] in ph.objects[i].positives
                                                 for i, jj in match_all.items() if jj == j)
            if j not in matched_preds:
                unknown += 1
                unknown_rejected += not accepted[j]
    d = det.compute()
    objs, photo = obj_metric.compute(), photo_metric.compute()
    readable = [p for p in photos if p.readable]
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    summary = {
        "map": photo["map"], "map_by_tag": photo["map_by_tag"],
        "precision_at": photo["precision_at"], "recall_at": photo["recall_at"],
        "n_queries": len(photos), "n_skipped": photo["n_skipped"],
        "n_queries_unreadable": sum(not p.readable for p in photos),
        "det_ap": max(0.0, d["map"]), "det_ap50": max(0.0, d.get("map_50", 0.0)),
        "mask_precision": mean([p.mask_scores["precision"] for p in readable]),
        "mask_recall": mean([p.mask_scores["recall"] for p in readable]),
        "mask_f1": mean([p.mask_scores["f1"] for p in readable]),
        "mask_iou": mean([p.mask_scores["iou"] for p in readable]),
        "object_map": objs["map"], "object_map_by_tag": objs["map_by_tag"],
        "n_objects": objs["n_queries"], "n_objects_unknown": sum(1 for p in photos for o in p.objects if not o.positives),
        "id_precision": correct_names / named if named else 0.0,
        "id_recall": known_named_right / known if known else 0.0,
        "id_rejection": unknown_rejected / unknown if unknown else 1.0,
        "accept_threshold": threshold,
        "count_accuracy": count_ok / len(photos) if photos else 0.0,
        "localize_ms_per_image": mean([p.localize_ms for p in readable]),
        "search_ms_per_image": mean([p.total_ms for p in readable]),
    }
    recall, precision = det.pr_curve(0.5)
    curves = {t: np.mean(v, axis=0) for t, v in pr.items()}
    return summary, rows, {"retrieval": curves, "detection": (recall, precision)}


def evaluate_objects(bench: Benchmark, extractor: Extractor, localizer: str | Localizer | None,
                     db: np.ndarray, rerankers=(), warn: Callable[[str], None] = print,
                     progress: Callable | None = None,
                     calibration: Calibration | None = None) -> tuple[dict, list[dict], dict]:
    """The multi-object protocol over ``bench``'s queries, with database descriptors ``db``
    already extracted (rows in ``bench.database`` order). ``calibration``: the acceptance
    threshold; by default calibrated now on edits of the database images (`cbir.identify`)."""
    if isinstance(localizer, Localizer):
        loc = localizer
    elif localizer == "gt":
        loc = GroundTruthBoxes()
    else:
        loc = create_localizer(localizer)
    # One photo, one answer: the Revisited protocols list a photo once per difficulty.
    queries = list({q.image: q for q in bench.queries}.values())
    if calibration is None:
        db_paths = [bench.path(p) for p in bench.database]
        calibration = calibrate(lambda imgs: extractor.extract(imgs), db_paths, top2_in(db), warn=warn)
    photos = run_photos(bench, extractor, loc, db, lambda v: similarities(v, db, rerankers), queries, warn, progress,
                        verifier_for(rerankers))
    summary, rows, curves = score_photos(bench, photos, db, calibration.threshold)
    summary["localizer"] = loc.name
    summary["calibration"] = calibration.to_json()
    return summary, rows, curves
