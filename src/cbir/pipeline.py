"""A retrieval pipeline, described by one short string, and the extractor that runs it.

The string reads left to right in the order the data flows, like a faiss factory string::

    efficientnet_lite0/bn2,long512,GeM3,L2
    ^backbone         ^layer ^input ^pooling ^post-processing steps...

- backbone: a registered name (``cbir models``) or ``timm:<model>``; ``/layer`` is optional
  (the backbone's default). ``head`` is the backbone's own pooled global feature and takes
  no pooling token.
- input: ``long<S>`` (longer side to S, aspect kept) or ``crop<S>`` (shorter side to S, centre crop).
- pooling: ``SUM``, ``AVE``, ``MAX``, ``GeM<p>`` (see `cbir.pooling`).
- post-processing: ``L2``, ``POW<a>``, ``PCA<k>``, ``PCAW<k>`` (see `cbir.postprocess`);
  PCA steps are learned (``fit``) on a separate image set and saved with the index.

The string plus the weights' hash identify the descriptor: an index refuses queries from a
pipeline whose identity differs. The engine (onnx / torch) is not part of it: both compute the
same function to ~1e-5.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cbir.images import ImageError, Resize, batches_by_shape, open_image, to_array
from cbir.models import BackboneError, create_engine, get_backbone
from cbir.models.backbones import VECTOR_LAYERS
from cbir.pooling import PoolingMethod, parse_pooling, pool
from cbir.postprocess import Transform, parse_postprocess

DEFAULT_PIPELINE = "efficientnet_lite0/bn2,long512,GeM3,L2"


class PipelineError(ValueError):
    """A pipeline string or option that cannot be used; the message says which part."""


@dataclass(frozen=True)
class PipelineSpec:
    backbone: str
    layer: str
    resize: Resize
    pooling: str | None  # the pooling token as written, e.g. "GeM3"
    post: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "PipelineSpec":
        tokens = [t.strip() for t in text.split(",") if t.strip()]
        if not tokens:
            raise PipelineError("empty pipeline string")
        backbone, _, layer = tokens[0].partition("/")
        if backbone.startswith("timm:") is False and ":" in backbone:
            raise PipelineError(f"bad backbone {backbone!r}")
        resize, pooling, post = None, None, []
        for tok in tokens[1:]:
            try:
                if (r := Resize.parse(tok)) is not None:
                    if resize or pooling or post:
                        raise PipelineError(f"input size {tok!r} must come right after the backbone")
                    resize = r
                elif parse_pooling(tok) is not None:
                    if pooling or post:
                        raise PipelineError(f"pooling {tok!r} must come before post-processing and only once")
                    pooling = tok
                elif parse_postprocess(tok) is not None:
                    post.append(tok)
                else:
                    raise PipelineError(
                        f"unknown pipeline step {tok!r} in {text!r}; see `cbir pipelines` for the vocabulary"
                    )
            except ValueError as e:
                raise PipelineError(str(e)) from None
        if resize is None:
            raise PipelineError(f"pipeline {text!r} needs an input size, e.g. long512 or crop224")
        layer = layer or ""
        if layer in VECTOR_LAYERS and pooling:
            raise PipelineError(f"layer {layer!r} is already a vector: drop the pooling step {pooling!r}")
        return cls(backbone, layer, resize, pooling, tuple(post))

    def __str__(self) -> str:
        head = f"{self.backbone}/{self.layer}" if self.layer else self.backbone
        return ",".join([head, str(self.resize)] + ([self.pooling] if self.pooling else []) + list(self.post))


def resolve_spec(text: str, weights: str | Path | None = None) -> PipelineSpec:
    """Parse ``text`` and fill in the backbone's default layer, so the string is canonical."""
    spec = PipelineSpec.parse(text)
    try:
        bb = get_backbone(spec.backbone, weights)
    except BackboneError as e:
        raise PipelineError(str(e)) from None
    layer = spec.layer or bb.default_layer
    if layer not in VECTOR_LAYERS and spec.pooling is None:
        raise PipelineError(f"layer {layer!r} is a feature map: add a pooling step such as GeM3 or MAX")
    return PipelineSpec(spec.backbone, layer, spec.resize, spec.pooling, spec.post)


