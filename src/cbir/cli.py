"""The ``cbir`` command: a thin layer over the Python API.

Every error a user can cause (a missing path, a corrupt image, an unknown option or pipeline
step, a mismatched index) ends as one line on stderr naming it, and exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from cbir.datasets import load_benchmark
from cbir.images import list_images, parse_box
from cbir.localize import LOCALIZERS, create_localizer
from cbir.models import BACKBONES, list_backbones
from cbir.models.engine import ENGINES

app = typer.Typer(
    name="cbir",
    help="Content-based image retrieval with deep features: index a folder, search by example, measure mAP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PipelineOpt = Annotated[
    Optional[str],
    typer.Option("--pipeline", "-p", help="Pipeline string, e.g. 'efficientnet_lite0/bn2,long384,GeM3,L2' (see `cbir pipelines`)."),
]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local weights file for the backbone (a state dict for timm:<model>).")]
EngineOpt = Annotated[str, typer.Option("--engine", help=f"Inference engine: {ENGINES.choices()}; `cbir index` also takes ray (extraction on Ray Data).")]
LocalizerOpt = Annotated[Optional[str], typer.Option("--localizer", "-l", help=f"Find the objects in a photo first, then search each: {', '.join(LOCALIZERS.names())} (`cbir localizers`); in `cbir eval` also gt (the ground-truth boxes).")]
FitOnOpt = Annotated[Optional[Path], typer.Option("--fit-on", help="Folder of images, separate from the database, to learn PCA steps, vocabularies and layer weights on (a benchmark folder or a folder per class labels them, for Wlearn).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


_warn = functools.partial(typer.echo, err=True)


def _progress():
    return functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True, smoothing=0.1, disable=None)


def _user_errors():
    """Exceptions that are the user's to fix, printed as one line, never as a traceback: cbir's own
    (DatasetError, ImageError, PipelineError... are ValueErrors) and OSError (a full disk...)."""
    from cbir.index import IndexStoreError
    from cbir.scale.ray_extract import RayUnavailable

    return IndexStoreError, RayUnavailable, ValueError, OSError


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            _fail(_one_line(e))

    return wrapper


def _one_line(e: BaseException) -> str:
    """The message of ``e`` as one line (an OSError's as 'strerror: filename')."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


@app.command()
@_guard
def models() -> None:
    """List the backbones, where their weights come from, and whether they are present."""
    typer.echo(f"{'backbone':20s} {'present':8s} {'weights from':40s} description")
    for r in list_backbones():
        present = {True: "yes", False: "no", None: "-"}[r["present"]]
        typer.echo(f"{r['name']:20s} {present:8s} {r['package']:40s} {r['description']}")
        if r["weights"]:
            typer.echo(f"{'':20s} {'':8s} {r['weights']}")


@app.command()
def pipelines() -> None:
    """Explain the pipeline-string vocabulary: backbone/layer, input size, pooling, post-processing."""
    from cbir.local import ENCODERS, REGIONS
    from cbir.pipeline import DEFAULT_PIPELINE
    from cbir.pooling import POOLINGS
    from cbir.postprocess import POSTPROCESS
    from cbir.rerank import RERANKERS

    typer.echo(f"default: {DEFAULT_PIPELINE}\n")
    _vocabulary("backbone[/layer] (`cbir models`); layer 'head' = the backbone's own pooled feature,\n"
                "  a+b taps several layers, fused by a W<wa>-<wb> (or Wlearn) step", BACKBONES)
    typer.echo("input              long<S> (longer side to S, aspect kept) | crop<S> (shorter side to S, centre crop)")
    typer.echo("scales (optional)  MS<n> (1, 1/sqrt2, 1/2, ...) | scales<a>-<b>-... ; merged as the pooling requires")
    _vocabulary("regions (optional, [@size]): each region through the network, then an encoder", REGIONS, "regions:")
    _vocabulary("encoder (after the pooling, with regions)", ENCODERS)
    _vocabulary("pooling", POOLINGS)
    _vocabulary("post-processing (in order)", POSTPROCESS)
    _vocabulary("re-ranking (last; search time, not part of an index's identity)", RERANKERS)


def _vocabulary(title: str, registry, prefix: str = "") -> None:
    """A stage's heading, then one line per registered entry."""
    typer.echo(f"{title}:")
    for line in registry.describe(width=20 - len(prefix)):
        typer.echo(f"  {prefix}{line}")


@app.command()
@_guard
def index(
    images_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    index_dir: Annotated[Path, typer.Option("--index", "-i", help="Index directory (created if missing).")],
    pipeline: PipelineOpt = None,
    weights: WeightsOpt = None,
    engine: EngineOpt = "onnx",
    fit_on: FitOnOpt = None,
    commit_every: Annotated[int, typer.Option("--commit-every", min=1, help="Commit to disk after this many images (a killed run keeps every commit).")] = 64,
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="FAISS index type: auto (default for new indexes: Flat below 50k images, IVF...,PQ...,RFlat below 200k, then HNSW32), Flat, HNSW32, 'IVF4096,PQ32,RFlat' (RFlat: exact re-ranking). Stored with the index.")] = None,
    search_params: Annotated[Optional[str], typer.Option("--search-params", help="Stored search parameters, e.g. 'nprobe=32,k_factor=8', 'efSearch=128', 'ondisk=1' (fixed: they win over the tuned ones).")] = None,
    recall: Annotated[Optional[float], typer.Option("--recall", min=0.01, max=1.0, help="Target recall@10 the search parameters are tuned for, on a held-out sample of the index's own vectors (default 0.95; stored with the index).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: the cluster (ray://HEAD:10001, or auto); default a local Ray.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option("--ray-workers", min=1, help="With --engine ray: actors (each loads the model once); default one per CPU.")] = None,
    shards: Annotated[Optional[Path], typer.Option("--shards", help="With --engine ray: keep the Parquet shards here (default: a temporary folder in the index).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Also serve searches from Milvus: milvus://HOST:PORT/COLLECTION (synced now, stored with the index; 'faiss' to go back).")] = None,
    localizer: LocalizerOpt = None,
) -> None:
    """Build or update an index: new files added, changed files re-extracted, deleted files dropped.

    --localizer is stored with the index: its searches then find the objects of a query photo
    and search each. The acceptance threshold for "not in the collection" is calibrated on
    edits of the indexed images whenever the index changed, and stored with it.
    """
    from cbir.index import Index, update_index

    if localizer is not None:
        create_localizer(localizer)  # an unknown name fails before any extraction
    fit = list_images(fit_on) if fit_on else None
    if index_type is not None and (index_dir / "index.json").exists():
        from cbir.index.factory import validate

        validate(index_type, Index(index_dir).dim)  # a bad type fails before any extraction
    if engine == "ray":
        from cbir.scale.ray_extract import update_index_ray

        report = update_index_ray(images_dir, index_dir, pipeline, weights, fit, address=ray_address,
                                  workers=ray_workers, shards_dir=shards, warn=_warn)
    else:
        report = update_index(images_dir, index_dir, pipeline, weights, engine, fit, commit_every=commit_every,
                              progress=_progress(), warn=_warn)
    typer.echo(f"{index_dir}: {report.summary()}")
    if report.failed:
        typer.echo(f"{len(report.failed)} unreadable file(s) skipped (listed above)", err=True)
    idx = Index(index_dir)
    if localizer is not None:
        idx.update_info(localizer=None if localizer == "whole" else localizer)
    _calibrate(idx, weights, engine, force=report.added + report.updated + report.removed > 0)
    _prepare_search(idx, index_type, search_params, backend, recall)


def _calibrate(idx, weights: Path | None, engine: str, force: bool) -> None:
    """Store the index's acceptance threshold (`cbir.identify`), calibrated on its own images."""
    from cbir.index.builder import calibrate_index
    from cbir.pipeline import Extractor, resolve_spec

    if (idx.info.get("identify") and not force) or len(idx) < 3:
        return
    extractor = Extractor(resolve_spec(idx.pipeline, weights), weights, "onnx" if engine == "ray" else engine)
    extractor.load_post_state(idx.post_state())
    cal = calibrate_index(idx, extractor, warn=_warn)
    idx.update_info(identify=cal.to_json())
    typer.echo(f"acceptance threshold {cal.threshold:.3f} (calibrated on {cal.n} edited images: "
               f"{cal.tpr:.0%} accepted, {cal.tnr:.0%} of would-be unknowns rejected)")


def _prepare_search(idx, index_type: str | None, search_params: str | None, backend: str | None,
                    recall: float | None) -> None:
    """Store the index type / backend asked for, then sync Milvus or build the FAISS index now
    (large or non-default types) and tune its search parameters to the recall target, so that
    the first search does not pay for it."""
    from cbir.index.factory import FLAT_MAX

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if index_type is not None or search_params is not None:
            idx.set_index_type(index_type, search_params)
        if backend is not None:
            idx.set_backend(None if backend in ("", "faiss") else backend)
        if idx.backend_uri:
            inserted, deleted = idx.search_backend.sync(idx)
            typer.echo(f"{idx.backend_uri}: {inserted} vectors sent, {deleted} deleted")
        elif len(idx) >= FLAT_MAX or idx.factory not in ("auto", "Flat"):
            t0 = time.perf_counter()
            tuned = idx.tune_search(recall)
            si = idx.search_index()
            typer.echo(f"search index {si.type} over {si.ntotal} vectors ready in {time.perf_counter() - t0:.1f} s")
            if tuned and tuned.get("params"):
                setting = ",".join(f"{k}={v}" for k, v in tuned["params"].items())
                note = "" if tuned.get("reached", True) else f" (target {tuned['target']} not reached)"
                typer.echo(f"search parameters {setting}: recall@10 {tuned['recall']:.3f} on {tuned['queries']} "
                           f"held-out vectors, {tuned['ms']:.3f} ms/query{note}")
        elif recall is not None:
            idx.tune_search(recall)  # stored for when the collection outgrows exact search
    for w in caught:
        if issubclass(w.category, UserWarning):
            _warn(f"warning: {w.message}")


@app.command()
@_guard
def search(
    query: Annotated[Path, typer.Argument(help="Query image.")],
    index_dir: Annotated[Path, typer.Option("--index", "-i", help="Index directory built by `cbir index`.")],
    k: Annotated[int, typer.Option("-k", help="Number of results (1 to 10000).")] = 10,
    bbox: Annotated[Optional[str], typer.Option("--bbox", help="Query region x0,y0,x1,y1 in pixels.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: {results: [{path, score}], ms}.")] = False,
    weights: WeightsOpt = None,
    engine: EngineOpt = "onnx",
    rerank: Annotated[Optional[str], typer.Option("--rerank", help="Re-ranking steps, e.g. 'QE5', 'DBA5,aQE10a3', 'KRR20', 'DIFF10' (see `cbir pipelines`).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Search through milvus://HOST:PORT/COLLECTION, or 'faiss' (the embedded index); default: what the index stores.")] = None,
    localizer: LocalizerOpt = None,
) -> None:
    """Search an index with an example image; print ranked paths and scores.

    With a localizer (--localizer, or the one stored with the index), the objects of the photo
    are found first and each is searched: its box, then its results or "not in the collection".
    """
    from cbir.index import Index, Searcher

    if not 1 <= k <= 10000:  # checked here, not by typer, to be one line like every other error
        _fail(f"-k {k} must be between 1 and 10000")
    try:
        box = None if bbox is None else parse_box(bbox)
    except ValueError:
        _fail(f"--bbox {bbox!r} must be four finite numbers x0,y0,x1,y1 with x1 > x0 and y1 > y0")
    pipeline = f"{Index(index_dir).pipeline},{rerank}" if rerank else None
    searcher = Searcher(index_dir, weights, engine, pipeline=pipeline, localizer=localizer)
    if backend is not None:
        uri = None if backend in ("", "faiss") else backend
        if uri:
            from cbir.index.milvus import MilvusURI

            MilvusURI.parse(uri)  # a malformed URI fails before any search
        searcher.index.use_backend(uri)
    t0 = time.perf_counter()
    if box is None and (localizer is not None or searcher.index.info.get("localizer")):
        key, found = "objects", searcher.search_objects(query, k)
    else:
        key, found = "results", searcher.search(query, k, box)
    ms = (time.perf_counter() - t0) * 1000
    if as_json:
        typer.echo(json.dumps({key: [x.to_json() for x in found], "ms": round(ms, 2)}))
        return
    if key == "objects":
        _print_objects(found)
    else:
        _print_hits(found)
    typer.echo(f"({len(found)} {'object(s)' if key == 'objects' else 'results'} in {ms:.0f} ms)", err=True)


def _print_hits(hits, indent: str = "") -> None:
    for rank, h in enumerate(hits, 1):
        extra = " ".join(f"{k}={v}" for k, v in h.meta.items())
        typer.echo(f"{indent}{rank:3d}  {h.score:.4f}  {h.path}" + (f"  [{extra}]" if extra else ""))


def _print_objects(objects) -> None:
    if not objects:
        typer.echo("no object found in the photo")
    for n, o in enumerate(objects, 1):
        x0, y0, x1, y1 = (round(v) for v in o.region.box)
        verdict = f"is {o.identified}" if o.identified else "not in the collection"
        typer.echo(f"object {n}: box {x0},{y0},{x1},{y1}  (score {o.region.score:.2f})  {verdict}")
        _print_hits(o.results, "  ")


@app.command()
def localizers() -> None:
    """List the localizers: how a photo is split into the objects that are searched."""
    typer.echo("\n".join(LOCALIZERS.describe()))
    typer.echo(f"{'gt':22s} the benchmark's ground-truth boxes (cbir eval only: the upper bound)")


@app.command("eval")
@_guard
def eval_(
    dataset_dir: Annotated[Path, typer.Argument(help="Benchmark folder: gt.json, gnd_r*.pkl (Revisited Oxford/Paris), Holidays, UKBench, or a folder per class.")],
    pipeline: PipelineOpt = None,
    weights: WeightsOpt = None,
    engine: EngineOpt = "onnx",
    fit_on: FitOnOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the precision-recall curve (PNG).")] = None,
    per_query: Annotated[Optional[Path], typer.Option("--per-query", help="Write per-query AP (CSV).")] = None,
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Do not crop queries to their ground-truth box.")] = False,
    localizer: LocalizerOpt = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="Only the queries with this tag (repeatable), e.g. background.")] = None,
) -> None:
    """Measure mAP (overall and per tag), precision@k and recall@k of a pipeline on a benchmark.

    With --localizer, each query photo is split into objects first and scored by the
    multi-object protocol (detection AP, masks, object mAP, identification, count accuracy).
    """
    from cbir.evaluation import evaluate, format_summary
    from cbir.pipeline import DEFAULT_PIPELINE, Extractor, fit_set, resolve_spec

    bench = load_benchmark(dataset_dir).with_tags(tag or ())
    extractor = Extractor(resolve_spec(pipeline or DEFAULT_PIPELINE, weights), weights, engine)
    if localizer not in (None, "gt"):
        localizer = create_localizer(localizer)  # an unknown name fails before any extraction
    fit, labels = fit_set(fit_on) if fit_on else (None, None)
    result = evaluate(bench, extractor, crop=not no_crop, fit_on=fit, warn=_warn,
                      progress=None if as_json else _progress(), fit_labels=labels, localizer=localizer)
    if plot:
        result.plot(plot)
    if per_query:
        result.write_per_query(per_query)
    if as_json:
        typer.echo(json.dumps(result.summary))
        return
    typer.echo(format_summary(result.summary))
    if plot:
        typer.echo(f"precision-recall curve: {plot}")


@app.command()
@_guard
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo benchmark, index and plot go.")] = Path("demo-output"),
    engine: EngineOpt = "onnx",
) -> None:
    """Build a small benchmark from photos scikit-image ships, index it, evaluate it, show a search."""
    from cbir.demo import run_demo

    run_demo(workdir, engine=engine, echo=typer.echo, progress=_progress())


def _register_optional_commands() -> None:
    """Commands whose code lives with its own part of cbir, and the ``train`` group; a module
    that is not there (an extra that is not installed) simply adds no command."""
    for module, name in (("cbir.toolbox.cli", "flops"), ("cbir.service.cli", "serve"),
                         ("cbir.compare", "compare"), ("cbir.synth", "synth"),
                         ("cbir.localize.tscam", "cam")):
        try:
            fn = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as e:
            if e.name and (module.startswith(e.name) or e.name in {"fastapi", "uvicorn"}):
                continue
            raise
        app.command(name)(_guard(fn))
    from cbir.train.cli import register

    app.add_typer(register(_guard), name="train")


_register_optional_commands()

if __name__ == "__main__":
    app()
