"""Bag-of-freebies data augmentation that keeps boxes and masks consistent with the image.

A **sample** is a dict:

* ``"image"``: ``(H, W, C)`` or ``(H, W)`` numpy array (uint8 in [0, 255] or float in [0, 1]),
  or a ``(C, H, W)`` / ``(H, W)`` torch tensor (same value ranges).
* ``"boxes"`` (optional): ``(N, 4)`` xyxy boxes in pixels, numpy or tensor. Pixel ``(i, j)``
  covers ``[j, j + 1) x [i, i + 1)``, so a full-image box is ``[0, 0, W, H]``.
* ``"labels"``, ``"weights"`` (optional): ``(N,)`` per-box values, kept in step with the boxes.
* ``"mask"`` (optional): ``(H, W)`` integer or bool label map (segmentation), numpy or tensor.

Every transform is a callable ``t(sample, rng=None) -> sample`` (``rng``: a
``numpy.random.Generator``, an int seed or None); the output has the input's types and
layouts. Multi-image transforms take a sequence of samples: ``MixUp()(a, b, rng)``,
``CutMix()(a, b, rng)``, ``Mosaic()([s0, s1, s2, s3], rng)``. :class:`Compose` chains
single-image transforms without re-quantising a uint8 image between them.

Geometric transforms move boxes with the image (a box maps to the enclosing box of its
four transformed corners), clip them to the image and drop boxes thinner than
``min_size`` pixels or with less than ``min_visibility`` of their area left (YOLOv5's
defaults: 2 px, 10 %). Masks use nearest-neighbour resampling and ``mask_fill`` (default 0,
background; use 255 for an "ignore" label) where no source pixel exists. Occlusion
transforms (erasing, Cutout, Hide-and-Seek, GridMask) change pixels only: the occluded
object is still there, so its box and mask stay. Fill values are given as fractions of the
image range (``114 / 255`` for YOLO's grey, whatever the dtype).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Sample = dict[str, Any]
RngLike = np.random.Generator | int | None

PER_BOX_KEYS = ("labels", "weights")
YOLO_GREY = 114 / 255

__all__ = [
    "PER_BOX_KEYS", "ColorJitter", "Compose", "CutMix", "Cutout", "GaussianNoise", "GridMask",
    "HideAndSeek", "HorizontalFlip", "MixUp", "Mosaic", "RandomCrop", "RandomErasing",
    "RandomRotation", "RandomScale", "Sample", "Transform", "VerticalFlip", "adjust_brightness",
    "adjust_contrast", "adjust_hue", "adjust_saturation", "hsv_to_rgb", "rgb_to_hsv",
]


def as_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a Generator (returned as is), an int seed or None."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# --------------------------------------------------------------------------------------
# Canonical working form: image float32 HWC in its original value range, boxes float32
# (N, 4), mask numpy (H, W). Conversions happen once per call (once per Compose).


def _numpy(v: Any, key: str, meta: dict[str, Any]) -> np.ndarray:
    """``v`` as numpy (half-precision tensors as float32); dtype and tensor device go in ``meta``."""
    if isinstance(v, torch.Tensor):
        meta["tensor"][key] = v.device
        meta["dtype"][key] = v.dtype
        v = v.detach().cpu()
        return (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
    v = np.asarray(v)
    meta["dtype"][key] = v.dtype
    return v


def _restore(v: np.ndarray, key: str, meta: dict[str, Any]) -> Any:
    """Inverse of :func:`_numpy`: back to the recorded type (and device)."""
    if key in meta["tensor"]:
        t = torch.from_numpy(np.ascontiguousarray(v))
        return t.to(device=meta["tensor"][key], dtype=meta["dtype"][key])
    return v.astype(meta["dtype"][key], copy=False)


def _unpack(sample: Sample) -> tuple[Sample, dict[str, Any]]:
    if "image" not in sample:
        raise KeyError("a sample needs an 'image'")
    work = dict(sample)
    meta: dict[str, Any] = {"tensor": {}, "dtype": {}, "no_boxes": "boxes" not in sample}
    a = _numpy(sample["image"], "image", meta)
    if "image" in meta["tensor"] and a.ndim == 3:
        a = np.transpose(a, (1, 2, 0))
    meta["gray"] = a.ndim == 2
    work["image"] = (a[..., None] if meta["gray"] else a).astype(np.float32)  # a copy: the caller's is kept
    work["_range"] = 255.0 if meta["dtype"]["image"] in (np.uint8, torch.uint8) else 1.0
    work.setdefault("boxes", np.zeros((0, 4), np.float32))
    for key in work.keys() & {"boxes", "mask", *PER_BOX_KEYS}:
        v = _numpy(work[key], key, meta)
        work[key] = v.astype(np.float32).reshape(-1, 4) if key == "boxes" else v.copy()
    return work, meta


def _pack(work: Sample, meta: dict[str, Any]) -> Sample:
    out = {k: v for k, v in work.items() if not k.startswith("_")}
    a = work["image"]
    if meta["dtype"]["image"] in (np.uint8, torch.uint8):
        a = np.clip(np.rint(a), 0, 255)
    a = a[..., 0] if meta["gray"] else a
    if "image" in meta["tensor"] and a.ndim == 3:
        a = np.transpose(a, (2, 0, 1))
    out["image"] = _restore(a, "image", meta)
    if meta["no_boxes"]:
        out.pop("boxes", None)
    for key in out.keys() & {"boxes", "mask", *PER_BOX_KEYS}:
        v = np.asarray(out[key])
        if key in meta["dtype"]:
            out[key] = _restore(v, key, meta)
        elif "boxes" in meta["tensor"]:  # a per-box value created here (MixUp's weights)
            out[key] = torch.from_numpy(np.ascontiguousarray(v)).to(meta["tensor"]["boxes"])
    return out


def _select_boxes(work: Sample, keep: np.ndarray) -> None:
    """Keep the boxes (and their per-box values) where ``keep`` is True."""
    work["boxes"] = work["boxes"][keep]
    for key in PER_BOX_KEYS:
        if key in work:
            work[key] = np.asarray(work[key])[keep]


def _clip_filter(work: Sample, region: tuple[float, float, float, float], ref_area: np.ndarray | None,
                 min_size: float, min_visibility: float) -> None:
    """Clip boxes to ``region`` (x0, y0, x1, y1); drop thin ones and mostly-cut-away ones
    (``ref_area``: each box's area before clipping, default now)."""
    b = work["boxes"]
    if ref_area is None:
        ref_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    x0, y0, x1, y1 = region
    c = b.clip(np.float32([x0, y0, x0, y0]), np.float32([x1, y1, x1, y1]))
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visibility * np.maximum(ref_area, 1e-9))
    work["boxes"] = c
    _select_boxes(work, keep)


