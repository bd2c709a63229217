"""``cbir synth``: training photos composited from any collection of images.

Each photo shows 0-3 collection images hung on a wall, the way a visitor's phone photo of a
gallery does: procedural frames (wood, gilt, black, white, or none; with or without a mat),
perspective and in-plane rotation (up to 15 degrees), shadows, spotlights and lighting
fall-off, distractors (wall labels, doors, benches, a floor), then camera effects (blur,
gaussian and impulse noise, hue shifts, JPEG) and burnt-in text boxes with an artist-like
name drawn over part of a painting, as in the ``museum-multi`` photos.

The output is a benchmark folder in the layout of ``../shared/datasets/README.md``:
``gt.json`` lists the collection images (by a path relative to the output folder; nothing
is copied) as ``database`` and one query per photo, with ``objects`` (left to right, each
with the four corners of the painting as ``polygon``), ``bbox`` when the photo shows exactly
one painting, and a ``mask`` of all of them.

The object is the painting **with its frame**: the polygon is the frame's outer corners.
That is how the ``museum`` and ``museum-multi`` masks treat frames (they follow the outer
edge of the frame), and a detector trained on these photos should find the same thing.
With ``--depth`` the frame's underside (and sometimes a side), which a real photo shows just
outside the frame's front edge, is drawn too, outside the object.

Everything is drawn from ``numpy.random.SeedSequence(seed)``, one child per photo, so the same
seed writes the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cbir.images import ImageError, Resize, list_images, open_image

__all__ = ["SynthConfig", "SynthError", "compose_photo", "load_backgrounds", "synthesize", "synth"]


class SynthError(ValueError):
    """A synthesis that cannot run (e.g. a collection with no readable image); one line."""


@dataclass(frozen=True)
class SynthConfig:
    """Probabilities and ranges of everything :func:`compose_photo` draws.

    ``SynthConfig.clean()`` turns every photometric effect and distractor off (tests use it to
    check the geometry against the source pixels).
    """

    count_probs: tuple[float, float, float, float] = (0.08, 0.42, 0.30, 0.20)  # 0..3 paintings
    frame_probs: dict = field(default_factory=lambda: {
        "none": 0.25, "black": 0.17, "wood": 0.2, "gilt": 0.16, "white": 0.12, "silver": 0.1})
    p_mat: float = 0.2  # a passe-partout inside the frame
    frame_width: tuple[float, float] = (0.015, 0.12)  # of the painting's shorter side
    max_rotation: float = 15.0  # degrees, in-plane
    perspective: float = 0.16  # max relative shrink of the far edge
    p_stacked: float = 0.2  # two paintings one above the other instead of side by side
    p_cut: float = 0.08  # a single painting partly outside the photo
    p_closeup: float = 0.3  # a single painting filling most of the photo
    fill: tuple[float, float] = (0.65, 0.98)  # painting size within its slot
    gap: tuple[float, float] = (0.03, 0.1)  # between slots, of the layout region's width (height if stacked)
    p_background: float = 0.5  # a real background photo, when there are any
    p_floor: float = 0.35
    p_label: float = 0.45  # per painting
    p_door: float = 0.12
    p_bench: float = 0.35  # when there is a floor
    p_shadow: float = 0.8
    p_spotlight: float = 0.5
    p_text: float = 0.6  # per painting: burnt-in text box
    p_light_text_box: float = 0.7  # light box, dark text (else dark box, light text)
    p_blur: float = 0.3
    p_gauss: float = 0.35
    p_impulse: float = 0.15
    p_hue: float = 0.15
    p_jpeg: float = 0.6
    p_vignette: float = 0.6
    aspects: tuple[float, ...] = (4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4)
    p_portrait: float = 0.35
    long_side_jitter: float = 0.33  # long side drawn in long_side * [1 - j, 1 + j]
    # The frame's depth: the underside (and, seen off-axis, one side) of a real frame or
    # stretcher shows as a band just outside the painting, darker or lighter than the frame and
    # followed by its shadow. It is not part of the object (the museum masks stop at the
    # frame's front edge). 0 by default so that earlier commands write the same bytes.
    p_depth: float = 0.0
    depth: tuple[float, float] = (0.01, 0.08)  # the underside's height, of the painting's height

    @classmethod
    def clean(cls, **kw) -> "SynthConfig":
        off = dict(frame_probs={"none": 1.0}, p_mat=0.0, p_floor=0.0, p_label=0.0, p_door=0.0,
                   p_bench=0.0, p_shadow=0.0, p_spotlight=0.0, p_text=0.0, p_blur=0.0, p_gauss=0.0,
                   p_impulse=0.0, p_hue=0.0, p_jpeg=0.0, p_vignette=0.0, p_background=0.0)
        off.update(kw)
        return cls(**off)


# --------------------------------------------------------------------------------------------
# small helpers


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise of shape (h, w): random values on a coarse grid, bicubic."""
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BICUBIC), dtype=np.float32)


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with dst ~ H @ src for four point pairs."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y]); b.append(u)
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y]); b.append(v)
    h = np.linalg.solve(np.asarray(a, float), np.asarray(b, float))
    return np.append(h, 1.0).reshape(3, 3)


def _bbox_of(poly: np.ndarray, w: int, h: int) -> list[int]:
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    return [int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))]


