"""The ``pspnet`` localizer: a PSPNet trained on `cbir synth` composites segments the paintings.

photo -> letterbox (square, ``input_size``) -> PSPNet -> painting probability (and core
probability) at output stride 16 (4 with the edge decoder) -> grey opening of both maps -> back
to the photo's resolution (bilinear) ->
threshold -> connected components (small ones dropped) -> touching paintings split (at the
watershed of the core map when the network has a core channel, else by shape) -> one `Region`
per painting (box, minimum-area rotated rectangle as its 4-point polygon, mask), best first.

The threshold, the minimum area, the opening's size, whether to split at a probability
valley and the core level are chosen on synthetic validation data by training and stored
with the weights.
Inference runs on ONNX Runtime (the network is exported once and cached, keyed by the weights'
hash), ``engine="torch"`` runs it eagerly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cbir.localize import LOCALIZERS, Localizer, LocalizerError, Region
from cbir.localize.geometry import min_area_rect, polygon_area, regions_from_mask

# Bump when the export changes the graph (2: maps (1, M, h, w), the core channel's map second).
EXPORT_VERSION = 2
# Shipped weights: ``pspnet`` (trained on every painting) and ``pspnet-holdout`` (trained without
# the paintings of museum-multi), in cbir/weights/.
SHIPPED = {"default": "pspnet.pt", "holdout": "pspnet-holdout.pt"}
# Smallest letterboxed content side that still covers one feature cell, in input pixels.
MIN_CONTENT_SIDE = 16
MAX_PIXELS = 100_000_000
# A component whose area fills less than this share of its minimum-area rectangle may be two
# touching paintings: it is split along its distance transform's ridges if that gives pieces
# that are each more rectangular.
SPLIT_FILL = 0.88


def weights_path(name: str | os.PathLike | None = None) -> Path:
    """A shipped weights name (``default``, ``holdout``) or a path -> an existing file."""
    from cbir.train import WEIGHTS_DIR

    key = str(name) if name not in (None, "") else "default"
    path = WEIGHTS_DIR / SHIPPED[key] if key in SHIPPED else Path(key).expanduser()
    if not path.is_file():
        where = f"shipped weights {key!r}" if key in SHIPPED else "weights file"
        raise LocalizerError(f"pspnet: {where} {path} not found; train one with `cbir train segmenter`")
    return path


def load_weights(path: str | os.PathLike) -> dict:
    """A ``cbir train segmenter`` weights file -> its dict; anything else is a one-line error."""
    from cbir.train import TrainingError, load_checkpoint

    try:
        obj = load_checkpoint(path)
    except TrainingError as e:
        raise LocalizerError(f"pspnet: {e}") from None
    if obj.get("format") != "cbir-pspnet" or "state" not in obj or "config" not in obj:
        raise LocalizerError(f"pspnet: {path} is not a PSPNet weights file written by `cbir train segmenter`")
    return obj


def build_network(weights: dict):
    """The PSPNet (eval mode) with the trained tensors of ``weights`` loaded."""
    from cbir.models.pspnet import PSPConfig, PSPNet

    net = PSPNet(PSPConfig.from_dict(weights["config"]), pretrained=True)
    try:
        net.load_trained_state(weights["state"])
    except (KeyError, ValueError) as e:
        raise LocalizerError(f"pspnet: weights do not fit the network: {e}") from None
    return net.eval()


def prepare(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB photo -> ``(1, 3, size, size)`` float32 as EfficientNet-Lite wants it ((x - 127.5) / 127.5),
    the photo scaled to ``size`` on its longer side and centred on a black pad; and the content's
    ``(left, top, width, height)`` in the square."""
    w, h = image.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = np.zeros((size, size, 3), np.uint8)
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(image.convert("RGB").resize((nw, nh), Image.BILINEAR))
    x = (canvas.astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), (left, top, nw, nh)


def check_photo(image: Image.Image, size: int = 512) -> None:
    """One-line `LocalizerError` for photos that cannot be localized (tiny, huge, a sliver)."""
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise LocalizerError(f"pspnet: a {w}x{h} photo is over the limit of {MAX_PIXELS / 1e6:.0f} Mpixel")
    if min(w, h) < MIN_CONTENT_SIDE or min(w, h) * size / max(w, h) < MIN_CONTENT_SIDE:
        raise LocalizerError(f"pspnet: a {w}x{h} photo is too small or too elongated to localize "
                             f"(needs {MIN_CONTENT_SIDE} px on its shorter side after scaling)")


def to_photo(prob: np.ndarray, size: int, content: tuple[int, int, int, int], out_wh: tuple[int, int]) -> np.ndarray:
    """Probability ``(h, w)`` over the letterboxed square -> the photo's ``(H, W)`` (bilinear).

    The feature cell grid is mapped onto the square's pixels with half-pixel centres, the pad cut
    away, then scaled to the photo in one resample.
    """
    left, top, nw, nh = content
    h, w = prob.shape
    img = Image.fromarray(prob.astype(np.float32))
    # Box of the content in feature-cell units: PIL's resize(box=...) crops and scales at once.
    box = (left * w / size, top * h / size, (left + nw) * w / size, (top + nh) * h / size)
    return np.asarray(img.resize(out_wh, Image.BILINEAR, box=box))


