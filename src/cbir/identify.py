"""Identification: does an object's top-1 result name it, or is it "not in the collection"?

A prediction names its top-1 database image when the similarity passes an acceptance
threshold. The threshold is calibrated from the collection itself, never from a benchmark's
queries: a seeded sample of database images is edited the way a localized phone photo
differs from the reference image (a loose or tight crop with wall and frame around it, a small
rotation, colour and lighting shifts, blur, noise, JPEG) and searched against the database:

- its similarity to its own entry is what a painting *in* the collection scores;
- its best similarity to any *other* entry is what it would score if it were not there.

The threshold maximises the balanced accuracy (TPR + TNR) / 2 between the two samples, and is
stored with an index (``index.json``) or computed per benchmark in ``cbir eval``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from cbir.images import ImageError, open_image

CALIBRATION_SAMPLE = 120
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Calibration:
    """An acceptance threshold and the evidence for it."""

    threshold: float
    n: int  # edited images scored
    tpr: float  # share of in-collection edits accepted (and named correctly)
    tnr: float  # share of would-be unknowns rejected
    positive_median: float
    negative_median: float

    def to_json(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def edit_like_a_photo(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A database image as a localizer might hand it over from a phone photo (seeded)."""
    w, h = img.size
    # Framing: up to 12% of wall/frame around it, or up to 8% cut off each side.
    if rng.random() < 0.5:
        m = rng.uniform(0.02, 0.12)
        pw, ph = int(w * m) + 1, int(h * m) + 1
        wall = tuple(int(v) for v in rng.integers(40, 220, 3))
        canvas = Image.new("RGB", (w + 2 * pw, h + 2 * ph), wall)
        frame = tuple(int(v) for v in rng.integers(0, 160, 3))
        fw = max(1, int(min(pw, ph) * rng.uniform(0.2, 0.7)))
        canvas.paste(Image.new("RGB", (w + 2 * fw, h + 2 * fw), frame), (pw - fw, ph - fw))
        canvas.paste(img, (pw, ph))
        img = canvas
    else:
        cut = rng.uniform(0.0, 0.08, 4)
        img = img.crop((int(w * cut[0]), int(h * cut[1]), w - int(w * cut[2]), h - int(h * cut[3])))
    img = img.rotate(float(rng.uniform(-4, 4)), Image.BILINEAR, expand=False, fillcolor=(128, 128, 128))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.65, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.2))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.3:
        arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 12), (img.height, img.width, 1))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(40, 90)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def balanced_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float, float]:
    """The threshold maximising (TPR + TNR) / 2, accepting scores >= it; and that TPR, TNR.

    Ties are broken towards the middle of the best interval, so the threshold sits between
    the two samples rather than on one of their scores.
    """
    pos, neg = np.sort(np.asarray(positive, np.float64)), np.sort(np.asarray(negative, np.float64))
    cands = np.unique(np.concatenate([pos, neg, [np.inf]]))
    tpr = 1 - np.searchsorted(pos, cands, side="left") / max(1, pos.size)
    tnr = np.searchsorted(neg, cands, side="left") / max(1, neg.size)
    bal = (tpr + tnr) / 2
    best = np.flatnonzero(bal == bal.max())
    i = int(best[len(best) // 2])
    lo = cands[i - 1] if i > 0 else cands[i] - 1e-3
    t = float((lo + cands[i]) / 2) if np.isfinite(cands[i]) else float(lo + 1e-3)
    return t, float(tpr[i]), float(tnr[i])


def calibrate(
    extract: Callable[[list[Image.Image]], np.ndarray],
    sources: Sequence[str | Path],
    search_top2: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    sample: int = CALIBRATION_SAMPLE,
    seed: int = CALIBRATION_SEED,
    warn: Callable[[str], None] = print,
) -> Calibration:
    """Calibrate the acceptance threshold on edits of ``sources`` (the database's images).

    ``extract``: images -> descriptors ``(n, D)``; ``search_top2``: descriptors -> (scores,
    positions) ``(n, 2)`` among ``sources`` (position = index in ``sources``). Unreadable images
    are skipped. Needs at least 3 images.
    """
    if len(sources) < 3:
        raise ValueError(f"calibrating identification needs at least 3 database images, got {len(sources)}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(sources))[:sample]
    images, own = [], []
    for i in chosen:
        try:
            img = open_image(sources[i])
        except ImageError as e:
            warn(f"warning: {e}")
            continue
        img.thumbnail((640, 640))
        images.append(edit_like_a_photo(img, rng))
        own.append(int(i))
    if len(images) < 3:
        raise ValueError("calibrating identification: fewer than 3 database images could be read")
    vecs = extract(images)
    scores, pos = search_top2(vecs)
    own_arr = np.asarray(own)
    hit = pos[:, 0] == own_arr
    # Positive: scored against its own entry (rank 1 when found there; otherwise the photo would
    # be misnamed even if accepted, so it counts as a positive the threshold cannot save: -inf).
    positive = np.where(hit, scores[:, 0], -np.inf)
    # Negative: the best score among the *other* entries, as if its own were not in the index.
    negative = np.where(hit, scores[:, 1], scores[:, 0])
    t, tpr, tnr = balanced_threshold(positive[np.isfinite(positive)] if hit.any() else np.array([1.0]), negative)
    tpr = float(np.mean(positive >= t))
    return Calibration(t, len(images), tpr, tnr, float(np.median(scores[hit, 0])) if hit.any() else float("nan"),
                       float(np.median(negative)))


def top2_in(db: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``search_top2`` over an in-memory database ``(N, D)`` (NaN rows never match)."""
    valid = ~np.isnan(db[:, 0])
    dbz = np.where(valid[:, None], db, 0)

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims = np.nan_to_num(q) @ dbz.T
        sims[:, ~valid] = -np.inf
        pos = np.argsort(-sims, axis=1)[:, :2]
        return np.take_along_axis(sims, pos, 1), pos

    return search