def _overlaps(a, b, margin: float = 0.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


_FONT_FILES: list[str] | None = None


def _font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
    """A TrueType font of ``size`` px: a system DejaVu face when there is one, else Pillow's own."""
    global _FONT_FILES
    if _FONT_FILES is None:
        root = Path("/usr/share/fonts/truetype/dejavu")
        names = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")
        _FONT_FILES = [str(root / n) for n in names if (root / n).exists()]
    choice = int(rng.integers(len(_FONT_FILES) + 1))
    if choice < len(_FONT_FILES):
        try:
            return ImageFont.truetype(_FONT_FILES[choice], size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


_FIRST = ("Joan", "Josep", "Pablo", "Antoni", "Maria", "Marta", "Xavier", "Albert", "Ramon", "Lluisa",
          "Carles", "Montserrat", "Jordi", "Nuria", "Francesc", "Isabel", "Enric", "Teresa", "Miquel",
          "Santiago", "Elena", "Alfons", "Modest", "Rosa", "Pere", "Anna", "Jaume", "Clara", "Oriol", "Laia")
_LAST = ("Vilaro", "Ponc", "Borrell", "Guinovart", "Cuixart", "Rafols", "Casamada", "Tharrats", "Hernandez",
         "Sunyer", "Nonell", "Rusinol", "Casas", "Mir", "Gargallo", "Sert", "Torres", "Marti", "Puig",
         "Ferrer", "Soler", "Vidal", "Serra", "Pujol", "Riera", "Camps", "Bosch", "Roig", "Sala", "Mestres",
         "Llimona", "Tapies", "Clave", "Miralles", "Planells", "Valls")


def _artist_name(rng: np.random.Generator) -> str:
    first = _FIRST[int(rng.integers(len(_FIRST)))]
    last = _LAST[int(rng.integers(len(_LAST)))]
    r = rng.random()
    if r < 0.15:
        last += "-" + _LAST[int(rng.integers(len(_LAST)))]
    elif r < 0.25:
        last += " i " + _LAST[int(rng.integers(len(_LAST)))]
    return f"{first} {last}"


# --------------------------------------------------------------------------------------------
# walls


_WALL_COLOURS = np.array([
    (236, 232, 224), (228, 224, 216), (242, 240, 236), (214, 210, 202), (220, 214, 200),  # whites
    (200, 196, 190), (176, 172, 168), (150, 146, 142),  # greys
    (170, 120, 112), (140, 80, 76), (96, 112, 96), (80, 96, 120), (190, 170, 140), (60, 62, 66),
    (120, 90, 110), (210, 190, 160),
], np.float32)
_WALL_WEIGHTS = np.array([4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0.6, 0.5, 1], np.float64)


def _procedural_wall(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Plaster or paint, with a gradient; float32 (h, w, 3) in 0..255."""
    base = _WALL_COLOURS[rng.choice(len(_WALL_COLOURS), p=_WALL_WEIGHTS / _WALL_WEIGHTS.sum())]
    base = base * rng.uniform(0.9, 1.08) + rng.normal(0, 4, 3)
    wall = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    # plaster: blotches at a few scales, and fine grain
    tex = (_smooth_noise(rng, h, w, int(rng.integers(3, 8))) * rng.uniform(0.005, 0.03)
           + _smooth_noise(rng, h, w, int(rng.integers(20, 60))) * rng.uniform(0.0, 0.015))
    wall = wall * (1 + tex[..., None])
    wall += rng.normal(0, rng.uniform(0.5, 2.5), (h, w, 1)).astype(np.float32)
    # a linear gradient in a random direction
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = (a.astype(np.float32) for a in np.ogrid[0:h, 0:w])
    g = ((xx / w - 0.5) * np.cos(ang) + (yy / h - 0.5) * np.sin(ang)) * rng.uniform(0, 0.25)
    return wall * (1 + g[..., None])


def _floor(rng: np.random.Generator, wall: np.ndarray, y_floor: float, slope: float) -> None:
    """A floor below a (slightly tilted) line, with a skirting board; drawn into ``wall``."""
    h, w, _ = wall.shape
    yy, xx = (a.astype(np.float32) for a in np.ogrid[0:h, 0:w])
    line = y_floor + (xx - w / 2) * slope
    below = yy >= line
    kind = rng.integers(3)
    if kind == 0:  # wood boards
        col = np.array([150, 110, 70], np.float32) * rng.uniform(0.6, 1.2)
        streak = _smooth_noise(rng, 1, w, int(rng.integers(30, 80)))[0] * 0.08
        floor = col * (1 + streak[None, :, None] + _smooth_noise(rng, h, w, 10)[..., None] * 0.04)
    elif kind == 1:  # grey stone / concrete
        col = np.array([150, 150, 148], np.float32) * rng.uniform(0.6, 1.3)
        floor = col * (1 + _smooth_noise(rng, h, w, 12)[..., None] * 0.06)
    else:  # dark polished
        col = np.array([70, 66, 62], np.float32) * rng.uniform(0.7, 1.4)
        floor = col * (1 + _smooth_noise(rng, h, w, 6)[..., None] * 0.1)
    depth = np.clip((yy - line) / max(1.0, h - y_floor), 0, 1)[..., None]
    floor = floor * (0.85 + 0.3 * depth)
    wall[below] = floor[below]
    skirt = max(2, int(rng.uniform(0.005, 0.025) * h))
    band = (yy >= line - skirt) & ~below
    if rng.random() < 0.7:
        wall[band] = wall[band] * rng.uniform(0.5, 1.1)


def _inpaint_box(img: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Fill ``box`` from the wall around it: per-row and per-column linear interpolation of the
    border colours (median-smoothed, so a label on the border does not streak), blended by
    distance, plus the surrounding wall's grain."""
    from scipy.ndimage import gaussian_filter1d, median_filter

    def smooth(v):  # a border profile: no labels, no streaks
        v = median_filter(v, size=(31, 1), mode="nearest")
        return gaussian_filter1d(v, max(4.0, 0.04 * len(v)), axis=0, mode="nearest")

    h, w, _ = img.shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return img
    out = img.astype(np.float32).copy()
    bh, bw = y1 - y0, x1 - x0
    est, wts = np.zeros((bh, bw, 3), np.float32), np.zeros((bh, bw, 1), np.float32)
    ys = np.arange(bh, dtype=np.float32)[:, None, None]
    xs = np.arange(bw, dtype=np.float32)[None, :, None]
    have_l, have_r, have_t, have_b = x0 > 0, x1 < w, y0 > 0, y1 < h
    left = smooth(out[y0:y1, max(0, x0 - 6):x0].mean(1)) if have_l else None
    right = smooth(out[y0:y1, x1:x1 + 6].mean(1)) if have_r else None
    top = smooth(out[max(0, y0 - 6):y0, x0:x1].mean(0)) if have_t else None
    bottom = smooth(out[y1:y1 + 6, x0:x1].mean(0)) if have_b else None
    # horizontal estimate
    if left is not None or right is not None:
        l = left if left is not None else right
        r = right if right is not None else left
        t = xs / max(1, bw - 1)
        horiz = l[:, None, :] * (1 - t) + r[:, None, :] * t
        dist = np.minimum(xs + 1 if left is not None else 1e6, bw - xs if right is not None else 1e6)
        wt = 1.0 / dist
        est += horiz * wt; wts += wt
    if top is not None or bottom is not None:
        tp = top if top is not None else bottom
        bt = bottom if bottom is not None else top
        t = ys / max(1, bh - 1)
        vert = tp[None, :, :] * (1 - t) + bt[None, :, :] * t
        dist = np.minimum(ys + 1 if top is not None else 1e6, bh - ys if bottom is not None else 1e6)
        wt = 1.0 / dist
        est += vert * wt; wts += wt
    if wts.max() == 0:
        return img
    fill = est / np.maximum(wts, 1e-6)
    ring = np.concatenate([out[max(0, y0 - 8):y0, x0:x1].reshape(-1, 3), out[y1:y1 + 8, x0:x1].reshape(-1, 3)])
    grain = float(np.std(ring - ring.mean(0))) if ring.size else 2.0
    rng = np.random.default_rng(bh * 7919 + bw)
    fill += rng.normal(0, min(3.0, grain * 0.5), (bh, bw, 1)).astype(np.float32)
    out[y0:y1, x0:x1] = fill
    return np.clip(out, 0, 255).astype(np.uint8)


def load_backgrounds(source: str | Path | Sequence[Path], warn: Callable[[str], None] | None = None) -> list[Image.Image]:
    """Wall photos without an unlabelled painting on them.

    A benchmark folder (a ``gt.json``): its queries tagged ``background``, with the painting's
    box (grown by 5 %, more below and to the right, so the frame's edge and its shadow go too)
    filled from the surrounding wall; photos that are more than 60 % painting are left out. A plain folder (or a list of files): the images as they are.
    """
    warn = warn or _stderr
    if not isinstance(source, (str, Path)):
        paths, boxes = [Path(p) for p in source], None
    else:
        source = Path(source)
        gt = source / "gt.json"
        if gt.exists():
            data = json.loads(gt.read_text())
            items = [q for q in data.get("queries", []) if "background" in q.get("tags", ())]
            paths = [source / q["image"] for q in items]
            boxes = [_query_box(source, q) for q in items]
        else:
            paths, boxes = list_images(source), None
    out = []
    for i, p in enumerate(paths):
        try:
            img = open_image(p)
        except ImageError as e:
            warn(f"warning: skipping background {e}")
            continue
        if boxes is None and max(img.size) > 1600:  # bounded memory for a folder of big photos
            img.thumbnail((1600, 1600), Image.BILINEAR)
        if boxes is not None:
            box = boxes[i]
            if box is None:
                warn(f"warning: skipping background {p}: no bbox or mask to remove its painting")
                continue
            x0, y0, x1, y1 = box
            if (x1 - x0) * (y1 - y0) > 0.6 * img.width * img.height:
                continue  # mostly painting: too little wall to fill it from
            gx, gy = 0.05 * (x1 - x0) + 4, 0.05 * (y1 - y0) + 4
            arr = _inpaint_box(np.asarray(img), (x0 - gx, y0 - gy, x1 + gx * 1.5, y1 + gy * 2.5))
            img = Image.fromarray(arr)
        out.append(img)
    if not out:
        raise SynthError(f"{source}: no usable background image")
    return out


def _query_box(root: Path, q: dict):
    if q.get("bbox"):
        return [float(v) for v in q["bbox"]]
    objs = q.get("objects") or []
    if objs:
        b = np.array([o["bbox"] for o in objs], float)
        return [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
    if q.get("mask"):
        try:
            m = np.asarray(Image.open(root / q["mask"]).convert("L")) > 127
        except OSError:
            return None
        ys, xs = np.nonzero(m)
        if xs.size:
            return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return None


def _background_wall(rng: np.random.Generator, bg: Image.Image, w: int, h: int) -> np.ndarray:
    bw, bh = bg.size
    aspect = w / h
    cw, ch = (bw, bw / aspect) if bw / bh < aspect else (bh * aspect, bh)
    s = math.sqrt(rng.uniform(0.45, 1.0))
    cw, ch = cw * s, ch * s
    x0, y0 = rng.uniform(0, bw - cw), rng.uniform(0, bh - ch)
    crop = bg.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(crop, np.float32)
    return arr * rng.uniform(0.85, 1.12) + rng.normal(0, 4, 3).astype(np.float32)


# --------------------------------------------------------------------------------------------
# frames


_FRAME_COLOURS = {
    "black": [(22, 22, 22), (35, 32, 30), (12, 12, 14)],
    "wood": [(150, 100, 60), (120, 78, 45), (185, 140, 95), (95, 60, 35), (205, 170, 120)],
    "gilt": [(196, 156, 72), (176, 140, 60), (214, 180, 100)],
    "white": [(236, 234, 228), (222, 220, 214), (245, 245, 242)],
    "silver": [(176, 176, 172), (150, 150, 150), (200, 198, 192)],
}
_MAT_COLOURS = [(240, 238, 230), (250, 248, 244), (226, 220, 206), (30, 30, 30)]


def _framed(rng: np.random.Generator, painting: Image.Image, size: tuple[int, int], kind: str,
            frame_px: int, mat_px: int) -> Image.Image:
    """The painting in its frame, ``size`` (w, h) overall, as RGB."""
    W, H = size
    b = frame_px + mat_px
    iw, ih = max(1, W - 2 * b), max(1, H - 2 * b)
    inner = painting.resize((iw, ih), Image.BILINEAR, reducing_gap=2.0)
    if b == 0:
        return inner
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # distance to the outer edge and which side is nearest (mitred corners fall out of argmin)
    dists = np.stack([yy, W - 1 - xx, H - 1 - yy, xx])  # top, right, bottom, left
    side = dists.argmin(0)
    d = dists.min(0)
    out = np.zeros((H, W, 3), np.float32)
    if frame_px > 0:
        cols = _FRAME_COLOURS[kind]
        base = np.array(cols[int(rng.integers(len(cols)))], np.float32) * rng.uniform(0.85, 1.1)
        t = np.clip(d / frame_px, 0, 1)
        # profile across the moulding: a raised outer lip, a cove, a bead by the picture
        n_ridges = {"gilt": rng.uniform(2, 4.5), "silver": rng.uniform(1.5, 3)}.get(kind, rng.uniform(0.5, 1.5))
        profile = 1 + 0.18 * np.sin(t * np.pi * n_ridges + rng.uniform(0, np.pi))
        if kind in ("gilt", "silver"):
            profile += 0.25 * np.cos(t * np.pi * 2 * n_ridges) ** 8
        light = np.array([1.18, 0.98, 0.75, 1.02], np.float32)  # light from above
        if rng.random() < 0.5:
            light = light[[0, 3, 2, 1]]
        shade = light[side] * profile
        col = base[None, None] * shade[..., None]
        if kind == "wood":
            along = np.where(side % 2 == 0, xx, yy)
            grain = np.sin(d * rng.uniform(0.6, 1.4) + along * 0.02 + _smooth_noise(rng, H, W, 24) * 3)
            col = col * (1 + 0.07 * grain[..., None])
        elif kind in ("gilt", "silver"):
            col = col * (1 + 0.06 * _smooth_noise(rng, H, W, 60)[..., None])
        # dark edge lines outside and at the rabbet
        col[(d < 1.0) | ((d >= frame_px - 1) & (d < frame_px))] *= 0.55
        m = d < frame_px
        out[m] = col[m]
    if mat_px > 0:
        mcol = np.array(_MAT_COLOURS[int(rng.integers(len(_MAT_COLOURS)))], np.float32)
        m = (d >= frame_px) & (d < b)
        out[m] = mcol * rng.uniform(0.9, 1.02)
        bevel = (d >= b - max(1, mat_px // 12)) & (d < b)
        out[bevel] = np.minimum(255, mcol * 1.05)
    out[b:b + ih, b:b + iw] = np.asarray(inner, np.float32)
    if frame_px > 0 and mat_px == 0:
        # the frame's inner lip throws a thin shadow on the picture
        s = max(1, frame_px // 6)
        out[b:b + s, b:b + iw] *= 0.7
        out[b:b + ih, b:b + s] *= 0.85
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# layout


def _canonical_polygon(w: float, h: float, roll: float, yaw: float, pitch: float) -> np.ndarray:
    """Corners TL, TR, BR, BL of a w x h rectangle after perspective (yaw, pitch) and rotation."""
    hw, hh = w / 2, h / 2
    fx = 1 - abs(yaw) * 0.5
    fy = 1 - abs(pitch) * 0.5
    pts = np.array([
        [-hw * fx * (1 + pitch), -hh * fy * (1 - yaw)],
        [hw * fx * (1 + pitch), -hh * fy * (1 + yaw)],
        [hw * fx * (1 - pitch), hh * fy * (1 + yaw)],
        [-hw * fx * (1 - pitch), hh * fy * (1 - yaw)],
    ])
    c, s = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    return pts @ np.array([[c, s], [-s, c]])


def _slots(rng: np.random.Generator, k: int, aspects: list[float], region: tuple[float, float, float, float],
           stacked: bool, gap_range: tuple[float, float]) -> list[tuple[float, float, float, float]]:
    x0, y0, x1, y1 = region
    if k == 0:
        return []
    if stacked:
        # stacked paintings keep a little more room (a label may sit between them)
        gap = rng.uniform(gap_range[0] + 0.01, gap_range[1]) * (y1 - y0)
        wts = np.array([1 / a for a in aspects]) ** 0.7 * rng.uniform(0.7, 1.3, k)
        hs = (y1 - y0 - gap * (k - 1)) * wts / wts.sum()
        out, y = [], y0
        for hh in hs:
            out.append((x0, y, x1, y + hh)); y += hh + gap
        return out
    gap = rng.uniform(*gap_range) * (x1 - x0)
    wts = np.array(aspects) ** 0.7 * rng.uniform(0.6, 1.4, k)
    ws = (x1 - x0 - gap * (k - 1)) * wts / wts.sum()
    out, x = [], x0
    for ww in ws:
        # each painting has its own height band: paintings of one wall differ in size
        hh = (y1 - y0) * rng.uniform(0.8, 1.0)
        yt = y0 + rng.uniform(0, (y1 - y0) - hh)
        out.append((x, yt, x + ww, yt + hh)); x += ww + gap
    return out


def _warp_onto(photo: Image.Image, src: Image.Image, poly: np.ndarray, shadow: tuple | None) -> None:
    """Paste ``src`` (RGB) onto ``photo`` so that its corners land on ``poly`` (TL, TR, BR, BL)."""
    W, H = photo.size
    sw, sh = src.size
    bx0, by0, bx1, by1 = _bbox_of(poly, W, H)
    if bx1 - bx0 < 1 or by1 - by0 < 1:
        return
    Hm = _homography(np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], float), poly)
    inv = np.linalg.inv(Hm) @ np.array([[1, 0, bx0], [0, 1, by0], [0, 0, 1]], float)
    inv = inv / inv[2, 2]
    coeffs = tuple(inv.flatten()[:8])
    size = (bx1 - bx0, by1 - by0)
    rgba = src.convert("RGBA")
    warped = rgba.transform(size, Image.PERSPECTIVE, coeffs, Image.BILINEAR, fillcolor=(0, 0, 0, 0))
    alpha = warped.getchannel("A")
    photo.paste(warped.convert("RGB"), (bx0, by0), alpha)


def _draw_shadow(wall: np.ndarray, poly: np.ndarray, rng: np.random.Generator, dx: float, dy: float) -> None:
    h, w, _ = wall.shape
    radius = max(1.0, rng.uniform(0.004, 0.015) * max(w, h))
    strength = rng.uniform(0.25, 0.6)
    shifted = poly + [dx, dy]
    m = int(3 * radius) + 2
    x0, y0, x1, y1 = _bbox_of(np.vstack([shifted.min(0) - m, shifted.max(0) + m]), w, h)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in shifted], fill=255)
    a = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), np.float32)[..., None] / 255.0
    wall[y0:y1, x0:x1] *= 1 - a * strength


def _draw_depth(photo: Image.Image, poly: np.ndarray, others: list[np.ndarray], rng: np.random.Generator,
                depth: tuple[float, float]) -> None:
    """Draw the frame's underside below ``poly`` (TL, TR, BR, BL) and, half the time, one of its
    sides: quadrilaterals outside the polygon, in the colour of the frame's edge lit from above
    (darker) or catching the light (lighter), never over another painting."""
    w, h = photo.size
    tl, tr, br, bl = (np.asarray(v, float) for v in poly)
    ph = 0.5 * (np.linalg.norm(bl - tl) + np.linalg.norm(br - tr))
    down = (bl - tl + br - tr) / max(1e-6, np.linalg.norm(bl - tl + br - tr))
    d = rng.uniform(*depth) * ph
    below = [q for q in others if q[:, 1].min() >= max(bl[1], br[1]) - 2
             and q[:, 0].max() > min(bl[0], tl[0]) and q[:, 0].min() < max(br[0], tr[0])]
    if below:  # stop short of a painting hung underneath
        d = min(d, 0.8 * (min(q[:, 1].min() for q in below) - max(bl[1], br[1])))
    arr = np.asarray(photo)

    def edge_colour(a: np.ndarray, b: np.ndarray, inward: np.ndarray) -> np.ndarray:
        pts = [a + t * (b - a) + inward * 2.0 for t in np.linspace(0.1, 0.9, 9)]
        px = [arr[int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))] for x, y in pts]
        return np.median(np.asarray(px, float), 0)

    faces = []
    if d >= 1.5:
        tone = rng.uniform(0.35, 0.8) if rng.random() < 0.7 else rng.uniform(1.1, 1.5)
        faces.append(([bl, br, br + down * d * rng.uniform(0.7, 1.0), bl + down * d], edge_colour(bl, br, -down) * tone))
    if rng.random() < 0.5:
        across = (tr - tl + br - bl) / max(1e-6, np.linalg.norm(tr - tl + br - bl))
        sd = rng.uniform(0.2, 0.6) * d
        if rng.random() < 0.5:
            a, b, out = tr, br, across
        else:
            a, b, out = tl, bl, -across
        clear = all(q[:, 0].min() > max(a[0], b[0]) + sd or q[:, 0].max() < min(a[0], b[0]) - sd for q in others
                    if q[:, 1].max() > min(a[1], b[1]) and q[:, 1].min() < max(a[1], b[1]))
        if sd >= 1.5 and clear:
            faces.append(([a, a + out * sd + down * sd * 0.5, b + out * sd + down * sd, b], edge_colour(a, b, -out) * rng.uniform(0.35, 0.9)))
    if not faces:
        return
    layer = photo.copy()
    draw = ImageDraw.Draw(layer)
    for quad, colour in faces:
        draw.polygon([(float(x), float(y)) for x, y in quad], fill=tuple(int(c) for c in np.clip(colour, 0, 255)))
    outside = Image.new("L", photo.size, 255)  # the object mask's pixels stay the painting's
    for q in [poly, *others]:
        ImageDraw.Draw(outside).polygon([tuple(v) for v in q], fill=0)
    photo.paste(layer, mask=outside)