def open_map(prob: np.ndarray, cells: int) -> np.ndarray:
    """Grey opening of a probability map with a ``cells`` x ``cells`` square (1: unchanged).

    Removes bright structures thinner than the square (a bridge of wall between two paintings
    hung close, a lit strip along the photo's edge) while a painting's rectangle, wider than the
    square, comes through exactly.
    """
    return prob if cells <= 1 else ndimage.grey_opening(prob, size=(cells, cells))


def fill_ratio(mask: np.ndarray) -> float:
    """Area of a component / area of its minimum-area rectangle (1 for a rectangle)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return 1.0
    edge = mask & ~ndimage.binary_erosion(mask)
    yy, xx = np.nonzero(edge)
    pts = np.concatenate([np.stack([xx + dx, yy + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    return float(len(xs) / max(polygon_area(min_area_rect(pts)), 1.0))


def split_touching(comp: np.ndarray, min_pixels: int, fill: float = SPLIT_FILL) -> list[np.ndarray]:
    """One component -> its pieces when it looks like touching paintings, else ``[comp]``.

    A component under ``fill`` rectangularity is cut at its distance transform's watershed:
    seeds are the cores left by thresholding the distance at rising levels; the first level
    that gives two or more seeds of ``min_pixels`` / 4 each is used, and the cut is kept only if
    every piece has ``min_pixels`` and is more rectangular than the whole.
    """
    whole = fill_ratio(comp)
    if whole >= fill:
        return [comp]
    from skimage.segmentation import watershed

    sl = ndimage.find_objects(comp.astype(np.uint8))[0]
    sub = comp[sl]
    # Work at most ~256 px on the longer side: the cut only needs the shape.
    step = max(1, int(np.ceil(max(sub.shape) / 256)))
    small = sub[::step, ::step]
    dist = ndimage.distance_transform_edt(small)
    for level in (0.3, 0.4, 0.5, 0.6, 0.7):
        seeds, n = ndimage.label(dist > level * dist.max())
        if n < 2:
            continue
        sizes = ndimage.sum_labels(np.ones_like(seeds), seeds, np.arange(1, n + 1))
        keep = np.flatnonzero(sizes * step * step >= min_pixels / 4) + 1
        if len(keep) < 2:
            continue
        markers = np.where(np.isin(seeds, keep), seeds, 0)
        parts_small = watershed(-dist, markers, mask=small)
        # Back to the component's resolution: each pixel takes its nearest labelled cell.
        up = np.kron(parts_small, np.ones((step, step), parts_small.dtype))[:sub.shape[0], :sub.shape[1]]
        pieces = []
        for k in keep:
            piece = np.zeros_like(comp)
            piece[sl] = (up == k) & sub
            pieces.append(piece)
        if all(p.sum() >= min_pixels and fill_ratio(p) > whole for p in pieces):
            return pieces
        return [comp]
    return [comp]


# Probability levels at which a component is looked at again for a valley between two paintings.
VALLEY_LEVELS = (0.7, 0.8, 0.9, 0.95)


def split_at_valley(comp: np.ndarray, prob: np.ndarray, min_pixels: int, levels=VALLEY_LEVELS) -> list[np.ndarray]:
    """One component -> its pieces when the probability inside it has a valley between two
    confident cores (two paintings whose gap the stride-16 map blurred), else ``[comp]``.

    The first level in ``levels`` at which the component's pixels above it form two or more
    cores of ``min_pixels`` / 4 each seeds a watershed of ``-prob`` within the component; the cut
    is kept if every piece has ``min_pixels``.
    """
    from skimage.segmentation import watershed

    sl = ndimage.find_objects(comp.astype(np.uint8))[0]
    sub, p = comp[sl], prob[sl]
    for level in levels:
        cores, n = ndimage.label(sub & (p > level))
        if n < 2:
            continue
        sizes = ndimage.sum_labels(np.ones_like(cores), cores, np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= min_pixels / 4) + 1
        if len(keep) < 2:
            continue
        parts = watershed(-p, np.where(np.isin(cores, keep), cores, 0), mask=sub)
        pieces = []
        for k in keep:
            piece = np.zeros_like(comp)
            piece[sl] = parts == k
            pieces.append(piece)
        return pieces if all(x.sum() >= min_pixels for x in pieces) else [comp]
    return [comp]


def regions_from_probability(prob: np.ndarray, threshold: float, min_area: float, split: bool = True,
                             max_regions: int = 10, valley: bool = False, core: np.ndarray | None = None,
                             core_level: float = 0.5) -> list[Region]:
    """Photo-resolution painting probability -> regions (components, touching ones split by
    shape, and first at a probability valley with ``valley``; training chooses whether on
    synthetic validation data and stores it with the weights).

    ``core``: the core channel's probability ``(H, W)``, if the network has one: a component
    holding two or more cores above ``core_level`` is cut at the core map's watershed first."""
    mask = prob > threshold
    regions = regions_from_mask(mask, prob, min_area=min_area, max_regions=max_regions, polygons=True)
    if not split:
        return regions
    min_pixels = min_area * mask.size
    out: list[Region] = []
    for r in regions:
        pieces = [r.mask]
        if core is not None:
            pieces = split_at_valley(r.mask, core, min_pixels, levels=(core_level,))
        if valley and len(pieces) == 1:
            pieces = split_at_valley(r.mask, prob, min_pixels)
        if len(pieces) == 1:
            pieces = split_touching(r.mask, min_pixels)
        if len(pieces) == 1:
            out.append(r)
            continue
        for p in pieces:
            out += regions_from_mask(p, prob, min_area=min_area, polygons=True)
    out.sort(key=lambda r: -r.score * (r.box[2] - r.box[0]) * (r.box[3] - r.box[1]))
    return out[:max_regions]


