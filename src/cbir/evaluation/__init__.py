"""Evaluate a pipeline on a benchmark: extract, re-rank (`cbir.rerank`), rank by inner product,
score with `cbir.metrics`; with a localizer, by the multi-object protocol (`cbir.evaluation.objects`).

Queries that share an image and box are extracted once (the Revisited protocols list each query
three times). Unreadable database images are left out of every ranking, with a warning; an
unreadable query scores AP 0 (so a broken file never raises the mAP) and is counted in
``n_queries_unreadable``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbir.datasets import Benchmark
from cbir.images import ImageError, open_image
from cbir.metrics.retrieval import RetrievalMAP, ap_from_positive_ranks, positive_ranks, ukbench_ns_score
from cbir.pipeline import Extractor
from cbir.evaluation.ranking import RECALL_GRID, interpolated_pr, similarities
from cbir.rerank import Reranker
from cbir.verify import verifier_for


@dataclass
class EvalResult:
    summary: dict
    per_query: list[dict] = field(default_factory=list)  # one row per query (per object with a localizer)
    pr_curves: dict[str, np.ndarray] = field(default_factory=dict)  # tag -> precision on RECALL_GRID
    detection_pr: tuple[np.ndarray, np.ndarray] | None = None  # (recall, precision) at IoU 0.5

    def write_per_query(self, path: str | Path) -> None:
        fields = list(self.per_query[0]) if self.per_query else ["query", "tags", "ap"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.per_query)

    def plot(self, path: str | Path) -> None:
        """Mean interpolated precision-recall curve, overall and per tag; beside it, with a
        localizer, the detection precision-recall curve at IoU 0.5."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if self.detection_pr is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
        ax = axes[0, 0]
        for tag, prec in self.pr_curves.items():
            label = f"{tag} (mAP {self.summary['map'] if tag == 'all' else self.summary['map_by_tag'][tag]:.3f})"
            ax.plot(RECALL_GRID, prec, lw=2.5 if tag == "all" else 1.2, label=label)
        title = f"{self.summary['benchmark']}: {self.summary['pipeline']}"
        if "localizer" in self.summary:
            title += f"\nlocalizer {self.summary['localizer']}: photo-level ranking"
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
        if self.detection_pr is not None:
            ax = axes[0, 1]
            recall, precision = self.detection_pr
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            ax.plot(recall, precision, lw=1, alpha=0.5, label="precision")
            ax.plot(recall, envelope, lw=2.5, label=f"envelope (AP50 {self.summary['det_ap50']:.3f})")
            ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
                   title=f"detection, IoU 0.5 ({self.summary['localizer']})")
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def evaluate(bench: Benchmark, extractor: Extractor, crop: bool = True, fit_on: list[Path] | None = None,
             warn: Callable[[str], None] = print, progress: Callable | None = None, fit_labels: list | None = None,
             localizer=None) -> EvalResult:
    """Score ``extractor`` on ``bench``; ``crop`` uses the queries' boxes when they have one.

    ``fit_labels`` (one per ``fit_on`` image) are for learned layer weights (``Wlearn``).
    ``localizer`` (a name such as ``"saliency"``, ``"gt"`` or ``"whole"``, or a `Localizer`):
    score by the multi-object protocol instead, every query photo localized first.
    """

    def on_error(i: int, e: ImageError) -> None:
        warn(f"warning: {e}")

    if extractor.needs_fit:
        if not fit_on:
            raise ValueError(f"pipeline {extractor.spec} has learned steps: give a separate image set to fit them "
                             "on (--fit-on DIR)")
        extractor.fit(fit_on, on_error=on_error, labels=fit_labels)
    t0 = time.perf_counter()
    db_paths = [bench.path(p) for p in bench.database]
    db = _extract(extractor, db_paths, None, on_error, progress, "database")
    if np.isnan(db[:, 0]).all():
        raise ValueError(f"{bench.name}: no database image could be read")
    t_db = time.perf_counter() - t0
    info = {"pipeline": str(extractor.spec), "extract_ms_per_image": round(1000 * t_db / max(1, len(db_paths)), 2)}
    if localizer is not None:
        from cbir.evaluation.objects import evaluate_objects

        summary, rows, curves = evaluate_objects(bench, extractor, localizer, db, extractor.rerankers, warn, progress)
        summary.update({"benchmark": bench.name, "n_database": len(bench.database),
                        "n_database_unreadable": int(np.isnan(db[:, 0]).sum()), "dim": int(db.shape[1]), **info})
        return EvalResult(summary, rows, curves["retrieval"], curves["detection"])
    keys = list(query_keys(bench, crop))
    q_vecs = _extract(extractor, [bench.path(k[0]) for k in keys], [k[1] for k in keys], on_error, progress, "queries")
    sims = None
    if (verifier := verifier_for(extractor.rerankers)) is not None:
        sims = similarities(q_vecs, db, extractor.rerankers)
        for row, (image, box) in enumerate(keys):
            try:
                query = open_image(bench.path(image), bbox=box)
            except ImageError:  # unreadable: already AP 0 (its vector is NaN)
                continue
            sims[row] = verifier.rerank(query, sims[row], lambda j: bench.path(bench.database[j]))
    return score_vectors(bench, db, q_vecs, crop, extractor.rerankers, info, sims)


def query_keys(bench: Benchmark, crop: bool = True) -> dict[tuple, int]:
    """Distinct (image, box) of the queries -> row in the query matrix, in first-seen order."""
    unique: dict[tuple, int] = {}
    for q in bench.queries:
        unique.setdefault((q.image, q.bbox if crop else None), len(unique))
    return unique


