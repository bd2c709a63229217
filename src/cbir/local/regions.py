"""Regions of an image for local-region aggregation: sliding windows (``regions:sliding<L>``: square
windows at L scales in the R-MAC layout, `cbir.pooling.functional.rmac_regions`) and selective-search
proposals (``regions:proposals<N>``: docs/methods.md says how segments are merged and filtered).

Boxes are ``(x0, y0, x1, y1)`` integer pixel coordinates, end exclusive. The first region is
always the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir.pooling.functional import rmac_regions
from cbir.registry import Registry

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionSpec:
    method: str  # "sliding" | "proposals"
    n: int  # levels for sliding windows, number of proposals
    size: int = 224  # each region is warped to size x size before the network

    def boxes(self, image: np.ndarray) -> list[Box]:
        return REGIONS.get(self.method).build(image, self.n)


# A region method: (uint8 (H, W, 3) image, n) -> boxes; tokens are regions:<method><n>[@<size>].
REGIONS = Registry("region method")
_N_SIZE = r"(\d+)(?:@(\d+))?"


def parse_regions(token: str) -> RegionSpec | None:
    """``"regions:sliding3"`` -> RegionSpec("sliding", 3); not a region token -> None."""
    if not token.startswith("regions:"):
        return None
    found = REGIONS.match(token[len("regions:"):])
    if found is None:
        forms = " or ".join(f"regions:{e.usage}" for e in REGIONS)
        raise ValueError(f"bad region step {token!r}: use {forms}, optionally @<size>")
    method, m = found
    size = int(m.group(2)) if m.group(2) else 224
    if not 32 <= size <= 1024:
        raise ValueError(f"region size {size} in {token!r} is outside 32..1024")
    return RegionSpec(method.name, int(m.group(1)), size)


def sliding_windows(h: int, w: int, levels: int = 3) -> list[Box]:
    """The whole image, then square windows at ``levels`` scales with ~40% overlap."""
    windows = [(x, y, x + sw, y + sh) for y, x, sh, sw in rmac_regions(h, w, levels)]
    return list(dict.fromkeys([(0, 0, w, h)] + windows))  # each box once, in first-seen order


def crop_and_warp(image: np.ndarray, boxes: list[Box], size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (R, size, size, 3): each box cut out and resized (aspect not kept, as in R-CNN)."""
    from PIL import Image

    pil = Image.fromarray(image)
    return np.stack([np.asarray(pil.resize((size, size), Image.BILINEAR, box=b)) for b in boxes])


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@REGIONS.register("sliding", option="L", pattern=_N_SIZE, summary="square windows at <L> scales, laid out as in R-MAC")
def _sliding(image: np.ndarray, levels: int) -> list[Box]:
    return sliding_windows(*image.shape[:2], levels)


@REGIONS.register("proposals", option="N", pattern=_N_SIZE, summary="the <N> best selective-search proposals")
def selective_search(image: np.ndarray, n: int = 16, work_size: int = 256, scale: float = 200.0,
                     sigma: float = 0.8, min_size: int = 50) -> list[Box]:
    """Up to ``n`` proposals (after the whole image) for a uint8 (H, W, 3) image."""
    from PIL import Image
    from skimage.segmentation import felzenszwalb

    H, W = image.shape[:2]
    f = min(1.0, work_size / max(H, W))
    small = np.asarray(Image.fromarray(image).resize((max(1, round(W * f)), max(1, round(H * f))), Image.BILINEAR))
    seg = felzenszwalb(small, scale=scale, sigma=sigma, min_size=min_size)
    out: list[Box] = [(0, 0, W, H)]
    for (x0, y0, x1, y1) in reversed(_group(small, seg)):
        box = (int(x0 / f), int(y0 / f), min(W, int(np.ceil(x1 / f))), min(H, int(np.ceil(y1 / f))))
        if (box[2] - box[0]) * (box[3] - box[1]) < 0.02 * W * H or any(_iou(box, b) > 0.8 for b in out):
            continue  # a sliver, or a near-duplicate
        out.append(box)
        if len(out) > n:
            break
    return out


def _group(image: np.ndarray, seg: np.ndarray) -> list[Box]:
    """Hierarchical grouping of the segments of ``seg``; boxes of all regions in creation order."""
    h, w = seg.shape
    n = int(seg.max()) + 1
    size = np.bincount(seg.ravel(), minlength=n).astype(np.float64)
    ys, xs = np.mgrid[0:h, 0:w]
    x0 = np.full(n, w); y0 = np.full(n, h); x1 = np.zeros(n, int); y1 = np.zeros(n, int)  # noqa: E702
    np.minimum.at(x0, seg.ravel(), xs.ravel()); np.minimum.at(y0, seg.ravel(), ys.ravel())  # noqa: E702
    np.maximum.at(x1, seg.ravel(), xs.ravel() + 1); np.maximum.at(y1, seg.ravel(), ys.ravel() + 1)  # noqa: E702
    bins = 25
    q = np.minimum((image.astype(np.int64) * bins) // 256, bins - 1)  # (h, w, 3)
    hist = np.zeros((n, 3 * bins))
    for c in range(3):
        np.add.at(hist, (seg.ravel(), c * bins + q[..., c].ravel()), 1.0)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1)
    regions = {i: {"size": size[i], "box": (x0[i], y0[i], x1[i], y1[i]), "hist": hist[i]} for i in range(n) if size[i] > 0}
    # adjacency from horizontally and vertically neighbouring pixels
    pairs = np.concatenate([
        np.stack([seg[:, :-1].ravel(), seg[:, 1:].ravel()], 1),
        np.stack([seg[:-1, :].ravel(), seg[1:, :].ravel()], 1),
    ])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    neighbours: dict[int, set[int]] = {i: set() for i in regions}
    for a, b in pairs:
        neighbours[int(a)].add(int(b))
        neighbours[int(b)].add(int(a))
    im_size = float(h * w)

    def similarity(a: dict, b: dict) -> float:
        colour = np.minimum(a["hist"], b["hist"]).sum() / 3.0
        s_size = 1.0 - (a["size"] + b["size"]) / im_size
        bx = (min(a["box"][0], b["box"][0]), min(a["box"][1], b["box"][1]),
              max(a["box"][2], b["box"][2]), max(a["box"][3], b["box"][3]))
        bb = (bx[2] - bx[0]) * (bx[3] - bx[1])
        fill = 1.0 - (bb - a["size"] - b["size"]) / im_size
        return colour + s_size + fill

    sims = {(a, b): similarity(regions[a], regions[b]) for a in neighbours for b in neighbours[a] if a < b}
    created = [tuple(int(v) for v in r["box"]) for r in regions.values()]
    next_id = n
    while sims:
        (a, b) = max(sims, key=sims.get)
        ra, rb = regions.pop(a), regions.pop(b)
        s = ra["size"] + rb["size"]
        box = (min(ra["box"][0], rb["box"][0]), min(ra["box"][1], rb["box"][1]),
               max(ra["box"][2], rb["box"][2]), max(ra["box"][3], rb["box"][3]))
        t = next_id
        next_id += 1
        regions[t] = {"size": s, "box": box, "hist": (ra["size"] * ra["hist"] + rb["size"] * rb["hist"]) / s}
        created.append(tuple(int(v) for v in box))
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for key in [k for k in sims if a in k or b in k]:
            del sims[key]
        neighbours[t] = nb
        for c in nb:
            neighbours[c] -= {a, b}
            neighbours[c].add(t)
            sims[(c, t)] = similarity(regions[c], regions[t])
    return created
