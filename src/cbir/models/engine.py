"""Inference engines: run a backbone's tapped layers on a prepared batch.

ONNX Runtime is the default: on a 2-core CPU it runs EfficientNet-Lite0 about 4x faster than
eager PyTorch with outputs equal to ~1e-5. The ONNX graph is exported on first use and cached
under the user's cache directory, keyed by backbone, weights hash, layers and export settings,
and written atomically so that a killed export never leaves a broken cache entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from cbir.models.backbones import Backbone, BackboneError, OnnxGraphBackbone

# Bump when the export code changes in a way that changes the graph.
EXPORT_VERSION = 1
ENGINES = ("onnx", "torch")


def cache_dir() -> Path:
    """Where exported graphs live: $CBIR_CACHE_DIR, else the platform's user cache dir."""
    env = os.environ.get("CBIR_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cbir"))


class Engine(Protocol):
    layers: tuple[str, ...]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 ``(N, H, W, 3)`` RGB -> one array per layer: ``(N, C, h, w)`` or ``(N, C)``."""


def onnx_cache_path(backbone: Backbone, layers: Sequence[str]) -> Path:
    key = "|".join([backbone.name, backbone.weights_sha256, ",".join(layers), f"v{EXPORT_VERSION}"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{backbone.name.replace(':', '_')}-{digest}.onnx"


def export_cached(backbone: Backbone, layers: Sequence[str]) -> Path:
    """The cached ONNX graph for these layers, exported now if it is not there yet."""
    path = onnx_cache_path(backbone, layers)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        backbone.export_onnx(layers, Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxEngine:
    """ONNX Runtime session over the cached graph; thread-safe ``run``."""

    def __init__(self, backbone: Backbone, layers: Sequence[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        backbone.check_layers(layers)
        self.backbone, self.layers = backbone, tuple(layers)
        self.path = export_cached(backbone, self.layers)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(None, {self.input_name: self.backbone.prepare(batch)})
        if isinstance(self.backbone, OnnxGraphBackbone):
            outs = self.backbone.postprocess_outputs(outs, self.layers)
        return outs


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


def create_engine(backbone: Backbone, layers: Sequence[str], engine: str = "onnx", threads: int | None = None) -> Engine:
    if engine == "onnx":
        return OnnxEngine(backbone, layers, threads)
    if engine == "torch":
        return TorchEngine(backbone, layers, threads)
    raise BackboneError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
