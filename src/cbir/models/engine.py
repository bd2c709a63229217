"""Inference engines: run a backbone's tapped layers on a prepared batch.

ONNX Runtime is the default: on a 2-core CPU it runs EfficientNet-Lite0 about 4x faster than
eager PyTorch with outputs equal to ~1e-5. Its graph is exported on first use and cached under
the user's cache directory, keyed by backbone, weights hash, layers and export settings, and
written atomically. ``onnx-int8`` runs it statically quantized (docs/scaling.md); its
descriptors approximate the float ones, so build and search an index with the same engine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from cbir.fileio import atomic_path
from cbir.models.backbones import Backbone, BackboneError, OnnxGraphBackbone
from cbir.registry import Registry

# Bump when the export code changes in a way that changes the graph.
EXPORT_VERSION = 1
# Bump when the int8 quantization recipe (calibration set, options) changes.
QUANT_VERSION = 1
# Each entry builds an engine from (backbone, layers, threads).
ENGINES = Registry("engine", error=BackboneError)


def cache_dir() -> Path:
    """Where exported graphs live: $CBIR_CACHE_DIR, else the platform's user cache dir."""
    if env := os.environ.get("CBIR_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cbir"))


def onnx_cache_path(backbone: Backbone, layers: Sequence[str]) -> Path:
    key = "|".join([backbone.name, backbone.weights_sha256, ",".join(layers), f"v{EXPORT_VERSION}"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{backbone.name.replace(':', '_')}-{digest}.onnx"


def export_cached(backbone: Backbone, layers: Sequence[str]) -> Path:
    """The cached ONNX graph for these layers, exported now if it is not there yet."""
    path = onnx_cache_path(backbone, layers)
    if path.exists():
        return path
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        backbone.export_onnx(layers, tmp)
    return path


def calibration_batches(backbone: Backbone, size: int = 512) -> list[np.ndarray]:
    """Network inputs for int8 calibration: the colour photos scikit-image ships, longer side
    ``size``, and their mirror images (no download; the same set on every machine)."""
    import skimage.data
    from PIL import Image

    from cbir.images import Resize, scale

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        arr = np.asarray(scale(img, Resize("long", size)), np.uint8)
        out += [backbone.prepare(arr[None]), backbone.prepare(np.ascontiguousarray(arr[:, ::-1])[None])]
    return out


def quantized_cached(backbone: Backbone, layers: Sequence[str]) -> Path:
    """The cached int8 graph (ONNX Runtime static quantization, QDQ, per-channel weights).

    Only convolutions and matrix products are quantized: the shape arithmetic of the graph
    (TF "same" padding) stays in float, so any input size still gives the float graph's shapes."""
    src = export_cached(backbone, layers)
    path = src.with_name(f"{src.stem}-int8v{QUANT_VERSION}.onnx")
    if path.exists():
        return path
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    feeds = iter([{input_name: x} for x in calibration_batches(backbone)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        os.replace(out, path)
    return path


@lru_cache(maxsize=4)
def onnx_session(path: str, threads: int):
    """An ONNX Runtime session over ``path``, shared by the engines of this process (building
    one takes ~50 ms and a copy of the weights; ``run`` is thread-safe). The graph file is
    content-addressed (its name hashes backbone, weights, layers): a cached session is never stale."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # Idle intra-op threads sleep instead of spinning: on a machine shared with other work (or
    # with cbir's own decoding threads) spinning halves throughput, and it buys little on an idle one.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@ENGINES.register("onnx", summary="ONNX Runtime, the default: faster on CPU")
class OnnxEngine:
    """ONNX Runtime session over the cached graph (float, or its int8 version); thread-safe ``run``."""

    def __init__(self, backbone: Backbone, layers: Sequence[str], threads: int | None = None,
                 int8: bool = False) -> None:
        self.backbone, self.layers = backbone, tuple(layers)
        self.path = quantized_cached(backbone, self.layers) if int8 else export_cached(backbone, self.layers)
        self.session = onnx_session(str(self.path), threads or 0)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(None, {self.input_name: self.backbone.prepare(batch)})
        if isinstance(self.backbone, OnnxGraphBackbone):
            outs = self.backbone.postprocess_outputs(outs)
        return outs


ENGINES.register("onnx-int8", summary="ONNX Runtime on the int8-quantized graph")(
    partial(OnnxEngine, int8=True))


@ENGINES.register("torch", summary="eager PyTorch")
class TorchEngine:
    """Eager PyTorch, for debugging, training-time use, and checking the ONNX engine."""

    def __init__(self, backbone: Backbone, layers: Sequence[str], threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.backbone, self.layers = backbone, tuple(layers)
        self.module = backbone.torch_module(self.layers)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = self.module(torch.from_numpy(self.backbone.prepare(batch)))
        return [o.numpy() for o in outs]


def create_engine(backbone: Backbone, layers: Sequence[str], engine: str = "onnx",
                  threads: int | None = None):
    """The engine registered as ``engine`` (`ENGINES`) for these layers of ``backbone``: its
    ``layers`` and ``run(uint8 (N, H, W, 3) RGB) -> one (N, C, h, w) or (N, C) array per layer``."""
    build = ENGINES.get(engine).build  # an unknown engine is the first error
    backbone.check_layers(layers)
    return build(backbone, layers, threads)
