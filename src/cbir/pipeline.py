"""A retrieval pipeline, described by one short string, and the extractor that runs it.

The string reads left to right in the order the data flows, like a faiss factory string::

    efficientnet_lite0/blocks.5+bn2,long512,MS3,GeM3,W0.3-0.7,PCAW64,L2,DBA5,aQE5a3
    ^backbone/layers                ^input  ^scales  ^fusion  ^post     ^re-ranking

    efficientnet_lite0/head,long512,regions:sliding3,VLAD32,L2
    ^region descriptors             ^regions         ^encoder

docs/methods.md explains the stages (`cbir pipelines` lists their vocabulary). The string less
its re-ranking steps, plus the weights' hash, identify the descriptor: an index refuses queries
from a pipeline whose identity differs, and can be searched with any re-ranking. The engine
(onnx / torch) is not part of it: both compute the same function to ~1e-5.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cbir.images import ImageError, Resize, batches_by_shape, list_images, open_image, to_array
from cbir.local import LocalEncoder, RegionSpec, parse_encoder, parse_regions
from cbir.local.regions import crop_and_warp
from cbir.models import BackboneError, create_engine, get_backbone
from cbir.models.backbones import VECTOR_LAYERS
from cbir.models.batch_size import measured_batch_size
from cbir.pooling import PoolingMethod, combine_scales, parse_pooling, pool
from cbir.postprocess import LayerFusion, Transform, parse_postprocess
from cbir.rerank import Reranker, check_order, parse_rerank

DEFAULT_PIPELINE = "efficientnet_lite0/bn2,long384,GeM3,L2"

# The extraction loop's arguments: images (paths, encoded bytes or PIL images), optional boxes,
# what takes each bad image (index, error), what counts the images done.
_Sources = Sequence[str | Path | bytes]
_Boxes = Sequence[Sequence[float] | None] | None
_OnError = Callable[[int, ImageError], None] | None
_Progress = Callable[[int], object] | None


class PipelineError(ValueError):
    """A pipeline string or option that cannot be used; the message says which part."""


_MS = re.compile(r"MS(\d)")
_SCALES = re.compile(r"scales(\d*\.?\d+(?:-\d*\.?\d+)*)")


def parse_scales(token: str) -> tuple[float, ...] | None:
    """``"MS3"`` -> (1, 1/sqrt2, 1/2); ``"scales1-0.5"`` -> (1, 0.5); not a scales token -> None."""
    if m := _MS.fullmatch(token):
        n = int(m.group(1))
        if not 1 <= n <= 6:
            raise ValueError(f"{token!r}: MS<n> takes 1..6 scales")
        return tuple(2.0 ** (-i / 2) for i in range(n))
    if m := _SCALES.fullmatch(token):
        scales = tuple(float(v) for v in m.group(1).split("-"))
        if not all(0.1 <= s <= 4 for s in scales):
            raise ValueError(f"{token!r}: scales must be within 0.1..4")
        return scales
    return None


# The stages of a pipeline string, in the order they must appear.
_STAGES = ("input", "scales", "regions", "pooling", "encoder", "post", "rerank")


@dataclass(frozen=True)
class PipelineSpec:
    backbone: str
    layer: str  # one layer, or several joined by "+"
    resize: Resize
    pooling: str | None  # the pooling token as written, e.g. "GeM3"
    post: tuple[str, ...] = ()
    scales: str | None = None  # e.g. "MS3"
    regions: str | None = None  # e.g. "regions:sliding3"
    encoder: str | None = None  # e.g. "VLAD32"
    rerank: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer.split("+")) if self.layer else ()

    @classmethod
    def parse(cls, text: str) -> "PipelineSpec":
        tokens = [t.strip() for t in text.split(",") if t.strip()]
        if not tokens:
            raise PipelineError("empty pipeline string")
        backbone, _, layer = tokens[0].partition("/")
        if ":" in backbone and not backbone.startswith("timm:"):
            raise PipelineError(f"bad backbone {backbone!r}")
        found: dict[str, list[str]] = {s: [] for s in _STAGES}
        last = -1
        for tok in tokens[1:]:
            try:  # the first parser (tried in `_PARSERS` order) that accepts the token
                stage = next((name for name, parse in _PARSERS if parse(tok) is not None), None)
            except ValueError as e:
                raise PipelineError(str(e)) from None
            if stage is None:
                raise PipelineError(f"unknown pipeline step {tok!r} in {text!r}; "
                                    "see `cbir pipelines` for the vocabulary")
            i = _STAGES.index(stage)
            if i < last or (i == last and stage not in ("post", "rerank")):
                what = {"input": f"input size {tok!r} must come right after the backbone",
                        "pooling": f"pooling {tok!r} must come before post-processing and only once"
                        }.get(stage, f"{stage} step {tok!r} is out of place or repeated")
                raise PipelineError(f"{what}; the order is: backbone -> {' -> '.join(_STAGES)}")
            last = i
            found[stage].append(tok)
        if not found["input"]:
            raise PipelineError(f"pipeline {text!r} needs an input size, e.g. long512 or crop224")
        first = {s: next(iter(found[s]), None) for s in ("scales", "regions", "pooling", "encoder")}
        spec = cls(backbone, layer or "", Resize.parse(found["input"][0]), post=tuple(found["post"]),
                   rerank=tuple(found["rerank"]), **first)
        spec._check()
        return spec

    def _check(self) -> None:
        layers = self.layers
        if layers and all(la in VECTOR_LAYERS for la in layers) and self.pooling:
            raise PipelineError(f"layer {self.layer!r} is already a vector: drop the pooling step {self.pooling!r}")
        fusion = parse_postprocess(self.post[0]) if self.post else None
        if len(layers) > 1:
            if not isinstance(fusion, LayerFusion):
                raise PipelineError(f"{len(layers)} layers ({self.layer}) need a fusion step first after the pooling: "
                                    f"W<w1>-<w2>..., e.g. W{'-'.join(['0.5'] * len(layers))}, or Wlearn")
            if fusion.weights is not None and len(fusion.weights) != len(layers):
                raise PipelineError(f"{self.post[0]!r} gives {len(fusion.weights)} weights for {len(layers)} layers")
        if any(isinstance(parse_postprocess(t), LayerFusion) for t in self.post[1:]) or (
                isinstance(fusion, LayerFusion) and len(layers) < 2):
            raise PipelineError("a fusion step W... goes right after the pooling of a pipeline with several layers (a+b)")
        if (self.regions is None) != (self.encoder is None):
            raise PipelineError("region steps come in pairs: regions:sliding<L> or regions:proposals<N>, "
                                "then (after the pooling) an encoder BoW<k>, VLAD<k> or FV<k>")
        if self.regions and (len(layers) > 1 or self.scales):
            raise PipelineError("region pipelines take one layer and one scale")
        try:
            check_order([parse_rerank(t) for t in self.rerank])
        except ValueError as e:
            raise PipelineError(str(e)) from None

    def __str__(self) -> str:
        return self.descriptor + ("," + ",".join(self.rerank) if self.rerank else "")

    @property
    def descriptor(self) -> str:
        """The string less its re-ranking steps: what identifies the stored descriptors."""
        head = f"{self.backbone}/{self.layer}" if self.layer else self.backbone
        parts = [head, str(self.resize), self.scales, self.regions, self.pooling, self.encoder, *self.post]
        return ",".join(p for p in parts if p)


# Which stage a token belongs to: the first parser (tried in this order) that accepts it.
_PARSERS = (("input", Resize.parse), ("scales", parse_scales), ("regions", parse_regions),
            ("pooling", parse_pooling), ("encoder", parse_encoder), ("rerank", parse_rerank),
            ("post", parse_postprocess))


def resolve_spec(text: str, weights: str | Path | None = None) -> PipelineSpec:
    """Parse ``text`` and fill in the backbone's default layer, so the string is canonical."""
    spec = PipelineSpec.parse(text)
    try:
        bb = get_backbone(spec.backbone, weights)
    except BackboneError as e:
        raise PipelineError(str(e)) from None
    layer = spec.layer or bb.default_layer
    maps = [la for la in layer.split("+") if la not in VECTOR_LAYERS]
    if maps and spec.pooling is None:
        raise PipelineError(f"layer {maps[0]!r} is a feature map: add a pooling step such as GeM3 or MAX")
    return dataclasses.replace(spec, layer=layer)