def _hw(work: Sample) -> tuple[int, int]:
    return int(work["image"].shape[0]), int(work["image"].shape[1])


class Transform:
    """Base class: ``__call__`` converts to the working form, ``apply(work, rng) -> work`` does
    the work (``work["_range"]`` = 255 or 1). With a probability ``p``, subclasses implement
    ``_apply`` instead, run when one ``rng.random()`` draw is below ``p``.
    """

    p: float
    min_size: float = 2.0  # the box filter of the geometric transforms
    min_visibility: float = 0.1

    def apply(self, work: Sample, rng: np.random.Generator) -> Sample:  # noqa: D102
        return self._apply(work, rng) if rng.random() < self.p else work

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, sample: Sample, rng: RngLike = None) -> Sample:
        work, meta = _unpack(sample)
        return _pack(self.apply(work, as_rng(rng)), meta)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order with one rng; the image is converted back only once."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def apply(self, work: Sample, rng: np.random.Generator) -> Sample:  # noqa: D102
        for t in self.transforms:
            work = t.apply(work, rng)
        return work


# --------------------------------------------------------------------------------------
# Photometric: pixels only, boxes and masks untouched.


def _gray(img: np.ndarray) -> np.ndarray:
    """``(H, W, 1)`` luma (ITU-R 601, as PIL and torchvision); grey images pass through."""
    if img.shape[-1] < 3:
        return img[..., :1]
    return (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]


