"""The ``yolo`` localizer: the trained YOLOv5 detector (`cbir.models.yolo`), on ONNX Runtime.

``yolo`` / ``yolo:lite0`` (the default: frozen ImageNet EfficientNet-Lite0 backbone),
``yolo:n`` (yolov5n trained from scratch), or ``yolo:PATH`` to a weights file written by
``cbir train detector``. The exported ONNX graph contains decoding, the score cut and the NMS
(ONNX ``NonMaxSuppression``), so it gives final boxes; it is exported on first use and cached
(keyed by the weights' hash). ``engine="torch"`` runs the same path in PyTorch.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.localize import LOCALIZERS, Localizer, LocalizerError, Region

DEFAULT_VARIANT = "lite0"
EXPORT_CONF = 0.001  # the graph keeps every box over this; the localizer applies its own cut
EXPORT_IOU = 0.45
MAX_DET = 100


def weights_path(option: str | None) -> Path:
    from cbir.train import WEIGHTS_DIR

    option = option or DEFAULT_VARIANT
    if option.endswith(".pt") or os.sep in option:
        p = Path(option)
    else:
        p = WEIGHTS_DIR / f"yolo_{option}.pt"
    if not p.is_file():
        raise LocalizerError(f"yolo weights {p} not found (train them with `cbir train detector`)")
    return p


def load_model(path: Path):
    """A weights file -> (YOLO model in eval mode, the file's metadata)."""
    import torch

    from cbir.models.yolo import YOLO
    from cbir.train import TrainingError, load_checkpoint

    try:
        ck = load_checkpoint(path)
    except TrainingError as e:
        raise LocalizerError(str(e)) from None
    if ck.get("format") != "cbir-yolo-1":
        raise LocalizerError(f"{path}: not a cbir YOLO weights file")
    model = YOLO(ck["variant"], nc=int(ck["nc"]), anchors=ck["anchors"], pretrained=ck["variant"] == "lite0")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (ck["variant"] == "lite0" and k.startswith("backbone."))]
    if missing or unexpected:
        raise LocalizerError(f"{path}: weights do not fit the {ck['variant']} model "
                             f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    model.eval()
    return model, ck


def export_onnx(model, size: int, path: Path, conf: float = EXPORT_CONF, iou: float = EXPORT_IOU,
                max_det: int = MAX_DET) -> Path:
    """Model + decoding + score cut + NMS -> one ONNX graph: ``image (1, 3, size, size)`` in
    [0, 1] -> ``detections (K, 6)`` x0, y0, x1, y1, score, class. Written atomically."""
    import tempfile

    import torch

    from cbir.models.yolo import YoloInference

    wrapper = YoloInference(model, conf, iou, max_det).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), tmp, dynamo=False,
                              input_names=["image"], output_names=["detections"],
                              dynamic_axes={"detections": {0: "k"}}, opset_version=17)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def letterbox01(image: Image.Image, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Photo -> ``(1, 3, size, size)`` float32 in [0, 1] (grey pad), scale, (left, top)."""
    from cbir.train.detector import letterbox_uint8

    img, s, off = letterbox_uint8(image, size)
    return (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy(), s, off


@LOCALIZERS.register("yolo", option="variant",
                     summary="YOLOv5 detector trained on synthesized gallery photos (:lite0 default, :n from scratch)")
class YoloLocalizer(Localizer):
    """Boxes from the trained detector, best first; the score cut was chosen on synth-val.

    ``at_least_one``: a query photo shows at least one object (that is what a user photographs),
    so when no box passes the cut the best box is kept anyway; identification's acceptance
    threshold still says "not in the collection" for it. On the synthetic check pool this keeps
    every photo with paintings whose boxes all fell under the cut, and adds a box only to the
    empty walls that queries never are (docs/yolo.md, "At least one box").
    """

    def __init__(self, variant: str | None = None, conf: float | None = None, engine: str = "onnx",
                 threads: int | None = None, at_least_one: bool = True) -> None:
        if engine not in ("onnx", "torch"):
            raise LocalizerError(f"yolo engine {engine!r}: choose onnx or torch")
        self.path = weights_path(variant)
        self.engine, self.threads = engine, threads
        self._conf = conf
        self.at_least_one = at_least_one
        self._model = None
        self._meta = None
        self._session = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._meta is not None:
            return
        with self._lock:
            if self._meta is not None:
                return
            model, meta = load_model(self.path)
            self.size = int(meta["image_size"])
            self.conf = float(self._conf if self._conf is not None else meta.get("conf", 0.25))
            self.iou = float(meta.get("iou", EXPORT_IOU))  # chosen on synth-val with the score cut
            if self.engine == "torch":
                from cbir.models.yolo import YoloInference

                self._model = YoloInference(model, EXPORT_CONF, self.iou, MAX_DET).eval()
            else:
                from cbir.models.engine import cache_dir, onnx_session

                digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
                onnx_path = cache_dir() / "onnx" / f"yolo-{meta['variant']}-{self.size}-{digest}.onnx"
                if not onnx_path.exists():
                    export_onnx(model, self.size, onnx_path, iou=self.iou)
                self._session = onnx_session(str(onnx_path), self.threads or 0)
            self._meta = meta

    def detect(self, x: np.ndarray) -> np.ndarray:
        """``(1, 3, S, S)`` letterboxed input -> ``(K, 6)`` detections in its pixels."""
        self._load()
        if self._session is not None:
            return np.asarray(self._session.run(None, {"image": x})[0], np.float32).reshape(-1, 6)
        import torch

        with torch.no_grad():
            return self._model(torch.from_numpy(x)).numpy().reshape(-1, 6)

    def localize(self, image: Image.Image) -> list[Region]:
        self._load()
        x, s, (left, top) = letterbox01(image, self.size)
        det = self.detect(x)
        passed = det[:, 4] > self.conf
        if self.at_least_one and len(det) and not passed.any():
            passed = np.arange(len(det)) == int(np.argmax(det[:, 4]))
        det = det[passed]
        w, h = image.size
        regions = []
        for x0, y0, x1, y1, score, _ in det[np.argsort(-det[:, 4], kind="stable")]:
            box = (float(np.clip((x0 - left) / s, 0, w)), float(np.clip((y0 - top) / s, 0, h)),
                   float(np.clip((x1 - left) / s, 0, w)), float(np.clip((y1 - top) / s, 0, h)))
            regions.append(Region(box, float(score)))
        return regions