def _draw_label(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, float, float, float]) -> None:
    x0, y0, x1, y1 = box
    cols = [[245, 245, 240], [235, 230, 220], [250, 250, 250], [40, 40, 40], [180, 40, 40]]
    col = tuple(int(v) for v in cols[rng.choice(len(cols), p=[0.35, 0.25, 0.25, 0.1, 0.05])])
    draw.rectangle(box, fill=col)
    ink = (90, 90, 90) if sum(col) > 300 else (220, 220, 220)
    lines = int(rng.integers(2, 6))
    lh = (y1 - y0) / (lines * 2 + 1)
    for i in range(lines):
        ly = y0 + lh * (2 * i + 1)
        lx1 = x0 + (x1 - x0) * rng.uniform(0.4, 0.9)
        if lh >= 1:
            draw.rectangle((x0 + (x1 - x0) * 0.1, ly, lx1, ly + max(1, lh * 0.7)), fill=ink)


def _draw_door(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box) -> None:
    x0, y0, x1, y1 = box
    col = tuple(int(v) for v in rng.choice([[110, 80, 55], [70, 70, 72], [225, 225, 220], [150, 110, 70]]))
    casing = max(2, (x1 - x0) * 0.07)
    draw.rectangle((x0 - casing, y0 - casing, x1 + casing, y1), fill=tuple(int(c * 0.8) for c in col))
    draw.rectangle(box, fill=col)
    pw = (x1 - x0) * 0.12
    for py0, py1 in ((0.08, 0.45), (0.55, 0.92)):
        draw.rectangle((x0 + pw, y0 + (y1 - y0) * py0, x1 - pw, y0 + (y1 - y0) * py1),
                       outline=tuple(int(c * 0.7) for c in col), width=max(1, int(pw * 0.15)))
    hx = x1 - pw * 0.8 if rng.random() < 0.5 else x0 + pw * 0.4
    hy = y0 + (y1 - y0) * 0.5
    draw.rectangle((hx, hy, hx + pw * 0.4, hy + (y1 - y0) * 0.02), fill=(200, 200, 190))