def adjust_brightness(img: np.ndarray, factor: float, vmax: float = 1.0) -> np.ndarray:
    """Scale intensities by ``factor`` (0 -> black, 1 -> unchanged); ``(H, W, C)``, clipped."""
    return np.clip(img * factor, 0.0, vmax)


def adjust_contrast(img: np.ndarray, factor: float, vmax: float = 1.0) -> np.ndarray:
    """Blend with the mean grey level (0 -> flat grey, 1 -> unchanged); clipped."""
    m = _gray(img).mean()
    return np.clip(m + (img - m) * factor, 0.0, vmax)


def adjust_saturation(img: np.ndarray, factor: float, vmax: float = 1.0) -> np.ndarray:
    """Blend with the per-pixel grey image (0 -> greyscale, 1 -> unchanged); clipped."""
    g = _gray(img)
    return np.clip(g + (img - g) * factor, 0.0, vmax)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, maxc], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    conds = [i == k for k in range(6)]
    rgb = ([v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q])  # each channel by sextant
    return np.stack([np.select(conds, channel) for channel in rgb], -1)


def adjust_hue(img: np.ndarray, shift: float, vmax: float = 1.0) -> np.ndarray:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]); RGB only, grey passes through."""
    if img.shape[-1] < 3 or shift == 0:
        return img
    hsv = rgb_to_hsv(img[..., :3] / vmax)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    out = img.copy()
    out[..., :3] = hsv_to_rgb(hsv) * vmax
    return out


class ColorJitter(Transform):
    """Random brightness, contrast, saturation (factors in ``[1 - x, 1 + x]``) and hue
    (shift in ``[-hue, hue]`` turns), applied in a random order as torchvision does."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3,
                 hue: float = 0.015, p: float = 1.0) -> None:
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.hue, self.p = hue, p

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        factors = ((adjust_brightness, self.brightness), (adjust_contrast, self.contrast),
                   (adjust_saturation, self.saturation))
        ops: list[tuple[Callable[..., np.ndarray], float]] = [
            (op, rng.uniform(max(0.0, 1 - x), 1 + x)) for op, x in factors if x]
        if self.hue:
            ops.append((adjust_hue, rng.uniform(-self.hue, self.hue)))
        for k in rng.permutation(len(ops)):
            op, factor = ops[k]
            work["image"] = op(work["image"], factor, work["_range"]).astype(np.float32)
        return work


class GaussianNoise(Transform):
    """Additive Gaussian noise with ``std`` a fraction of the range (0.02 = 5 grey levels)."""

    def __init__(self, std: float = 0.02, p: float = 0.5) -> None:
        self.std, self.p = std, p

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        vmax = work["_range"]
        noise = rng.normal(0.0, self.std * vmax, work["image"].shape).astype(np.float32)
        work["image"] = np.clip(work["image"] + noise, 0.0, vmax)
        return work


# --------------------------------------------------------------------------------------
# Geometric: image, boxes and mask move together.