def fit_set(root: str | Path) -> tuple[list[Path], list[str] | None]:
    """Images of a fitting set and, where the folder says, their labels: a benchmark folder
    (``gt.json``) gives its database and query images, labelled by the groups that show the same
    object (a query with its positives); a folder of class folders, labels by folder; else none."""
    root = Path(root)
    if (root / "gt.json").exists():
        from cbir.datasets import load_benchmark

        bench = load_benchmark(root)
        parent: dict[str, str] = {}

        def find(a: str) -> str:
            while parent.setdefault(a, a) != a:
                a = parent[a]
            return a

        for q in bench.queries:
            for p in q.positives:
                parent[find(p)] = find(q.image)
        names = list(dict.fromkeys(list(bench.database) + [q.image for q in bench.queries]))
        return [bench.path(n) for n in names], [find(n) for n in names]
    paths = list_images(root)
    labels = [p.parent.name for p in paths]
    return paths, (labels if len(set(labels)) > 1 else None)


@dataclass
class Extractor:
    """Runs a pipeline: images -> descriptors ``(N, D)`` float32 (the loop: `iter_batches`)."""

    spec: PipelineSpec
    weights: str | Path | None = None
    engine_name: str = "onnx"
    threads: int | None = None
    batch_size: int = 8  # 0: sized by measurement (cbir.models.batch_size), cached per machine
    decode_workers: int = 2
    # Batches in the engine at once: two keep the cores busy while one batch's run winds down
    # (+10-15% images/s on 2 cores). Each gets a share of the cores (`engine_threads`), so
    # `Searcher`, which serves single queries, uses 1 to give each query the whole machine.
    infer_workers: int = 2
    post: list[Transform] = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.backbone = get_backbone(self.spec.backbone, self.weights)
            self.backbone.check_layers(list(self.spec.layers))
        except BackboneError as e:
            raise PipelineError(str(e)) from None
        self._pooling = parse_pooling(self.spec.pooling) if self.spec.pooling else None
        self.post = [parse_postprocess(t) for t in self.spec.post]
        self._engine = None
        self.scales: tuple[float, ...] = parse_scales(self.spec.scales) if self.spec.scales else (1.0,)
        self.regions: RegionSpec | None = parse_regions(self.spec.regions) if self.spec.regions else None
        self.encoder: LocalEncoder | None = parse_encoder(self.spec.encoder) if self.spec.encoder else None
        self.fusion: LayerFusion | None = self.post[0] if self.post and isinstance(self.post[0], LayerFusion) else None
        self.rerankers: list[Reranker] = [parse_rerank(t) for t in self.spec.rerank]
        self._context: dict | None = None
        if self.fusion is not None:
            # The block sizes (each layer's pooled width), measured on one probe image so that
            # the fusion step is complete from the start.
            maps = self.forward(np.zeros((1, 128, 128, 3), np.uint8))
            self.fusion.dims_ = np.asarray([self._pool_one(maps[0][la]).shape[1] for la in self.spec.layers], np.int64)

    @property
    def identity(self) -> dict:
        return {"pipeline": self.spec.descriptor, "weights_sha256": self.backbone.weights_sha256}

    @property
    def needs_fit(self) -> bool:
        return any(t.learned for t in self.post) or self.encoder is not None

    @property
    def engine(self):
        if self._engine is None:
            try:
                self._engine = create_engine(self.backbone, list(self.spec.layers), self.engine_name,
                                             self.engine_threads())
            except BackboneError as e:
                raise PipelineError(str(e)) from None
        return self._engine

    def engine_threads(self) -> int | None:
        """Intra-op threads of the engine: ``threads``, else (ONNX engines) the cores shared among
        the ``infer_workers`` batches that run at once (a pool per run sized for the whole machine
        oversubscribes: ~9% fewer images/s on 2 cores, benchmarks/extract_speed.py). The torch
        engine keeps its default (its thread count is process-wide)."""
        if self.threads:
            return self.threads
        if self.engine_name.startswith("onnx") and self.infer_workers > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            return max(1, cores // self.infer_workers)
        return None

    def load(self, source: str | Path | bytes, bbox: Sequence[float] | None = None) -> np.ndarray:
        """One image -> uint8 ``(H, W, 3)`` scaled for the network (raises `ImageError`)."""
        return to_array(open_image(source, self.spec.resize, tuple(bbox) if bbox is not None else None))

    def raw_descriptors(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` -> pooled, not yet post-processed ``(N, C)`` float32: the
        layers' pooled vectors concatenated, scales merged; regions: the encoded region descriptors."""
        if self.regions is not None:
            return self.encode(self.local_sets(batch))
        return self.raw_from_maps(self.forward(batch))

    def forward(self, batch: np.ndarray, engine=None) -> list[dict[str, np.ndarray]]:
        """The tapped layers for ``batch``, one ``{layer: (N, C, h, w)}`` per scale. ``engine`` (default
        this pipeline's own) may tap more layers: `cbir.compare` shares one among its pipelines."""
        engine = engine or self.engine
        scaled = (batch if s == 1.0 else rescale_batch(batch, s) for s in self.scales)
        return [dict(zip(engine.layers, engine.run(b))) for b in scaled]

    def raw_from_maps(self, maps: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        """Feature maps (one dict per scale, holding at least this pipeline's layers) -> raw ``(N, D)``."""
        method, value = self._pooling or (None, None)
        parts = []
        for layer in self.spec.layers:
            per_scale = [self._pool_one(m[layer]) for m in maps]
            v = per_scale[0] if len(per_scale) == 1 else combine_scales(per_scale, method, value)
            parts.append(v.numpy().astype(np.float32))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def _pool_one(self, out: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        if out.ndim == 2 or self._pooling is None:
            return x
        method, value = self._pooling
        return pool(x, method, value, **self.pool_context(method))

    def pool_context(self, method: PoolingMethod) -> dict:
        """What a pooling method ``needs`` besides the map (CAM: the backbone's classifier)."""
        if "classifier" not in method.needs:
            return {}
        if self._context is None:
            model = getattr(self.backbone, "model", None)
            if model is None:
                raise PipelineError(f"{method.name} pooling needs the backbone's classifier weights; "
                                    f"{self.backbone.name!r} has no PyTorch form (use a timm backbone)")
            clf = model().get_classifier()
            self._context = {"weight": clf.weight.detach().float().clone(),
                             "bias": clf.bias.detach().float().clone() if clf.bias is not None else None}
        return self._context

    def region_maps(self, image: np.ndarray, engine=None, chunk: int = 32) -> list[list[dict[str, np.ndarray]]]:
        """One uint8 ``(H, W, 3)`` image -> the tapped maps of its regions, ``chunk`` regions a run."""
        crops = crop_and_warp(image, self.regions.boxes(image), self.regions.size)
        return [self.forward(crops[i:i + chunk], engine) for i in range(0, len(crops), chunk)]

    def local_descriptors(self, maps: list[list[dict[str, np.ndarray]]]) -> np.ndarray:
        """`region_maps` of one image -> its region descriptors ``(R, D)`` (raw, pooled)."""
        return np.concatenate([self.raw_from_maps(m) for m in maps])

    def local_sets(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 ``(N, H, W, 3)`` -> each image's region descriptors, the encoder's input."""
        return [self.local_descriptors(self.region_maps(img)) for img in batch]

    def postprocess(self, x: np.ndarray) -> np.ndarray:
        for t in self.post:
            x = t.transform(x)
        return x.astype(np.float32)

    def iter_batches(self, sources: _Sources, bboxes: _Boxes = None, on_error: _OnError = None,
                     compute: Callable[[np.ndarray], object] | None = None,
                     progress: _Progress = None) -> Iterator[tuple[list[int], object]]:
        """The one extraction loop: yield ``(indices, compute(batch))`` batch by batch.

        ``compute`` maps a uint8 ``(N, H, W, 3)`` batch to what the caller wants (default
        `raw_descriptors`; `cbir.compare` asks for its own engine's feature maps, `fit` for region
        sets). Bad images go to ``on_error`` (without it the first one raises); ``progress`` gets
        the number of images done, good or bad; both are called from this (the consumer's) thread.
        ``decode_workers`` threads decode and scale images (Pillow releases the GIL) a bounded window
        ahead of the engine (memory: one or two batches of pixels); equal sizes are batched together."""
        compute = compute or self.raw_descriptors
        n = len(sources)
        bboxes = bboxes if bboxes is not None else [None] * n
        batch_size = self.resolved_batch_size()
        window = batch_size + 2 * self.decode_workers  # images decoding or decoded ahead

        def decode(i: int):
            try:
                return i, self.load(sources[i], bboxes[i]), None
            except ImageError as e:
                return i, None, e

        def decoded(pool_: cf.ThreadPoolExecutor) -> Iterator[tuple[int, np.ndarray]]:
            for i, arr, err in _in_order(pool_, decode, range(n), window):
                if err is None:
                    yield i, arr
                    continue
                if on_error is None:
                    raise err
                on_error(i, err)
                if progress:
                    progress(1)

        def run(item: tuple[list[int], np.ndarray]) -> tuple[list[int], object]:
            return item[0], compute(item[1])

        if n and compute in (self.raw_descriptors, self.local_sets):
            self.engine  # noqa: B018 - built here, once, not by several inference threads at once
        with (cf.ThreadPoolExecutor(max(1, self.decode_workers), thread_name_prefix="cbir-decode") as pool_,
              cf.ThreadPoolExecutor(max(1, self.infer_workers), thread_name_prefix="cbir-infer") as infer):
            batches = batches_by_shape(decoded(pool_), batch_size, max_pending=batch_size)
            results = map(run, batches)
            if self.infer_workers > 1:
                # One batch queued beyond the running ones: a worker that finishes out of order
                # starts the next batch at once instead of idling.
                results = _in_order(infer, run, batches, self.infer_workers + 1)
            for keys, result in results:
                if progress:
                    progress(len(keys))
                yield keys, result

    def iter_vectors(self, sources: _Sources, bboxes: _Boxes = None, on_error: _OnError = None,
                     progress: _Progress = None) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield ``(indices, descriptors (n, D))`` batch by batch: `iter_batches`, post-processed."""
        for keys, raw in self.iter_batches(sources, bboxes, on_error, progress=progress):
            yield keys, self.postprocess(raw)

    def extract(self, sources: _Sources, bboxes: _Boxes = None, on_error: _OnError = None,
                progress: _Progress = None) -> np.ndarray:
        """Images (paths, encoded bytes or PIL images; each with an optional box) -> descriptors
        ``(N, D)`` in the order of ``sources``; rows of images that failed are NaN."""
        out = None
        for keys, x in self.iter_vectors(sources, bboxes, on_error, progress):
            if out is None:
                out = np.full((len(sources), x.shape[1]), np.nan, np.float32)
            out[keys] = x
        return out if out is not None else np.full((len(sources), self.output_dim), np.nan, np.float32)

    def extract_one(self, source: str | Path | bytes, bbox: Sequence[float] | None = None) -> np.ndarray:
        """One image -> ``(D,)`` descriptor (raises `ImageError` if it cannot be read)."""
        return self.extract([source], [bbox])[0]

    @functools.cached_property
    def output_dim(self) -> int:
        """The descriptor's dimension (learned steps must be fitted), from one tiny probe image."""
        return self.postprocess(self.raw_descriptors(np.zeros((1, 64, 64, 3), np.uint8))).shape[1]

    def resolved_batch_size(self) -> int:
        """``batch_size``, or (when it is 0) the one measured fastest for this engine here."""
        if not self.batch_size or self.batch_size < 0:
            self.batch_size = measured_batch_size(self)
        return int(self.batch_size)

    def fit(self, sources: _Sources, on_error: _OnError = None,
            labels: Sequence | None = None) -> "Extractor":
        """Learn the pipeline's learned steps on ``sources`` (a set separate from the database);
        ``labels`` (one per source; default: the folder names) are for ``Wlearn`` only."""
        if not self.needs_fit:
            return self
        if labels is None and any(getattr(t, "supervised", False) and t.learned for t in self.post):
            labels = [Path(s).parent.name if not isinstance(s, bytes) else "" for s in sources]
        raw: list = [None] * len(sources)
        compute = self.local_sets if self.encoder is not None else None
        for keys, part in self.iter_batches(sources, on_error=on_error, compute=compute):
            for k, r in zip(keys, part):
                raw[k] = r
        if all(r is None for r in raw):
            raise PipelineError("no image of the fitting set could be read")
        return self.fit_raw(raw, labels)

    def fit_raw(self, raw: Sequence[np.ndarray | None], labels: Sequence | None = None) -> "Extractor":
        """Fit on raw descriptors, one per image (None: an image that failed, skipped): the
        encoder's vocabulary first, then the post-processing steps in order (``labels`` for ``Wlearn``)."""
        ok = [i for i, r in enumerate(raw) if r is not None]
        raw = [raw[i] for i in ok]
        if self.encoder is not None:
            self.encoder.fit(raw)
        x = self.encode(raw)
        y = np.asarray([labels[i] for i in ok], dtype=object) if labels is not None else None
        for t in self.post:
            x = t.fit(x, y).transform(x)
        return self

    def encode(self, raw: Sequence[np.ndarray]) -> np.ndarray:
        """Raw descriptors, one per image (region pipelines: each image's region descriptors) -> ``(N, C)``."""
        return self.encoder.encode(list(raw)) if self.encoder is not None else np.stack(raw)

    def post_state(self) -> dict[str, np.ndarray]:
        """Learned state of the post-processing steps (``<i>.<attr>``) and the encoder (``enc.<attr>``)."""
        state = {f"{i}.{k}": v for i, t in enumerate(self.post) for k, v in t.state().items()}
        if self.encoder is not None:
            state.update({f"enc.{k}": v for k, v in self.encoder.state().items()})
        return state

    def load_post_state(self, state: dict[str, np.ndarray]) -> None:
        for i, t in enumerate(self.post):
            prefix = f"{i}."
            t.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        if self.encoder is not None:
            self.encoder.load_state({k[4:]: v for k, v in state.items() if k.startswith("enc.")})


def _in_order(pool_: cf.ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``fn`` over ``items`` in ``pool_``, results in order, with at most ``window`` items submitted
    and not yet yielded (``items`` is drawn lazily, so memory stays bounded)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool_.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def rescale_batch(batch: np.ndarray, scale: float) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> the same images resized by ``scale`` (antialiased)."""
    n, h, w, _ = batch.shape
    size = (max(16, round(w * scale)), max(16, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(b).resize(size, Image.BICUBIC)) for b in batch])