def _draw_bench(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box) -> None:
    x0, y0, x1, y1 = box
    col = tuple(int(v) for v in rng.choice([[40, 40, 40], [120, 85, 55], [90, 60, 40], [200, 200, 200]]))
    seat = (y1 - y0) * 0.3
    draw.rectangle((x0, y0, x1, y0 + seat), fill=col)
    draw.rectangle((x0, y0 + seat, x1, y0 + seat * 1.2), fill=tuple(int(c * 0.6) for c in col))
    lw = (x1 - x0) * 0.05
    for lx in (x0 + lw, x1 - 2 * lw):
        draw.rectangle((lx, y0 + seat, lx + lw, y1), fill=tuple(int(c * 0.7) for c in col))


def _row_span(poly: np.ndarray, y: float) -> tuple[float, float] | None:
    """Where the horizontal line at ``y`` crosses the (convex) polygon: (x_left, x_right)."""
    xs = []
    for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, 0)):
        if (ay <= y <= by or by <= y <= ay) and ay != by:
            xs.append(ax + (y - ay) * (bx - ax) / (by - ay))
    return (min(xs), max(xs)) if len(xs) >= 2 else None


def _text_box(photo: Image.Image, rng: np.random.Generator, poly: np.ndarray, light: bool) -> None:
    """A burnt-in box with an artist-like name, near the top or bottom of the painting, inside it."""
    poly = np.asarray(poly, float)
    x0, y0 = poly.min(0)
    x1, y1 = poly.max(0)
    bw, bh = x1 - x0, y1 - y0
    if bw < 24 or bh < 24:
        return
    name = _artist_name(rng)
    size = int(max(9, min(bh * rng.uniform(0.05, 0.11), 64)))
    font = _font(rng, size)
    draw = ImageDraw.Draw(photo)
    frac = rng.uniform(0.06, 0.18)
    at_top = rng.random() < 0.6
    for _ in range(8):
        tb = draw.textbbox((0, 0), name, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        pad = max(2, int(th * 0.35))
        boxw, boxh = tw + 2 * pad, th + 2 * pad
        top = y0 + frac * bh if at_top else y1 - frac * bh - boxh
        spans = [_row_span(poly, top), _row_span(poly, top + boxh)]
        if None in spans:
            return
        lo, hi = max(sp[0] for sp in spans), min(sp[1] for sp in spans)
        room = (hi - lo) * 0.94
        if boxw <= room:
            break
        if size <= 9:
            return
        size = max(9, int(size * room / boxw * 0.97))
        font = _font(rng, size)
    else:
        return
    cx = (lo + hi) / 2 + rng.uniform(-0.5, 0.5) * (room - boxw) * 0.8
    left = int(round(cx - boxw / 2))
    top = int(round(top))
    if light:
        fill = tuple(int(v) for v in rng.integers(205, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    else:
        fill = tuple(int(v) for v in rng.integers(0, 50, 3))
        ink = tuple(int(v) for v in rng.integers(215, 256, 3))
    draw.rectangle((left, top, left + boxw, top + boxh), fill=fill)
    draw.text((left + pad - tb[0], top + pad - tb[1]), name, font=font, fill=ink)


def _hue_shift(arr: np.ndarray, shift: float, sat: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(arr).convert("HSV"), np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(shift * 255))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


# --------------------------------------------------------------------------------------------
# one photo


def compose_photo(
    paintings: Sequence[Image.Image],
    rng: np.random.Generator | int | None = None,
    *,
    long_side: int = 768,
    size: tuple[int, int] | None = None,
    background: Image.Image | None = None,
    config: SynthConfig | None = None,
) -> tuple[Image.Image, Image.Image, list[dict]]:
    """Hang ``paintings`` (0-3 PIL images, in memory) on a wall and photograph them.

    Returns ``(photo, mask, objects)``: the RGB photo; an ``L`` mask of its size, 255 on every
    painting (frame included); and one dict per painting, left to right, with ``bbox``
    ``[x0, y0, x1, y1]`` (the polygon's bounds clipped to the photo), ``polygon`` (the four
    outer corners of the frame, TL, TR, BR, BL of the painting, in pixels) and ``index`` (the
    painting's position in ``paintings``). ``background``: a wall photo to hang them on (else a
    procedural wall). ``size`` fixes (width, height); otherwise it is drawn around ``long_side``.
    """
    if len(paintings) > 3:
        raise ValueError(f"at most 3 paintings per photo, got {len(paintings)}")
    rng = _rng(rng)
    cfg = config or SynthConfig()
    k = len(paintings)

    if size is None:
        aspect = cfg.aspects[int(rng.integers(len(cfg.aspects)))]
        portrait = k <= 1 and rng.random() < cfg.p_portrait
        j = cfg.long_side_jitter
        L = int(round(long_side * rng.uniform(1 - j, 1 + j)))
        W, H = (int(round(L / aspect)), L) if portrait else (L, int(round(L / aspect)))
    else:
        W, H = size

    # wall
    if background is not None and rng.random() < cfg.p_background:
        wall = _background_wall(rng, background, W, H)
        has_floor, y_floor, slope = False, float(H), 0.0
    else:
        wall = _procedural_wall(rng, W, H)
        has_floor = rng.random() < cfg.p_floor
        y_floor = H * rng.uniform(0.75, 0.93) if has_floor else float(H)
        slope = 0.0

    # camera: a roll and a perspective shared by the photo, a little jitter per painting
    r = rng.random()
    roll = rng.uniform(-2, 2) if r < 0.5 else rng.uniform(-6, 6) if r < 0.85 else rng.uniform(-1, 1) * cfg.max_rotation
    yaw0 = rng.uniform(-1, 1) * cfg.perspective * (1.0 if rng.random() < 0.4 else 0.2)
    pitch0 = rng.uniform(-1, 1) * cfg.perspective * 0.4
    if has_floor:
        slope = math.tan(math.radians(roll)) * -1 if abs(roll) < 20 else 0.0

    # layout
    aspects = [p.width / p.height for p in paintings]
    stacked = k == 2 and rng.random() < cfg.p_stacked
    mx, my = rng.uniform(0.02, 0.09) * W, rng.uniform(0.03, 0.1) * H
    region = (mx, my, W - mx, min(H - my, y_floor - 0.03 * H))
    fill = cfg.fill
    if k == 1 and rng.random() < cfg.p_cut:
        region = (-0.1 * W, -0.1 * H, 1.1 * W, 1.1 * H)
    elif k == 1 and rng.random() < cfg.p_closeup:
        region = (0.02 * W, 0.02 * H, 0.98 * W, min(0.98 * H, y_floor))
        fill = (max(fill[0], 0.85), max(fill[1], 1.0))
    slots = _slots(rng, k, aspects, region, stacked, cfg.gap)
    polys, renders = [], []
    for i, (p, slot) in enumerate(zip(paintings, slots)):
        kind_names = list(cfg.frame_probs)
        probs = np.array([cfg.frame_probs[n] for n in kind_names], float)
        kind = kind_names[rng.choice(len(kind_names), p=probs / probs.sum())]
        frame_frac = rng.uniform(*cfg.frame_width) if kind != "none" else 0.0
        mat_frac = rng.uniform(0.04, 0.18) if kind != "none" and rng.random() < cfg.p_mat else 0.0
        pw, ph = p.size
        b = (frame_frac + mat_frac) * min(pw, ph)
        fw, fh = pw + 2 * b, ph + 2 * b
        proll = float(np.clip(roll + rng.normal(0, 0.8), -cfg.max_rotation, cfg.max_rotation))
        poly0 = _canonical_polygon(fw, fh, proll, yaw0 + rng.normal(0, 0.02), pitch0 + rng.normal(0, 0.01))
        ext = poly0.max(0) - poly0.min(0)
        sx0, sy0, sx1, sy1 = slot
        s = rng.uniform(*fill) * min((sx1 - sx0) / ext[0], (sy1 - sy0) / ext[1])
        poly = poly0 * s
        ext = ext * s
        lo = poly.min(0)
        cx = rng.uniform(sx0, max(sx0, sx1 - ext[0]))
        cy = rng.uniform(sy0, max(sy0, sy1 - ext[1]))
        poly = poly - lo + [cx, cy]
        poly = np.round(poly, 1)
        edges = np.linalg.norm(poly - np.roll(poly, -1, 0), axis=1)  # TL-TR, TR-BR, BR-BL, BL-TL
        rw = max(4, int(round(max(edges[0], edges[2]))))
        rh = max(4, int(round(max(edges[1], edges[3]))))
        sc = min(rw / fw, rh / fh)
        renders.append((i, kind, int(round(frame_frac * min(pw, ph) * sc)), int(round(mat_frac * min(pw, ph) * sc)), (rw, rh)))
        polys.append(poly)

    boxes = [_bbox_of(pl, W, H) for pl in polys]

    # spotlights and shadows on the wall
    if k and rng.random() < cfg.p_spotlight:
        yy, xx = (a.astype(np.float32) for a in np.ogrid[0:H, 0:W])
        light = np.full((H, W), rng.uniform(0.8, 0.92), np.float32)
        for bx in boxes:
            cx, top = (bx[0] + bx[2]) / 2, bx[1]
            sx = max(8.0, (bx[2] - bx[0]) * rng.uniform(0.5, 0.9))
            sy = max(8.0, (bx[3] - bx[1]) * rng.uniform(0.6, 1.1))
            light += rng.uniform(0.15, 0.35) * np.exp(-((xx - cx) / sx) ** 2 - ((yy - top - 0.2 * sy) / sy) ** 2)
        wall *= light[..., None]
    if has_floor:
        _floor(rng, wall, y_floor, slope)
    if cfg.p_shadow and rng.random() < cfg.p_shadow:
        dx = rng.uniform(-0.012, 0.012) * W
        dy = rng.uniform(0.004, 0.02) * H
        for pl in polys:
            _draw_shadow(wall, pl, rng, dx, dy)

    photo = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(photo)
    taken = [list(b) for b in boxes]

    def free(box, margin=3.0) -> bool:
        return (box[0] >= 0 and box[1] >= 0 and box[2] <= W and box[3] <= H
                and not any(_overlaps(box, t, margin) for t in taken))

    # distractors: a door, a bench, labels beside paintings
    if rng.random() < cfg.p_door:
        dw = rng.uniform(0.1, 0.2) * W
        dh = min(rng.uniform(0.55, 0.8) * H, y_floor * 0.95)
        dx = rng.uniform(0, 0.08) * W if rng.random() < 0.5 else W - dw - rng.uniform(0, 0.08) * W
        box = [dx, y_floor - dh, dx + dw, y_floor]
        if free([box[0] - dw * 0.1, box[1] - dw * 0.1, box[2] + dw * 0.1, box[3]]):
            _draw_door(draw, rng, box)
            taken.append(box)
    if has_floor and rng.random() < cfg.p_bench:
        bw_ = rng.uniform(0.25, 0.5) * W
        bh_ = rng.uniform(0.08, 0.15) * H
        bx = rng.uniform(0, W - bw_)
        by = min(H - bh_ - 1, y_floor + rng.uniform(0.0, 0.5) * (H - y_floor) - bh_ * 0.5)
        box = [bx, by, bx + bw_, by + bh_]
        if free(box):
            _draw_bench(draw, rng, box)
            taken.append(box)
    for bx in boxes:
        if rng.random() < cfg.p_label:
            lw = rng.uniform(0.025, 0.06) * W
            lh = lw * rng.uniform(0.4, 0.9)
            gap = rng.uniform(0.01, 0.04) * W
            ly = bx[1] + (bx[3] - bx[1]) * rng.uniform(0.3, 0.9)
            for lx in ((bx[2] + gap, bx[0] - gap - lw) if rng.random() < 0.7 else (bx[0] - gap - lw, bx[2] + gap)):
                box = [lx, ly, lx + lw, ly + lh]
                if free(box):
                    _draw_label(draw, rng, tuple(box))
                    taken.append(box)
                    break

    # the paintings
    for (i, kind, fpx, mpx, rsize), pl in zip(renders, polys):
        framed = _framed(rng, paintings[i].convert("RGB"), rsize, kind, fpx, mpx)
        _warp_onto(photo, framed, pl, None)
    if cfg.p_depth:
        for j, pl in enumerate(polys):
            if rng.random() < cfg.p_depth:
                _draw_depth(photo, pl, [q for m, q in enumerate(polys) if m != j], rng, cfg.depth)

    arr = np.asarray(photo, np.float32)
    # global light: vignetting / fall-off, colour cast, exposure
    if rng.random() < cfg.p_vignette:
        yy, xx = (a.astype(np.float32) for a in np.ogrid[0:H, 0:W])
        cx, cy = W * rng.uniform(0.3, 0.7), H * rng.uniform(0.2, 0.6)
        r2 = ((xx - cx) / W) ** 2 + ((yy - cy) / H) ** 2
        arr *= (1 - rng.uniform(0.1, 0.5) * np.clip(r2 / 0.5, 0, 1))[..., None]
    if cfg.p_vignette or cfg.p_gauss:  # "clean" keeps the paintings' pixels
        arr *= rng.uniform(0.92, 1.08, 3).astype(np.float32) * rng.uniform(0.85, 1.15)
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < cfg.p_blur:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))

    # objects, left to right
    order = sorted(range(k), key=lambda j: (boxes[j][0], boxes[j][1]))
    objects = [{"bbox": boxes[j], "polygon": [[float(x), float(y)] for x, y in polys[j]], "index": renders[j][0]}
               for j in order]

    # burnt-in text boxes, then the camera's noise
    light_box = rng.random() < cfg.p_light_text_box
    for o in objects:
        if rng.random() < cfg.p_text:
            _text_box(photo, rng, np.asarray(o["polygon"]), light_box)
    arr = np.asarray(photo)
    if rng.random() < cfg.p_hue:
        arr = _hue_shift(arr, rng.uniform(0.05, 0.95), rng.uniform(0.8, 1.5))
    if rng.random() < cfg.p_gauss:
        arr = np.clip(arr + rng.normal(0, rng.uniform(2, 12), arr.shape), 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_impulse:
        arr = arr.copy()
        dens = rng.uniform(0.005, 0.05)
        hit = rng.random(arr.shape) < dens
        arr[hit] = rng.integers(0, 256, int(hit.sum()), dtype=np.uint8)
    photo = Image.fromarray(np.ascontiguousarray(arr))
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=int(rng.integers(35, 90)))
        photo = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    mask = Image.new("L", (W, H), 0)
    md = ImageDraw.Draw(mask)
    for o in objects:
        md.polygon([tuple(p) for p in o["polygon"]], fill=255)
    return photo, mask, objects


# --------------------------------------------------------------------------------------------
# a benchmark folder


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _collection(collection: Sequence[Path] | Path) -> tuple[list[Path], Path | None]:
    if isinstance(collection, (str, Path)):
        root = Path(collection)
        if not root.is_dir():
            raise SynthError(f"{root}: no such collection folder")
        return list_images(root), root
    paths = [Path(p) for p in collection]
    return paths, None


def _holdout_key(path: Path, root: Path | None, names: set[str]) -> str | None:
    """The holdout entry that names ``path`` (its file name, its path, or its path under
    ``root``), or None."""
    keys = [path.name, str(path), path.as_posix()]
    if root is not None:
        try:
            keys.append(path.relative_to(root).as_posix())
        except ValueError:
            pass
    return next((k for k in keys if k in names), None)


_COUNT_TAGS = ("no-painting", "one-painting", "two-paintings", "three-paintings")


@dataclass
class _Job:
    """What every photo of one :func:`synthesize` run needs (picklable, for worker processes)."""

    readable: list[Path]
    rel: list[str]
    backgrounds: list[Image.Image]
    out: Path
    long_side: int
    config: SynthConfig

    def photo(self, i: int, seed: np.random.SeedSequence) -> tuple[dict, list[str]]:
        """Compose, write and describe photo ``i``: (its gt.json query, warnings)."""
        rng = np.random.default_rng(seed)
        cfg, warnings = self.config, []
        cp = np.array(cfg.count_probs, float)
        k = min(int(rng.choice(4, p=cp / cp.sum())), len(self.readable))
        picks = [int(j) for j in rng.choice(len(self.readable), k, replace=False)] if k else []
        imgs, used = [], []
        for j in picks:
            try:
                imgs.append(open_image(self.readable[j], Resize("long", max(256, self.long_side))))
                used.append(j)
            except ImageError as e:
                warnings.append(f"warning: skipping {e}")
        bgs = self.backgrounds
        bg = bgs[int(rng.integers(len(bgs)))] if bgs else None
        photo, mask, objs = compose_photo(imgs, rng, long_side=self.long_side, background=bg, config=cfg)
        name = f"queries/synth_{i:05d}"
        photo.save(self.out / f"{name}.jpg", "JPEG", quality=92)
        mask.save(self.out / f"{name}_mask.png")
        objects = [{"bbox": o["bbox"], "positives": [self.rel[used[o["index"]]]], "polygon": o["polygon"]}
                   for o in objs]
        q = {
            "image": f"{name}.jpg",
            "positives": sorted({p for o in objects for p in o["positives"]}),
            "junk": [],
            "tags": ["synthetic", _COUNT_TAGS[len(objects)]],
        }
        if len(objects) == 1:
            q["bbox"] = objects[0]["bbox"]
        q["mask"] = f"{name}_mask.png"
        q["objects"] = objects
        return q, warnings


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker_photo(i: int, seed: np.random.SeedSequence) -> tuple[dict, list[str]]:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.photo(i, seed)


def synthesize(
    collection: Sequence[Path] | Path,
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    backgrounds: str | Path | Sequence[Path] | None = None,
    holdout: Iterable[str] = (),
    long_side: int = 768,
    progress: Callable | None = None,
    *,
    config: SynthConfig | None = None,
    warn: Callable[[str], None] | None = None,
    workers: int = 1,
) -> Path:
    """Write ``n`` composite photos of ``collection`` and their ground truth to ``out_dir``.

    ``collection``: a folder (searched recursively) or a list of image files. ``holdout``:
    collection-relative paths or file names to leave out. ``backgrounds``: a benchmark folder
    (its ``background`` queries, painting removed) or a folder of wall photos. ``progress``: a
    tqdm-like factory (``progress(total=..., desc=...)``). ``workers`` > 1 composes photos in
    that many processes (same bytes as one). Unreadable images are skipped with a
    warning; a collection with none readable raises :class:`SynthError`. ``gt.json`` is written
    last, atomically. Returns the path of ``gt.json``.
    """
    warn = warn or _stderr
    if n < 0:
        raise SynthError(f"-n must be >= 0, got {n}")
    if not 64 <= long_side <= 8192:
        raise SynthError(f"long side {long_side} is outside 64..8192")
    paths, root = _collection(collection)
    names = {Path(str(h).strip()).as_posix() for h in holdout if str(h).strip()}
    hits = {p: _holdout_key(p, root, names) for p in paths}
    unmatched = names - set(hits.values())
    if unmatched:
        warn(f"warning: {len(unmatched)} --holdout name(s) match no collection image, e.g. {sorted(unmatched)[0]!r}")
    paths = [p for p in paths if hits[p] is None]
    where = root if root is not None else "the collection list"
    readable = []
    for p in paths:
        try:
            open_image(p, Resize("long", 64))
        except ImageError as e:
            warn(f"warning: skipping {e}")
            continue
        readable.append(p)
    if not readable:
        raise SynthError(f"{where}: no readable collection image" + (" left after --holdout" if names and paths == [] else ""))
    bgs = load_backgrounds(backgrounds, warn) if backgrounds is not None else []

    out = Path(out_dir)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    gt_path = out / "gt.json"
    if gt_path.exists():
        gt_path.unlink()  # an interrupted run must not leave an old gt.json over new files
    rel = [Path(os.path.relpath(os.path.abspath(p), os.path.abspath(out))).as_posix() for p in readable]
    cfg = config or SynthConfig()
    job = _Job(readable, rel, bgs, out, long_side, cfg)
    children = np.random.SeedSequence(seed).spawn(n)
    bar = progress(total=n, desc="synth", unit="photo") if progress else None
    queries = []
    try:
        if workers > 1 and n > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            # fork keeps the decoded backgrounds shared; each photo has its own seed, so the
            # bytes do not depend on the number of workers
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job,)) as ex:
                results = ex.map(_worker_photo, range(n), children, chunksize=2)
                for q, warnings in results:
                    for w in warnings:
                        warn(w)
                    queries.append(q)
                    if bar is not None:
                        bar.update(1)
        else:
            for i, child in enumerate(children):
                q, warnings = job.photo(i, child)
                for w in warnings:
                    warn(w)
                queries.append(q)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    gt = {"name": out.resolve().name, "database": rel, "queries": queries}
    tmp = out / f".gt.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(gt, indent=1))
    os.replace(tmp, gt_path)
    return gt_path