def onnx_path(weights_file: Path, net) -> Path:
    """The cached ONNX graph of a weights file (content-addressed), exported now if missing."""
    import torch

    from cbir.images import sha256_file
    from cbir.models.engine import cache_dir
    from cbir.models.pspnet import PSPInference

    key = f"{sha256_file(weights_file)}|v{EXPORT_VERSION}|torch{torch.__version__.split('+')[0]}"
    path = cache_dir() / "onnx" / f"pspnet-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    size = net.config.input_size
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(PSPInference(net, static_size=size), (torch.zeros(1, 3, size, size),), tmp, dynamo=False,
                              input_names=["image"], output_names=["maps"], opset_version=17)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@LOCALIZERS.register("pspnet", option="weights", default="default",
                     summary="PSPNet (dilated EfficientNet-Lite0 + pyramid pooling) trained on synth composites; "
                             ":holdout or :<file.pt> for other weights")
class PSPNetLocalizer(Localizer):
    """Semantic segmentation of paintings, components as instances.

    ``weights``: ``default`` / ``holdout`` (shipped) or a path. ``threshold``, ``min_area`` and
    ``open_cells`` override the values chosen on synth-val. ``engine``: ``onnx`` (default) or ``torch``.
    ``split``: cut touching paintings apart (see `split_touching`); ``valley``: also at a
    probability valley (`split_at_valley`; by default as chosen in training, off for weights
    that do not say). ``core_level``: where the network has a core channel, the level of its
    map that seeds the cut of a component (as chosen in training unless given).
    """

    def __init__(self, weights: str | None = None, engine: str = "onnx", threshold: float | None = None,
                 min_area: float | None = None, split: bool = True, valley: bool | None = None,
                 threads: int | None = None, open_cells: int | None = None,
                 core_level: float | None = None) -> None:
        if engine not in ("onnx", "torch"):
            raise LocalizerError(f"pspnet: unknown engine {engine!r}; choose onnx or torch")
        self.path = weights_path(weights)
        self.weights = load_weights(self.path)
        self.threshold = float(self.weights.get("threshold", 0.5) if threshold is None else threshold)
        self.min_area = float(self.weights.get("min_area", 0.01) if min_area is None else min_area)
        self.open_cells = int(self.weights.get("open_cells", 1) if open_cells is None else open_cells)
        if not 0 < self.threshold < 1:
            raise LocalizerError(f"pspnet: threshold {self.threshold} must be within 0..1")
        self.valley = bool(self.weights.get("valley", False) if valley is None else valley)
        self.core_level = float(self.weights.get("core_level") or 0.5) if core_level is None else float(core_level)
        if not 0 < self.core_level < 1:
            raise LocalizerError(f"pspnet: core level {self.core_level} must be within 0..1")
        self.engine, self.split, self.threads = engine, split, threads
        self.input_size = int(self.weights["config"].get("input_size", 512))
        self._net = None
        self._session = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._net is None:
            self._net = build_network(self.weights)
        if self.engine == "torch":
            import torch

            from cbir.models.pspnet import PSPInference

            if self.threads:
                torch.set_num_threads(self.threads)
            with torch.inference_mode():
                return PSPInference(self._net)(torch.from_numpy(x)).numpy()[0]
        if self._session is None:
            from cbir.models.engine import onnx_session

            self._session = onnx_session(str(onnx_path(self.path, self._net)), self.threads or 0)
        return self._session.run(None, {"image": x})[0][0]

    def maps(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 ``(H, W)`` painting probability and core probability (None without a core
        channel) at the photo's resolution, both after the grey opening."""
        check_photo(image, self.input_size)
        x, content = prepare(image, self.input_size)
        maps = self._run(x)  # (M, h, w)
        prob = to_photo(open_map(maps[0], self.open_cells), self.input_size, content, image.size)
        core = to_photo(open_map(maps[1], self.open_cells), self.input_size, content, image.size) if len(maps) > 1 else None
        return prob, core

    def probability(self, image: Image.Image) -> np.ndarray:
        """float32 ``(H, W)`` painting probability at the photo's resolution."""
        return self.maps(image)[0]

    def localize(self, image: Image.Image) -> list[Region]:
        prob, core = self.maps(image)
        return regions_from_probability(prob, self.threshold, self.min_area, self.split, valley=self.valley,
                                        core=core, core_level=self.core_level)