def score_vectors(bench: Benchmark, db: np.ndarray, q_vecs: np.ndarray, crop: bool = True,
                  rerankers: list[Reranker] | tuple = (), extra: dict | None = None,
                  sims: np.ndarray | None = None) -> EvalResult:
    """Rank ``db`` (rows in ``bench.database`` order) for ``q_vecs`` (rows as `query_keys`) and
    score; ``sims (Q, N)``, if given, are the final similarities (spatially verified, say)."""
    unique = query_keys(bench, crop)
    valid_db = ~np.isnan(db[:, 0])
    db_ids = np.asarray(bench.database, dtype=object)
    sims = similarities(q_vecs, db, rerankers) if sims is None else sims
    order = np.argsort(-sims, axis=1, kind="stable")

    metric = RetrievalMAP()
    per_query, curves, ns, unreadable_q = [], {}, [], 0
    for q in bench.queries:
        row = unique[(q.image, q.bbox if crop else None)]
        readable = not np.isnan(q_vecs[row, 0])
        ranking = db_ids[order[row]][valid_db[order[row]]] if readable else np.asarray([], dtype=object)
        ap = metric.update(ranking, q.positives, q.junk, q.tags)
        if ap is None:
            continue
        unreadable_q += not readable  # counted in n_queries, it scores AP 0
        pos = set(q.positives) - set(q.junk)
        ranks = positive_ranks(ranking, pos, q.junk)
        pr = interpolated_pr(ranks, len(pos))
        for tag in ("all",) + q.tags:
            curves.setdefault(tag, []).append(pr)
        if bench.kind == "ukbench":
            ns.append(ukbench_ns_score(ranks))
        per_query.append({"query": q.image, "tags": " ".join(q.tags), "ap": round(ap, 6), "n_positives": len(pos),
                          "first_positive_rank": int(ranks.min()) if ranks.size else -1,
                          "top1": str(ranking[0]) if len(ranking) else ""})
    summary = metric.compute()
    summary.update({"benchmark": bench.name, "n_database": len(bench.database),
                    "n_database_unreadable": int((~valid_db).sum()), "n_queries_unreadable": unreadable_q,
                    "dim": int(db.shape[1]), "crop_queries": crop, **(extra or {})})
    if ns:
        summary["ukbench_ns"] = float(np.mean(ns))
    return EvalResult(summary, per_query, {t: np.mean(v, axis=0) for t, v in curves.items()})


def _extract(extractor: Extractor, paths, bboxes, on_error, progress, what: str) -> np.ndarray:
    bar = progress(total=len(paths), desc=what, unit="img") if progress else None
    out = extractor.extract(paths, bboxes, on_error, bar.update if bar else None)
    if bar:
        bar.close()
    return out


def format_summary(s: dict) -> str:
    if "localizer" in s:
        return format_objects_summary(s)
    lines = [f"benchmark {s['benchmark']}: {s['n_queries']} queries, {s['n_database']} database images",
             f"pipeline  {s['pipeline']}  (dim {s['dim']}, {s['extract_ms_per_image']} ms/image)", "",
             f"{'subset':14s} {'mAP':>7s}", f"{'all':14s} {s['map']:7.4f}"]
    lines += [f"{tag:14s} {v:7.4f}" for tag, v in s["map_by_tag"].items()]
    lines += ["", "  ".join(f"P@{k}={v:.3f}" for k, v in s["precision_at"].items()) + "   " +
              "  ".join(f"R@{k}={v:.3f}" for k, v in s["recall_at"].items())]
    if "ukbench_ns" in s:
        lines.append(f"UKBench N-S score: {s['ukbench_ns']:.3f} / 4")
    if s.get("n_database_unreadable"):
        lines.append(f"{s['n_database_unreadable']} database image(s) unreadable, left out")
    if s.get("n_queries_unreadable"):
        lines.append(f"{s['n_queries_unreadable']} query image(s) unreadable, scored AP 0 (listed above)")
    return "\n".join(lines)


def format_objects_summary(s: dict) -> str:
    """The multi-object protocol's figures as a short table."""
    lines = [f"benchmark {s['benchmark']}: {s['n_queries']} photos, {s['n_objects']} objects in the collection "
             f"(+{s['n_objects_unknown']} not), {s['n_database']} database images",
             f"pipeline  {s['pipeline']}  localizer {s['localizer']}  "
             f"({s['localize_ms_per_image']:.0f} ms/photo to localize, {s['search_ms_per_image']:.0f} ms with extraction)", "",
             f"{'object mAP':18s} {s['object_map']:.4f}   (photo-level mAP {s['map']:.4f})"]
    lines += [f"  {tag:16s} {v:.4f}" for tag, v in s["object_map_by_tag"].items()]
    lines += [f"{'detection':18s} AP {s['det_ap']:.4f}  AP50 {s['det_ap50']:.4f}  count accuracy {s['count_accuracy']:.3f}",
              f"{'masks':18s} precision {s['mask_precision']:.4f}  recall {s['mask_recall']:.4f}  "
              f"F1 {s['mask_f1']:.4f}  IoU {s['mask_iou']:.4f}",
              f"{'identification':18s} precision {s['id_precision']:.3f}  recall {s['id_recall']:.3f}  "
              f"rejection {s['id_rejection']:.3f}  (threshold {s['accept_threshold']:.3f}, calibrated on the database)"]
    if s.get("n_queries_unreadable"):
        lines.append(f"{s['n_queries_unreadable']} query photo(s) unreadable, scored as finding nothing")
    return "\n".join(lines)


__all__ = ["EvalResult", "evaluate", "format_summary", "interpolated_pr", "ap_from_positive_ranks", "query_keys",
           "score_vectors", "similarities"]