def _warp_affine(work: Sample, matrix: np.ndarray, out_hw: tuple[int, int], fill: float, mask_fill: int,
                 min_size: float, min_visibility: float) -> Sample:
    """Warp image, mask and boxes by the forward affine ``matrix`` (3x3, pixel coords x, y).

    Each output pixel centre ``p + 0.5`` is mapped back through the inverse and sampled
    bilinearly (nearest for the mask); points outside the source get ``fill`` / ``mask_fill``.
    """
    from scipy import ndimage  # imported here: only geometric transforms need it

    inv = np.linalg.inv(matrix)
    lin, t = inv[:2, :2], inv[:2, 2]
    # ndimage works in (row, col): both axes of the (x, y) matrix and offset reversed.
    offset = (lin @ np.array([0.5, 0.5]) + t - 0.5)[::-1]
    warp = functools.partial(ndimage.affine_transform, matrix=lin[::-1, ::-1], offset=offset,
                             output_shape=out_hw, mode="constant", prefilter=False)
    cval = float(fill) * work["_range"]  # float32 in, float32 out
    work["image"] = np.stack([warp(ch, order=1, cval=cval) for ch in work["image"].transpose(2, 0, 1)], -1)
    if "mask" in work:
        m = work["mask"]
        src = m.astype(np.int64) if m.dtype == bool else m
        work["mask"] = warp(src, order=0, cval=mask_fill).astype(m.dtype)
    b = work["boxes"]
    if len(b):
        corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], 1)  # (N, 4, 2)
        moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
        work["boxes"] = np.concatenate([moved.min(1), moved.max(1)], 1).astype(np.float32)
    _clip_filter(work, (0, 0, out_hw[1], out_hw[0]), None, min_size, min_visibility)
    return work


def _rescale(work: Sample, s: float, mask_fill: int, min_size: float, min_visibility: float) -> Sample:
    """Resize to ``round(s H) x round(s W)``; boxes scale by the exact per-axis factors."""
    h, w = _hw(work)
    oh, ow = max(1, round(h * s)), max(1, round(w * s))
    matrix = np.diag([ow / w, oh / h, 1.0])
    return _warp_affine(work, matrix, (oh, ow), 0.0, mask_fill, min_size, min_visibility)