@dataclass
class Extractor:
    """Runs a pipeline: images -> descriptors ``(N, D)`` float32.

    Decoding runs in a small thread pool (Pillow releases the GIL) while the engine works on
    the previous batch; images of equal size after scaling are batched together.
    """

    spec: PipelineSpec
    weights: str | Path | None = None
    engine_name: str = "onnx"
    threads: int | None = None
    batch_size: int = 8
    decode_workers: int = 2
    post: list[Transform] = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.backbone = get_backbone(self.spec.backbone, self.weights)
            self.backbone.check_layers([self.spec.layer])
        except BackboneError as e:
            raise PipelineError(str(e)) from None
        parsed = parse_pooling(self.spec.pooling) if self.spec.pooling else None
        self._pooling: tuple[PoolingMethod, float | None] | None = parsed
        self.post = [parse_postprocess(t) for t in self.spec.post]
        self._engine = None

    # -- identity ------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return {"pipeline": str(self.spec), "weights_sha256": self.backbone.weights_sha256}

    @property
    def needs_fit(self) -> bool:
        return any(t.learned for t in self.post)

    @property
    def engine(self):
        if self._engine is None:
            try:
                self._engine = create_engine(self.backbone, [self.spec.layer], self.engine_name, self.threads)
            except BackboneError as e:
                raise PipelineError(str(e)) from None
        return self._engine

    # -- stages ----------------------------------------------------------------------
    def load(self, source: str | Path | bytes, bbox: Sequence[float] | None = None) -> np.ndarray:
        """One image -> uint8 ``(H, W, 3)`` scaled for the network (raises `ImageError`)."""
        return to_array(open_image(source, self.spec.resize, tuple(bbox) if bbox is not None else None))

    def raw_descriptors(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` -> pooled, not yet post-processed ``(N, C)`` float32."""
        (out,) = self.engine.run(batch)
        if self._pooling is None:
            return out.astype(np.float32)
        method, value = self._pooling
        return pool(torch.from_numpy(out), method, value).numpy().astype(np.float32)

    def postprocess(self, x: np.ndarray) -> np.ndarray:
        for t in self.post:
            x = t.transform(x)
        return x.astype(np.float32)

    # -- whole images ----------------------------------------------------------------
    def iter_raw(
        self,
        sources: Sequence[str | Path | bytes],
        bboxes: Sequence[Sequence[float] | None] | None = None,
        on_error: Callable[[int, ImageError], None] | None = None,
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield ``(indices, raw descriptors)`` batch by batch; bad images go to ``on_error``.

        Without ``on_error`` the first bad image raises.
        """
        bboxes = bboxes if bboxes is not None else [None] * len(sources)

        def decode(i: int):
            try:
                return i, self.load(sources[i], bboxes[i])
            except ImageError as e:
                if on_error is None:
                    raise
                on_error(i, e)
                return i, None

        with cf.ThreadPoolExecutor(self.decode_workers) as pool_:
            decoded = pool_.map(decode, range(len(sources)))
            good = ((i, a) for i, a in decoded if a is not None)
            for keys, batch in batches_by_shape(good, self.batch_size):
                yield keys, self.raw_descriptors(batch)

    def fit(self, sources: Sequence[str | Path | bytes], on_error=None) -> "Extractor":
        """Learn the pipeline's PCA steps on ``sources`` (a set separate from the database)."""
        if not self.needs_fit:
            return self
        x = self._collect(self.iter_raw(sources, on_error=on_error), len(sources))
        x = x[~np.isnan(x[:, 0])]
        for t in self.post:
            x = t.fit_transform(x)
        return self

    def extract(
        self,
        sources: Sequence[str | Path | bytes],
        bboxes: Sequence[Sequence[float] | None] | None = None,
        on_error: Callable[[int, ImageError], None] | None = None,
    ) -> np.ndarray:
        """Descriptors ``(N, D)`` in the order of ``sources``; rows of failed images are NaN."""
        raw = self._collect(self.iter_raw(sources, bboxes, on_error), len(sources))
        ok = ~np.isnan(raw[:, 0])
        out = np.full((len(sources), self.dim(raw.shape[1])), np.nan, np.float32)
        if ok.any():
            out[ok] = self.postprocess(raw[ok])
        return out

    def extract_one(self, source: str | Path | bytes, bbox: Sequence[float] | None = None) -> np.ndarray:
        """One image -> ``(D,)`` descriptor (raises `ImageError` if it cannot be read)."""
        return self.postprocess(self.raw_descriptors(self.load(source, bbox)[None]))[0]

    def dim(self, raw_dim: int) -> int:
        d = raw_dim
        for t in self.post:
            d = getattr(t, "n_components", d)
        return d

    @staticmethod
    def _collect(batches: Iterable[tuple[list[int], np.ndarray]], n: int) -> np.ndarray:
        out = None
        for keys, x in batches:
            if out is None:
                out = np.full((n, x.shape[1]), np.nan, np.float32)
            out[keys] = x
        return out if out is not None else np.full((n, 1), np.nan, np.float32)

    # -- learned state -----------------------------------------------------------------
    def post_state(self) -> dict[str, np.ndarray]:
        return {f"{i}.{k}": v for i, t in enumerate(self.post) for k, v in t.state().items()}

    def load_post_state(self, state: dict[str, np.ndarray]) -> None:
        for i, t in enumerate(self.post):
            prefix = f"{i}."
            t.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