def read_holdout(path: str | Path) -> list[str]:
    """Names in a holdout file: one per line; blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SynthError(f"{path}: cannot read the holdout list ({e.strerror or e})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


# --------------------------------------------------------------------------------------------
# CLI (registered by cbir.cli._register_optional_commands)

import typer  # noqa: E402


def _range(option: str, text: str) -> tuple[float, float]:
    """``"0.01,0.05"`` -> (0.01, 0.05), within 0..1 and ordered; else a one-line error."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} {text!r}: give MIN,MAX, e.g. 0.01,0.05") from None
    if not 0 <= lo <= hi <= 1:
        raise typer.BadParameter(f"{option} {text!r}: need 0 <= MIN <= MAX <= 1")
    return lo, hi


def synth(
    collection_dir: Annotated[Path, typer.Argument(help="Folder of collection images (searched recursively).")],
    out_dir: Annotated[Path, typer.Argument(help="Benchmark folder to write: gt.json, queries/*.jpg and masks.")],
    n: Annotated[int, typer.Option("-n", "--num", help="Number of photos.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same bytes.")] = 0,
    backgrounds: Annotated[Optional[Path], typer.Option(
        "--backgrounds", help="Wall photos: a benchmark folder (its 'background' queries, painting removed) or a folder of images.")] = None,
    holdout: Annotated[Optional[Path], typer.Option(
        "--holdout", help="File listing collection images to leave out, one collection-relative path or file name per line.")] = None,
    long_side: Annotated[int, typer.Option("--long-side", help="Typical longer side of a photo, in pixels (drawn within +-33%).")] = 768,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Processes composing photos (the output does not depend on it).")] = 1,
    closeup: Annotated[float, typer.Option("--closeup", min=0.0, max=1.0, help="Probability that a photo of one painting is a close-up (the painting fills most of it).")] = SynthConfig.p_closeup,
    gap: Annotated[str, typer.Option("--gap", help="MIN,MAX gap between paintings hung side by side, as a fraction of the wall's width.")] = "{},{}".format(*SynthConfig.gap),
    fill: Annotated[str, typer.Option("--fill", help="MIN,MAX size of a painting within its slot (1: slots touch but for the gap).")] = "{},{}".format(*SynthConfig.fill),
    depth: Annotated[float, typer.Option("--depth", min=0.0, max=1.0, help="Probability that a painting's frame shows its depth (its underside, sometimes a side) outside the object.")] = SynthConfig.p_depth,
) -> None:
    """Synthesize training photos: collection images framed and hung on walls, with ground truth (boxes, polygons, masks)."""
    from tqdm import tqdm

    names = read_holdout(holdout) if holdout else []
    ranges = {name: _range(name, text) for name, text in (("--gap", gap), ("--fill", fill))}

    def progress(**kw):
        return tqdm(file=sys.stderr, dynamic_ncols=True, disable=None, **kw)

    gt = synthesize(collection_dir, out_dir, n, seed=seed, backgrounds=backgrounds, holdout=names,
                    long_side=long_side, progress=progress, workers=workers,
                    config=replace(SynthConfig(), p_closeup=closeup, gap=ranges["--gap"], fill=ranges["--fill"], p_depth=depth))
    typer.echo(f"wrote {n} photos and {gt}")
