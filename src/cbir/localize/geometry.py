"""Pure functions between masks, boxes and quadrilaterals, shared by every localizer.

- `regions_from_mask`: a binary mask -> one `Region` per connected component (box, the
  component's minimum-area rotated rectangle as polygon, the component's own mask).
- `rectify`: a quadrilateral of a photo -> an upright rectangle image (perspective warp),
  so a tilted or obliquely seen painting reaches the network straight.
- `min_area_rect`, `order_corners`, `polygon_mask`, `polygon_box`, `polygon_area`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cbir.localize import Region

# A rectified crop never needs more pixels than this on its longer side: the extractor scales
# it to its input size (long384 by default) right after.
MAX_RECTIFIED_SIDE = 1024


def order_corners(pts: np.ndarray) -> np.ndarray:
    """Four points ``(4, 2)`` -> clockwise from the top-left (image coordinates, y down)."""
    pts = np.asarray(pts, np.float64).reshape(4, 2)
    c = pts.mean(axis=0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    pts = pts[np.argsort(ang)]  # clockwise on screen, since y grows downwards
    start = np.argmin(pts.sum(axis=1))  # top-left: smallest x + y
    return np.roll(pts, -start, axis=0)


def min_area_rect(points: np.ndarray) -> np.ndarray:
    """The minimum-area rectangle enclosing ``points`` ``(N, 2)``, as 4 ordered corners.

    Rotating calipers: the optimal rectangle has a side collinear with a convex-hull edge.
    """
    from scipy.spatial import ConvexHull, QhullError

    pts = np.asarray(points, np.float64)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):  # degenerate: all points on a line, or too few
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    angles = np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2))
    rot = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (A, 2): u axis; v = (-sin, cos)
    u = hull @ rot.T  # (H, A)
    v = hull @ np.stack([-rot[:, 1], rot[:, 0]], axis=1).T
    areas = (u.max(0) - u.min(0)) * (v.max(0) - v.min(0))
    i = int(np.argmin(areas))
    c, s = rot[i]
    u0, u1, v0, v1 = u[:, i].min(), u[:, i].max(), v[:, i].min(), v[:, i].max()
    corners = np.array([[uu * c - vv * s, uu * s + vv * c] for uu, vv in ((u0, v0), (u1, v0), (u1, v1), (u0, v1))])
    return order_corners(corners)


def polygon_box(polygon: np.ndarray, width: int | None = None, height: int | None = None) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, y0, x1, y1)`` of a polygon, clipped to the image when its size is given."""
    p = np.asarray(polygon, np.float64)
    x0, y0 = p.min(axis=0)
    x1, y1 = p.max(axis=0)
    if width is not None:
        x0, x1 = max(0.0, x0), min(float(width), x1)
    if height is not None:
        y0, y1 = max(0.0, y0), min(float(height), y1)
    return float(x0), float(y0), float(x1), float(y1)


def polygon_area(polygon: np.ndarray) -> float:
    """Area of a simple polygon ``(k, 2)`` (shoelace formula), in its units squared."""
    x, y = np.asarray(polygon, np.float64).T
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def polygon_mask(polygons: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Filled polygons -> bool ``(H, W)`` for an image of ``size`` = (W, H)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for p in polygons:
        draw.polygon([(float(x), float(y)) for x, y in np.asarray(p)], fill=255)
    return np.asarray(canvas) > 0


def regions_from_mask(
    mask: np.ndarray,
    score_map: np.ndarray | None = None,
    min_area: float = 0.005,
    max_regions: int = 10,
    polygons: bool = True,
) -> list[Region]:
    """Connected components of a bool ``(H, W)`` mask -> regions, largest-scoring first.

    ``min_area``: components smaller than this fraction of the photo are dropped (specks,
    labels). ``score_map`` ``(H, W)`` in [0, 1]: a region's score is its mean there (1 without).
    ``polygons``: give each region the minimum-area rotated rectangle of its pixels.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    slices = ndimage.find_objects(labels)
    out = []
    for i, (sl, area) in enumerate(zip(slices, areas), start=1):
        if sl is None or area < min_area * h * w:
            continue
        comp = labels == i
        ys, xs = sl
        box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
        score = float(score_map[comp].mean()) if score_map is not None else 1.0
        poly = None
        if polygons:
            # The hull of the component's boundary pixels, at pixel corners, is enough for calipers.
            sub = comp[sl]
            edge = sub & ~ndimage.binary_erosion(sub)
            yy, xx = np.nonzero(edge)
            pts = np.concatenate([np.stack([xx + dx, yy + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
            pts += (xs.start, ys.start)
            poly = min_area_rect(pts)
            poly[:, 0] = poly[:, 0].clip(0, w)
            poly[:, 1] = poly[:, 1].clip(0, h)
        out.append(Region(box, score, poly, comp))
    out.sort(key=lambda r: -r.score * _area(r.box))
    return out[:max_regions]


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def perspective_coefficients(src: np.ndarray, dst: np.ndarray) -> tuple[float, ...]:
    """The 8 coefficients PIL's PERSPECTIVE transform takes, mapping ``dst`` points to ``src``.

    PIL computes, for each output pixel (x, y), the input pixel
    ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)).
    """
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(dst, np.float64), np.asarray(src, np.float64)):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(np.linalg.solve(np.asarray(rows), np.asarray(rhs)).tolist())


def rectify(image: Image.Image, polygon: np.ndarray, max_side: int = MAX_RECTIFIED_SIDE) -> Image.Image:
    """The quadrilateral ``polygon`` ``(4, 2)`` of ``image``, warped to an upright rectangle.

    The output keeps the quadrilateral's mean side lengths (its aspect), capped at ``max_side``.
    """
    p = order_corners(polygon)
    top, bottom = np.linalg.norm(p[1] - p[0]), np.linalg.norm(p[2] - p[3])
    left, right = np.linalg.norm(p[3] - p[0]), np.linalg.norm(p[2] - p[1])
    w, h = (top + bottom) / 2, (left + right) / 2
    s = min(1.0, max_side / max(w, h, 1.0))
    ow, oh = max(2, round(w * s)), max(2, round(h * s))
    dst = np.array([[0, 0], [ow, 0], [ow, oh], [0, oh]], np.float64)
    return image.transform((ow, oh), Image.PERSPECTIVE, perspective_coefficients(p, dst), Image.BILINEAR)


def crop_region(image: Image.Image, region: Region) -> Image.Image:
    """What the extractor sees of a region: the rectified polygon, else the box crop."""
    if region.polygon is not None:
        return rectify(image, region.polygon)
    x0, y0, x1, y1 = region.box
    w, h = image.size
    return image.crop((max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1))))


def extraction_source(source, image: Image.Image, region: Region):
    """What the extractor gets for a region of the photo ``image`` decoded from ``source``: the
    source itself when the region is the whole photo and it can be re-read (then decoded at the
    reduced scale `cbir search` always used, so ``whole`` scores exactly what searching the photo
    scores), else the region's crop, rectified when it has a polygon."""
    w, h = image.size
    if region.polygon is None and tuple(region.box) == (0.0, 0.0, float(w), float(h)):
        return source
    return crop_region(image, region)
