"""``cbir compare``: evaluate a grid of pipelines on one benchmark, sharing the forward passes.

Pipelines that share a backbone, input size, scales and region method form a group: the network
runs once per image with the union of the group's layers, and each pipeline pools, fuses, encodes
and post-processes those maps its own way. So a grid of twenty poolings costs about one
extraction. docs/methods.md ("Comparison") says what ``ms/img`` counts. Learned steps are fitted
on ``--fit-on``, a folder separate from the benchmark (a benchmark folder there labels ``Wlearn``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from cbir.models.engine import ENGINES


# The standard grid: one line per method family of the literature (docs/methods.md).
# Learned steps use at most 64 dims, so that a fitting set of ~100 images is enough.
DEFAULT_METHODS: tuple[str, ...] = (
    # direct pooling of the last conv map
    "efficientnet_lite0/bn2,long384,SUM,L2",
    "efficientnet_lite0/bn2,long384,AVE,L2",
    "efficientnet_lite0/bn2,long384,MAX,L2",
    "efficientnet_lite0/bn2,long384,GeM3,L2",
    # weighted / regional aggregation
    "efficientnet_lite0/bn2,long384,RMAC3,L2",
    "efficientnet_lite0/bn2,long384,SPP,L2",
    "efficientnet_lite0/bn2,long384,CroW,L2",
    "efficientnet_lite0/bn2,long384,SCDA,L2",
    "efficientnet_lite0/bn2,long384,CAM,L2",
    # multi-scale
    "efficientnet_lite0/bn2,long384,MS3,GeM3,L2",
    "efficientnet_lite0/blocks.5+bn2,long384,MS3,GeM3,W0.5-0.5,L2",
    # lower layers and multi-layer fusion
    "efficientnet_lite0/blocks.4,long384,GeM3,L2",
    "efficientnet_lite0/blocks.5,long384,GeM3,L2",
    "efficientnet_lite0/blocks.6,long384,GeM3,L2",
    "efficientnet_lite0/blocks.5+bn2,long384,GeM3,W0.5-0.5,L2",
    "efficientnet_lite0/blocks.5+bn2,long384,GeM3,Wlearn,L2",
    # fully-connected-style global features, PCA-reduced
    "efficientnet_lite0/head,crop224,L2",
    "efficientnet_lite0/head,crop224,L2,PCA64,L2",
    "efficientnet_lite0/logits,crop224,L2,PCA64,L2",
    # post-processing
    "efficientnet_lite0/bn2,long384,GeM3,POW0.5,L2",
    "efficientnet_lite0/bn2,long384,GeM3,L2,PCAW64,L2",
    "efficientnet_lite0/bn2,long384,GeM3,L2,PCAWR64,L2",
    "efficientnet_lite0/bn2,long384,GeM3,L2,PCAWS64,L2",
    # re-ranking
    "efficientnet_lite0/bn2,long384,GeM3,L2,QE2",
    "efficientnet_lite0/bn2,long384,GeM3,L2,aQE3a3",
    "efficientnet_lite0/bn2,long384,GeM3,L2,DBA3",
    "efficientnet_lite0/bn2,long384,GeM3,L2,KRR10",
    "efficientnet_lite0/bn2,long384,GeM3,L2,DIFF10a0.8",
    # local-region aggregation (several forward passes)
    "efficientnet_lite0/bn2,long384,regions:sliding2,GeM3,BoW64,L2",
    "efficientnet_lite0/bn2,long384,regions:sliding2,GeM3,VLAD16,L2",
    "efficientnet_lite0/bn2,long384,regions:sliding2,GeM3,FV8,L2",
    "efficientnet_lite0/bn2,long384,regions:proposals8,GeM3,VLAD16,L2",
)


@dataclass
class _Member:
    """One pipeline of a group, with what it has computed so far."""

    index: int
    extractor: object
    raw: dict[str, list] = field(default_factory=dict)  # part -> per-image raw (or locals)
    seconds: float = 0.0  # own aggregation time on database + query images


def compare_pipelines(bench, pipelines: Sequence[str], fit_paths: Sequence[Path] | None = None,
                      fit_labels: Sequence | None = None, weights: str | Path | None = None,
                      engine: str = "onnx", crop: bool = True, threads: int | None = None,
                      progress: Callable | None = None, warn: Callable[[str], None] = print) -> list[dict]:
    """Evaluate ``pipelines`` on ``bench``; one result row per pipeline, in the order given:
    ``method``, ``dim``, ``map``, ``map_by_tag``, ``ms_per_image``, or ``error`` for a pipeline
    that could not run (e.g. a learned step with no fitting set)."""
    from cbir.evaluation import query_keys, score_vectors
    from cbir.models import create_engine
    from cbir.pipeline import Extractor, resolve_spec

    rows: list[dict] = [{} for _ in pipelines]
    groups: dict[tuple, list[_Member]] = {}
    for i, text in enumerate(pipelines):
        try:
            ex = Extractor(resolve_spec(text, weights), weights, engine, threads)
            if any(s.images for s in ex.rerankers):  # compare shares decoded images, not files
                raise ValueError(f"{text}: spatial verification (SV) needs the query images: measure it with `cbir eval`")
        except ValueError as e:  # a PipelineError too
            rows[i] = {"method": text, "error": str(e)}
            continue
        key = (ex.spec.backbone, str(ex.spec.resize), ex.spec.scales or "", ex.spec.regions or "")
        groups.setdefault(key, []).append(_Member(i, ex))

    keys = list(query_keys(bench, crop))
    parts = {  # part -> (sources, boxes)
        "db": ([bench.path(p) for p in bench.database], None),
        "q": ([bench.path(k[0]) for k in keys], [k[1] for k in keys]),
        "fit": ([Path(p) for p in (fit_paths or [])], None),
    }

    for gkey, members in groups.items():
        first = members[0].extractor
        # One engine taps the union of the group's layers; every member pools its own.
        layers = list(dict.fromkeys(la for m in members for la in m.extractor.spec.layers))
        eng = create_engine(first.backbone, layers, engine, first.engine_threads())
        regions = first.regions is not None

        def maps_of(batch):
            return [first.region_maps(img, eng) for img in batch] if regions else first.forward(batch, eng)

        forward_s, n_timed = 0.0, 0
        for part, (sources, bboxes) in parts.items():
            if part == "fit" and not any(m.extractor.needs_fit for m in members):
                continue
            for m in members:
                m.raw[part] = [None] * len(sources)
            bar = progress(total=len(sources), desc=f"{gkey[0]} {gkey[1]} {gkey[2]} {gkey[3]} [{part}]".replace("  ", " "),
                           unit="img") if progress else None
            t_part, own_s = time.perf_counter(), 0.0
            for keys, maps in first.iter_batches(sources, bboxes, lambda i, e: warn(f"warning: {e}"), maps_of,
                                                 bar.update if bar else None):
                t0 = time.perf_counter()
                for m in members:
                    t1 = time.perf_counter()
                    try:
                        ex = m.extractor
                        raw = ([ex.local_descriptors(one) for one in maps] if regions
                               else ex.raw_from_maps(maps))
                        for k, r in zip(keys, raw):
                            m.raw[part][k] = r
                    except ValueError as e:
                        rows[m.index] = rows[m.index] or {"method": str(ex.spec), "error": str(e)}
                    if part != "fit":
                        m.seconds += time.perf_counter() - t1
                own_s += time.perf_counter() - t0
            if part != "fit":
                forward_s += time.perf_counter() - t_part - own_s
                n_timed += len(sources)
            if bar:
                bar.close()

        for m in members:
            if rows[m.index]:
                continue
            try:
                rows[m.index] = _finish(bench, m, crop, fit_labels, forward_s, n_timed, score_vectors)
            except (ValueError, RuntimeError) as e:
                rows[m.index] = {"method": str(m.extractor.spec), "error": str(e).splitlines()[0]}
            m.raw.clear()
    return rows


def _finish(bench, m: _Member, crop: bool, fit_labels, forward_s: float, n_timed: int, score_vectors) -> dict:
    ex = m.extractor
    t0 = time.perf_counter()
    if ex.needs_fit:
        fit = m.raw.get("fit") or []
        if all(v is None for v in fit):
            raise ValueError("this pipeline has learned steps: give a separate image set with --fit-on DIR")
        ex.fit_raw(fit, fit_labels)
    t_fit = time.perf_counter() - t0

    def finish(part: str) -> np.ndarray:
        vals = m.raw[part]
        ok = [i for i, v in enumerate(vals) if v is not None]
        if not ok:
            raise ValueError(f"no {part} image could be read")
        x = ex.postprocess(ex.encode([vals[i] for i in ok]))
        out = np.full((len(vals), x.shape[1]), np.nan, np.float32)
        out[ok] = x
        return out

    t0 = time.perf_counter()
    db, q = finish("db"), finish("q")
    own = m.seconds + time.perf_counter() - t0
    ms = 1000 * (forward_s + own) / max(1, n_timed)
    result = score_vectors(bench, db, q, crop, ex.rerankers, {"pipeline": str(ex.spec)})
    s = result.summary
    row = {"method": str(ex.spec), "dim": int(db.shape[1]), "map": round(float(s["map"]), 4),
           "map_by_tag": {k: round(float(v), 4) for k, v in s["map_by_tag"].items()},
           "ms_per_image": round(ms, 1), "fit_seconds": round(t_fit, 2)}
    if ex.fusion is not None:
        row["layer_weights"] = [round(float(w), 3) for w in ex.fusion.weights_]
    return row


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The comparison as a text or Markdown table; the best mAP is marked with *."""
    tags = list(dict.fromkeys(t for r in rows for t in r.get("map_by_tag", {})))
    best = max((r["map"] for r in rows if "map" in r), default=None)
    head = ["method", "dim", "mAP"] + [f"mAP {t}" for t in tags] + ["ms/img"]
    body = []
    for r in rows:
        if "map" not in r:
            body.append([r["method"], "-", "error: " + r.get("error", "?")] + [""] * len(tags) + [""])
            continue
        mark = " *" if r["map"] == best else ""
        body.append([f"`{r['method']}`" if markdown else r["method"], str(r["dim"]), f"{r['map']:.4f}{mark}"]
                    + [f"{r['map_by_tag'].get(t, float('nan')):.4f}" for t in tags] + [f"{r['ms_per_image']:.0f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def compare(
    dataset_dir: Annotated[Path, typer.Argument(help="Benchmark folder (as for `cbir eval`).")],
    methods: Annotated[Optional[list[str]], typer.Option(
        "--methods", "-m",
        help="Pipeline strings to compare; repeat the option or separate them with ';'. Default: the standard grid of every method family.")] = None,
    fit_on: Annotated[Optional[Path], typer.Option(
        "--fit-on", help="Separate image set for learned steps (PCA, vocabularies, Wlearn); a benchmark folder labels it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown to FILE.")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local weights file for the backbone.")] = None,
    engine: Annotated[str, typer.Option("--engine", help=f"Inference engine: {ENGINES.choices()}.")] = "onnx",
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Do not crop queries to their ground-truth box.")] = False,
) -> None:
    """Compare pipelines on one benchmark: mAP (overall and per tag), descriptor size, ms per image."""
    from tqdm import tqdm

    from cbir.datasets import load_benchmark
    from cbir.pipeline import fit_set

    bench = load_benchmark(dataset_dir)
    fit_paths, fit_labels = fit_set(fit_on) if fit_on else (None, None)
    progress = partial(tqdm, file=sys.stderr, dynamic_ncols=True, disable=None, leave=False)
    pipelines = ([x.strip() for m in methods for x in m.split(";") if x.strip()] if methods
                 else list(DEFAULT_METHODS))
    rows = compare_pipelines(bench, pipelines, fit_paths, fit_labels, weights, engine, crop=not no_crop,
                             progress=None if as_json else progress, warn=lambda m: typer.echo(m, err=True))
    # The highest mAP; ties go to the pipeline listed first (timings are too noisy to break them).
    best = max((r for r in rows if "map" in r), key=lambda r: r["map"], default=None)
    if markdown:
        text = (f"Benchmark `{bench.name}`: {len(bench.queries)} queries, {len(bench.database)} database images"
                + (f"; learned steps fitted on `{fit_on}`" if fit_on else "") + ".\n\n" + format_table(rows, True) + "\n")
        if best:
            text += f"\nBest: `{best['method']}`, mAP {best['map']:.4f}.\n"
        Path(markdown).write_text(text)
    if as_json:
        typer.echo(json.dumps({"benchmark": bench.name, "rows": rows, "best": best["method"] if best else None}))
        return
    typer.echo(f"benchmark {bench.name}: {len(bench.queries)} queries, {len(bench.database)} database images\n")
    typer.echo(format_table(rows))
    if best:
        typer.echo(f"\nbest: {best['method']}  (mAP {best['map']:.4f})")