def _translate(work: Sample, dx: int, dy: int, out_hw: tuple[int, int], fill: float, mask_fill: int,
               region: tuple[int, int, int, int], min_size: float, min_visibility: float) -> Sample:
    """Place the image at integer offset ``(dx, dy)`` on an ``out_hw`` canvas (exact, no
    resampling); boxes shift with it, then :func:`_clip_filter` keeps them to ``region``."""
    b = work["boxes"]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    h, w = _hw(work)
    oh, ow = out_hw
    # Intersection of the shifted source with the canvas, in canvas and source coordinates.
    x0, y0, x1, y1 = max(dx, 0), max(dy, 0), min(dx + w, ow), min(dy + h, oh)

    def place(a: np.ndarray, value: float) -> np.ndarray:
        canvas = np.full((oh, ow, *a.shape[2:]), value, a.dtype)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = a[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        return canvas

    work["image"] = place(work["image"], float(fill) * work["_range"])
    if "mask" in work:
        work["mask"] = place(work["mask"], mask_fill)
    work["boxes"] = b + np.array([dx, dy, dx, dy], np.float32)
    _clip_filter(work, region, area, min_size, min_visibility)
    return work


class _Flip(Transform):
    """Mirror along array axis ``_axis`` (0: rows, 1: columns) with probability ``p``."""

    _axis: int

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        size = _hw(work)[self._axis]
        for key in work.keys() & {"image", "mask"}:
            work[key] = np.flip(work[key], self._axis).copy()
        lo, hi = (1, 3) if self._axis == 0 else (0, 2)  # the box coordinates along that axis
        work["boxes"][:, [lo, hi]] = size - work["boxes"][:, [hi, lo]]  # the working copy, in place
        return work


class HorizontalFlip(_Flip):
    """Mirror left-right with probability ``p``: ``x1' = W - x2``, ``x2' = W - x1``."""

    _axis = 1


class VerticalFlip(_Flip):
    """Mirror top-bottom with probability ``p``: ``y1' = H - y2``, ``y2' = H - y1``."""

    _axis = 0


class RandomScale(Transform):
    """Resize the whole image by a factor drawn from ``scale`` (aspect kept); the output is
    ``round(s H) x round(s W)`` and boxes scale by the same per-axis factors."""

    def __init__(self, scale: tuple[float, float] = (0.5, 1.5), p: float = 1.0, mask_fill: int = 0) -> None:
        self.scale, self.p, self.mask_fill = scale, p, mask_fill

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        return _rescale(work, rng.uniform(*self.scale), self.mask_fill, self.min_size, self.min_visibility)


class RandomCrop(Transform):
    """Crop a random window: a fixed ``size=(h, w)`` (padded with ``fill`` where the image is
    smaller), or with ``size=None`` an area fraction from ``scale`` and aspect ratio (w / h)
    from ``ratio``, like RandomResizedCrop without the resize."""

    def __init__(self, size: tuple[int, int] | None = None, scale: tuple[float, float] = (0.3, 1.0),
                 ratio: tuple[float, float] = (0.5, 2.0), p: float = 1.0, fill: float = 0.0,
                 mask_fill: int = 0) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.p, self.fill, self.mask_fill = p, fill, mask_fill

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        if self.size is not None:
            ch, cw = self.size
        else:
            area = rng.uniform(*self.scale) * h * w
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw = max(1, int(round(min(w, math.sqrt(area * aspect)))))
            ch = max(1, int(round(min(h, math.sqrt(area / aspect)))))
        x0 = int(rng.integers(0, w - cw + 1)) if w >= cw else -int(rng.integers(0, cw - w + 1))
        y0 = int(rng.integers(0, h - ch + 1)) if h >= ch else -int(rng.integers(0, ch - h + 1))
        return x0, y0, cw, ch

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        x0, y0, cw, ch = self._window(*_hw(work), rng)
        return _translate(work, -x0, -y0, (ch, cw), self.fill, self.mask_fill, (0, 0, cw, ch), self.min_size,
                          self.min_visibility)


class RandomRotation(Transform):
    """Rotate about the image centre by an angle in ``[-degrees, degrees]`` (counter-clockwise
    on screen for positive angles), same canvas size; corners are filled with ``fill``. The
    new box encloses the rotated corners: loose for the object inside, as always with boxes.
    """

    def __init__(self, degrees: float = 10.0, p: float = 1.0, fill: float = 0.0, mask_fill: int = 0) -> None:
        self.degrees, self.p, self.fill, self.mask_fill = degrees, p, fill, mask_fill

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        h, w = _hw(work)
        a = math.radians(rng.uniform(-self.degrees, self.degrees))
        cx, cy = w / 2.0, h / 2.0
        c, s = math.cos(a), math.sin(a)
        # y points down, so this rotation matrix turns the picture counter-clockwise.
        rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
        to_c = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
        return _warp_affine(work, back @ rot @ to_c, (h, w), self.fill, self.mask_fill, self.min_size,
                            self.min_visibility)


# --------------------------------------------------------------------------------------
# Occlusion: pixels only. The occluded object is still there, so boxes and mask stay.


def _fill_value(work: Sample, fill: float | str | None, shape: tuple[int, ...],
                rng: np.random.Generator) -> np.ndarray | float:
    if fill == "random":
        return rng.uniform(0.0, work["_range"], shape).astype(np.float32)
    if fill is None or fill == "mean":
        return work["image"].reshape(-1, work["image"].shape[-1]).mean(0)
    return float(fill) * work["_range"]


class RandomErasing(Transform):
    """Random Erasing (Zhong et al. 2020): with probability ``p`` replace one rectangle of
    area fraction in ``scale`` and aspect ratio in ``ratio`` by random values (``fill="random"``),
    the image mean (``"mean"``) or a constant fraction of the range."""

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 3.3), fill: float | str = "random") -> None:
        self.p, self.scale, self.ratio, self.fill = p, scale, ratio, fill

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        h, w, c = work["image"].shape
        for _ in range(10):  # the paper retries until the rectangle fits
            area = rng.uniform(*self.scale) * h * w
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                work["image"][y : y + eh, x : x + ew] = _fill_value(work, self.fill, (eh, ew, c), rng)
                break
        return work


class Cutout(Transform):
    """Cutout (DeVries & Taylor 2017): zero ``n_holes`` squares of side ``size`` (pixels, or a
    fraction of the short side when < 1) centred anywhere in the image, so holes may be
    partly outside - the paper found that important."""

    def __init__(self, size: float = 0.25, n_holes: int = 1, p: float = 1.0, fill: float | str = 0.0) -> None:
        self.size, self.n_holes, self.p, self.fill = size, n_holes, p, fill

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        h, w, c = work["image"].shape
        side = int(round(self.size * min(h, w))) if self.size < 1 else int(self.size)
        for _ in range(self.n_holes):
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(0, cy - side // 2), min(h, cy - side // 2 + side)
            x0, x1 = max(0, cx - side // 2), min(w, cx - side // 2 + side)
            work["image"][y0:y1, x0:x1] = _fill_value(work, self.fill, (y1 - y0, x1 - x0, c), rng)
        return work


class HideAndSeek(Transform):
    """Hide-and-Seek (Singh & Lee 2017): split the image into ``g x g``-pixel patches, ``g``
    drawn from ``grid_sizes`` (0 = hide nothing), and hide each with probability ``p_hide``
    under the mean, so hidden patches keep the statistics a conv sees at test time."""

    def __init__(self, grid_sizes: Sequence[int] = (0, 16, 32, 44, 56), p_hide: float = 0.5,
                 fill: float | str | None = "mean") -> None:
        self.grid_sizes, self.p_hide, self.fill = tuple(grid_sizes), p_hide, fill

    def apply(self, work: Sample, rng: np.random.Generator) -> Sample:  # noqa: D102
        g = int(rng.choice(self.grid_sizes))
        if g <= 0:
            return work
        h, w = _hw(work)
        value = _fill_value(work, self.fill, (), rng)
        for y in range(0, h, g):
            for x in range(0, w, g):
                if rng.random() < self.p_hide:
                    work["image"][y : y + g, x : x + g] = value
        return work


class GridMask(Transform):
    """GridMask (Chen et al. 2020): remove a regular, randomly shifted grid of squares.

    In each ``d x d`` unit (``d`` from ``d_range``, fractions of the short side) a square of
    side ``(1 - ratio) d`` is removed: ratio 0.6 keeps 84 %. ``rotate``: random angle up to
    that many degrees.
    """

    def __init__(self, d_range: tuple[float, float] = (0.1, 0.4), ratio: float = 0.6, rotate: float = 0.0,
                 p: float = 0.7, fill: float | str = 0.0) -> None:
        self.d_range, self.ratio, self.rotate, self.p, self.fill = d_range, ratio, rotate, p, fill

    def grid(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """The ``(H, W)`` bool keep-mask (True = pixel kept)."""
        d = max(2, int(round(rng.uniform(*self.d_range) * min(h, w))))
        hole = int(round((1.0 - self.ratio) * d))
        oy, ox = int(rng.integers(0, d)), int(rng.integers(0, d))
        # Work on a larger canvas so that a rotated grid still covers the corners.
        big = int(math.ceil(math.hypot(h, w))) + d if self.rotate else max(h, w)
        ys, xs = (np.arange(big) + oy) % d, (np.arange(big) + ox) % d
        removed = (ys[:, None] < hole) & (xs[None, :] < hole)
        if self.rotate:
            from scipy import ndimage

            angle = rng.uniform(-self.rotate, self.rotate)
            removed = ndimage.rotate(removed.astype(np.uint8), angle, reshape=False, order=0).astype(bool)
            top, left = (big - h) // 2, (big - w) // 2
            removed = removed[top : top + h, left : left + w]
        return ~removed[:h, :w]

    def _apply(self, work: Sample, rng: np.random.Generator) -> Sample:
        keep = self.grid(*_hw(work), rng)
        img = work["image"]
        value = _fill_value(work, self.fill, img.shape, rng)
        work["image"] = np.where(keep[..., None], img, value).astype(np.float32)
        return work


# --------------------------------------------------------------------------------------
# Mixing several images.


def _concat_boxes(parts: Sequence[Sample], weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Concatenate boxes and per-box values of ``parts``; ``weights`` multiply ``"weights"``."""
    out = {"boxes": np.concatenate([p["boxes"] for p in parts]).astype(np.float32).reshape(-1, 4)}
    for key in PER_BOX_KEYS:
        present = [key in p for p in parts]
        if all(present):
            out[key] = np.concatenate([np.asarray(p[key]) for p in parts])
        elif any(present) and not (key == "weights" and weights is not None):
            raise ValueError(f"{key!r} is in some of the mixed samples but not all")
    if weights is not None:
        base = [np.asarray(p.get("weights", np.ones(len(p["boxes"]), np.float32)), np.float32) for p in parts]
        out["weights"] = np.concatenate([b * wt for b, wt in zip(base, weights)]).astype(np.float32)
    return out


def _unpack_pair(a: Sample, b: Sample, name: str) -> tuple[Sample, Sample, dict[str, Any]]:
    """Both samples in working form and ``a``'s meta (the output takes its types)."""
    (wa, meta), (wb, _) = _unpack(a), _unpack(b)
    if wa["image"].shape != wb["image"].shape:
        raise ValueError(f"{name} needs images of the same size and channels, got {wa['image'].shape} and "
                         f"{wb['image'].shape}; resize or crop first")
    return wa, wb, meta


class MixUp:
    """MixUp (Zhang et al. 2018) for detection as in YOLOv4/5: ``image = lam a + (1 - lam) b``
    with ``lam ~ Beta(alpha, alpha)``; boxes and labels of both are kept, and ``"weights"``
    carries ``lam`` / ``1 - lam`` per box for a weighted loss. ``"mixup_lambda"`` is added.
    A mask cannot be blended: the dominant image's is kept. Both images need the same size.
    """

    def __init__(self, alpha: float = 8.0) -> None:
        self.alpha = alpha  # YOLOv5 uses Beta(32, 32): lam stays near 0.5

    def __call__(self, a: Sample, b: Sample, rng: RngLike = None) -> Sample:  # noqa: D102
        wa, wb, meta = _unpack_pair(a, b, "MixUp")
        lam = float(as_rng(rng).beta(self.alpha, self.alpha))
        wa["image"] = (lam * wa["image"] + (1.0 - lam) * wb["image"]).astype(np.float32)
        wa.update(_concat_boxes([wa, wb], [lam, 1.0 - lam]))
        if "mask" in wa and "mask" in wb and lam < 0.5:
            wa["mask"] = wb["mask"]
        wa["mixup_lambda"] = lam
        return _pack(wa, meta)


class CutMix:
    """CutMix (Yun et al. 2019): paste a rectangle of image ``b`` into ``a`` at the same place.

    ``lam ~ Beta(alpha, alpha)``; the rectangle (pasted into the mask too) has area
    ``(1 - lam) H W`` and a uniform centre, clipped at the borders (``"cutmix_lambda"`` is from
    the real area). Each box is kept if ``min_visibility`` of it shows: ``a``'s outside the
    rectangle, ``b``'s (clipped) inside it.
    """

    def __init__(self, alpha: float = 1.0, min_visibility: float = 0.25, min_size: float = 2.0) -> None:
        self.alpha, self.min_visibility, self.min_size = alpha, min_visibility, min_size

    def __call__(self, a: Sample, b: Sample, rng: RngLike = None) -> Sample:  # noqa: D102
        rng = as_rng(rng)
        wa, wb, meta = _unpack_pair(a, b, "CutMix")
        h, w = _hw(wa)
        lam = float(rng.beta(self.alpha, self.alpha))
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch - ch // 2, 0, h))
        x0, x1 = int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw - cw // 2, 0, w))
        wa["image"][y0:y1, x0:x1] = wb["image"][y0:y1, x0:x1]
        if "mask" in wa and "mask" in wb:
            wa["mask"][y0:y1, x0:x1] = wb["mask"][y0:y1, x0:x1]
        # a's boxes: visible area = area - overlap with the pasted rectangle.
        ba = wa["boxes"]
        area_a = (ba[:, 2] - ba[:, 0]) * (ba[:, 3] - ba[:, 1])
        ix = (np.minimum(ba[:, 2], x1) - np.maximum(ba[:, 0], x0)).clip(0)
        iy = (np.minimum(ba[:, 3], y1) - np.maximum(ba[:, 1], y0)).clip(0)
        _select_boxes(wa, area_a - ix * iy >= self.min_visibility * np.maximum(area_a, 1e-9))
        # b's boxes: only their part inside the rectangle is in the picture.
        if x1 > x0 and y1 > y0:
            _clip_filter(wb, (x0, y0, x1, y1), None, self.min_size, self.min_visibility)
        else:
            _select_boxes(wb, np.zeros(len(wb["boxes"]), bool))
        wa.update(_concat_boxes([wa, wb]))
        wa["cutmix_lambda"] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        return _pack(wa, meta)


class Mosaic:
    """Mosaic (YOLOv4): four images around a random centre on one ``output_size`` canvas.

    The centre is drawn from the middle half of the canvas; each image, resized (aspect kept)
    to fit half the canvas, touches it with its inner corner and fills one quadrant, to which
    its boxes are clipped. Uncovered canvas is ``fill`` (YOLO grey), ``mask_fill`` in the
    mask. All samples need the same channels; the output takes the first sample's types.
    """

    def __init__(self, output_size: tuple[int, int] = (640, 640), fill: float = YOLO_GREY,
                 mask_fill: int = 0, min_size: float = 2.0, min_visibility: float = 0.1) -> None:
        self.output_size, self.fill, self.mask_fill = tuple(output_size), fill, mask_fill
        self.min_size, self.min_visibility = min_size, min_visibility

    def __call__(self, samples: Sequence[Sample], rng: RngLike = None) -> Sample:  # noqa: D102
        if len(samples) != 4:
            raise ValueError(f"Mosaic takes 4 samples, got {len(samples)}")
        rng = as_rng(rng)
        H, W = self.output_size
        works, metas = zip(*(_unpack(s) for s in samples))
        xc = int(rng.integers(W // 4, 3 * W // 4 + 1))
        yc = int(rng.integers(H // 4, 3 * H // 4 + 1))
        quads = [(0, 0, xc, yc), (xc, 0, W, yc), (0, yc, xc, H), (xc, yc, W, H)]
        has_mask = all("mask" in w for w in works)
        first = works[0]
        out = {k: v for k, v in first.items() if k not in ("mask", "boxes", *PER_BOX_KEYS)}
        out["image"] = np.full((H, W, first["image"].shape[-1]), self.fill * first["_range"], np.float32)
        if has_mask:
            out["mask"] = np.full((H, W), self.mask_fill, first["mask"].dtype)
        for k, work in enumerate(works):
            # One value range on the canvas: the first sample's (uint8 and [0, 1] may mix).
            work["image"] *= first["_range"] / work["_range"]
            work["_range"] = first["_range"]
            h, w = _hw(work)
            _rescale(work, min(H / (2.0 * h), W / (2.0 * w)), self.mask_fill, 0.0, 0.0)  # in place
            nh, nw = _hw(work)
            # Corner of the resized image that touches the centre.
            dx = xc - nw if k in (0, 2) else xc
            dy = yc - nh if k in (0, 1) else yc
            _translate(work, dx, dy, (H, W), self.fill, self.mask_fill, quads[k], self.min_size,
                       self.min_visibility)
            qx0, qy0, qx1, qy1 = quads[k]
            for key in ("image", "mask") if has_mask else ("image",):
                out[key][qy0:qy1, qx0:qx1] = work[key][qy0:qy1, qx0:qx1]
        out.update(_concat_boxes(works))
        if any(len(w["boxes"]) for w in works):
            metas[0]["no_boxes"] = False
        return _pack(out, metas[0])
