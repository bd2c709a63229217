"""``cbir train segmenter``: the PSPNet localizer trained on `cbir synth` composites.

Made to fit a 2-core CPU session:

1. **Cache** (once per data folder, input size and output stride): every photo is letterboxed,
   run through the frozen, dilated EfficientNet-Lite0, and its four taps (the stride-4 map for
   the edge decoder, stage 4 for the auxiliary head, stage 5, stage 6 for the pyramid pooling)
   are stored as float16 memmaps
   with the target mask at a quarter of the input's resolution. The augmentations are baked
   into the synthetic photos, so nothing is lost by caching. A killed caching run resumes.
2. **Head** (``--epochs``): the PSP head and the auxiliary head on the cached stage-6 / stage-4
   maps: cross-entropy (pixels between two paintings weighted up, U-Net's border weights)
   plus Dice, auxiliary loss weighted 0.4. AdamW, cosine schedule, EMA of the weights. With
   ``--core``, one more output channel learns each painting's core (its polygon shrunk inwards,
   `core_target`; BCE + Dice), the instance signal that separates paintings hung close.
3. **Fine-tune** (``--finetune-epochs``, optional): stage 6 of the backbone trained too, from
   the cached stage-5 maps (its BatchNorm statistics stay frozen).
4. **Thresholds**: the probability threshold, the minimum component area, the size of the
   map's grey opening, whether to split at a probability valley and the core level (with
   ``--core``) are chosen on the
   validation folders (pooled) at the photos' resolution
   (mean of pixel F1, box AP50 and count accuracy), and the final figures computed there.

Every epoch writes a checkpoint (``OUT.train/checkpoint.pt``) that a re-run with the same
options resumes from, ``history.json`` and ``curves.png``. The weights file ``OUT`` holds
only what was trained (float16), the chosen thresholds, the options and the figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image

from cbir.train import (History, ModelEMA, TrainingError, atomic_save, cosine_lr, load_checkpoint, progress,
                        read_ground_truth, seed_everything)

CACHE_VERSION = 2  # 2: the stride-4 map (f2) is cached too, for the edge decoder
TARGET_STRIDE = 4  # the loss is computed at input / 4
THRESHOLDS = (0.4, 0.5, 0.6)
MIN_AREAS = (0.005, 0.01, 0.02)
OPENINGS = (1, 3, 5)  # grey opening of the probability map, in cells of its grid (1: none)
VALLEYS = (False, True)  # also split a component at a probability valley (`split_at_valley`)
CORE_LEVELS = (0.3, 0.5, 0.7)  # levels of the core map that seed the cut of a component (with --core)
SELECT_SIDE = 512


@dataclass
class SegmenterOptions:
    epochs: int = 12
    finetune_epochs: int = 0
    batch: int = 16
    lr: float = 2e-3
    finetune_lr: float = 3e-4
    weight_decay: float = 1e-4
    aux_weight: float = 0.4
    dice_weight: float = 1.0
    border_weight: float = 5.0  # U-Net's w0 for background pixels between two paintings
    border_sigma: float = 2.0  # in target cells (input / 4)
    input_size: int = 384
    output_stride: int = 16
    decoder: bool = False  # the edge decoder on the stride-4 map (`cbir.models.pspnet.EdgeDecoder`)
    core: bool = False  # a core channel: each painting's polygon shrunk inwards (`core_target`)
    core_shrink: float = 0.6  # PSENet / DBNet's ratio r: the core is moved in by A (1 - r^2) / P
    core_weight: float = 1.0  # of the core's BCE + Dice in the loss
    seed: int = 0
    threads: int = 1  # one thread: on a shared 2-core machine a second one mostly waits
    limit: int = 0  # use only the first N training photos (0: all)
    ema_decay: float = 0.99


# --------------------------------------------------------------------------------- data


@dataclass
class Sample:
    image: Path
    mask: Path
    instances: list[np.ndarray] = field(default_factory=list)  # polygons (k, 2) in photo pixels


def read_folder(root: str | Path, what: str = "training") -> list[Sample]:
    """A benchmark folder (``gt.json`` with a ``mask`` per query) -> samples; one-line errors."""
    root = Path(root)
    queries = read_ground_truth(root)
    samples = []
    for q in queries:
        if not q.get("mask"):
            raise TrainingError(f"{root}: query {q.get('image')!r} has no mask; segmenter training needs one per photo")
        image, mask = root / q["image"], root / q["mask"]
        for p in (image, mask):
            if not p.is_file():
                raise TrainingError(f"{root}: {p.relative_to(root)} listed in gt.json is missing")
        inst = []
        for o in q.get("objects") or ([{"bbox": q["bbox"]}] if q.get("bbox") else []):
            if o.get("polygon"):
                inst.append(np.asarray(o["polygon"], np.float64).reshape(-1, 2))
            elif o.get("bbox"):
                x0, y0, x1, y1 = o["bbox"]
                inst.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
        _check_header(image)
        samples.append(Sample(image, mask, inst))
    if not samples:
        raise TrainingError(f"{root}: gt.json lists no photos")
    return samples


def _check_header(path: Path) -> None:
    """Size checks from the file's header alone, before anything is written."""
    import warnings

    from cbir.images import DEFAULT_MAX_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        raise TrainingError(f"{path}: over the limit of {DEFAULT_MAX_PIXELS / 1e6:.0f} Mpixel (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise TrainingError(f"{path}: not a readable image ({type(e).__name__})") from None
    if w * h > DEFAULT_MAX_PIXELS:
        raise TrainingError(f"{path}: {w}x{h} is over the limit of {DEFAULT_MAX_PIXELS / 1e6:.0f} Mpixel")
    if min(w, h) < 16:
        raise TrainingError(f"{path}: {w}x{h} is too small to train on (16 px at least)")


def _open(path: Path) -> Image.Image:
    from cbir.images import ImageError, open_image

    try:
        img = open_image(path)
    except ImageError as e:
        raise TrainingError(str(e)) from None
    if min(img.size) < 16:
        raise TrainingError(f"{path}: {img.width}x{img.height} is too small to train on (16 px at least)")
    return img


def border_weights(instances: list[np.ndarray], fg: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """U-Net's separation weights: ``1 + w0 exp(-(d1 + d2)^2 / 2 sigma^2)`` on background pixels,
    ``d1``, ``d2`` the distances to the nearest and second nearest painting (1 elsewhere)."""
    from scipy import ndimage

    h, w = fg.shape
    out = np.ones((h, w), np.float32)
    if len(instances) < 2 or w0 <= 0:
        return out
    dists = np.stack([ndimage.distance_transform_edt(~m) for m in instances])
    dists.sort(axis=0)
    wmap = 1 + w0 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * sigma ** 2))
    return np.where(fg, 1.0, wmap).astype(np.float32)


def shrink_distance(polygon: np.ndarray, ratio: float) -> float:
    """PSENet / DBNet's shrink offset ``A (1 - r^2) / P`` of a polygon ``(k, 2)`` (its units)."""
    from cbir.localize.geometry import polygon_area

    area = polygon_area(polygon)
    perimeter = float(np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum())
    return area * (1 - ratio ** 2) / max(perimeter, 1e-9)


def core_target(polygons: list[np.ndarray], size: tuple[int, int], ratio: float) -> np.ndarray:
    """Instance polygons (in target cells) -> bool ``(H, W)`` union of their cores: each polygon's
    pixels farther than `shrink_distance` from its edge (at least its innermost pixel), so two
    paintings' cores are apart by their gap plus both offsets even where their masks touch."""
    from scipy import ndimage

    from cbir.localize.geometry import polygon_mask

    out = np.zeros(size[::-1], bool)
    for p in polygons:
        m = polygon_mask([p], size)
        if not m.any():
            continue
        dist = ndimage.distance_transform_edt(m)  # a pixel centre is ~dist - 0.5 from the edge
        core = dist - 0.5 > shrink_distance(np.asarray(p, np.float64), ratio)
        out |= core if core.any() else dist >= dist.max()
    return out


def load_sample(s: Sample, size: int, w0: float, sigma: float):
    """-> (letterboxed normalized input (3, S, S), target (S/4, S/4) uint8, weights, content, photo size)."""
    from cbir.localize.geometry import polygon_mask
    from cbir.localize.pspnet import prepare

    img = _open(s.image)
    x, content = prepare(img, size)
    left, top, nw, nh = content
    try:
        m = Image.open(s.mask)
        m.load()
    except Exception as e:
        raise TrainingError(f"{s.mask}: unreadable mask ({type(e).__name__})") from None
    if m.size != img.size:
        raise TrainingError(f"{s.mask}: mask is {m.width}x{m.height}, the photo {img.width}x{img.height}")
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(m.convert("L").resize((nw, nh), Image.BILINEAR), (left, top))
    t = size // TARGET_STRIDE
    target = (np.asarray(canvas.resize((t, t), Image.BOX)) > 127).astype(np.uint8)
    inst = [polygon_mask([p * (size / max(img.size)) / TARGET_STRIDE + (left / TARGET_STRIDE, top / TARGET_STRIDE)], (t, t))
            for p in s.instances]
    weights = border_weights(inst, target.astype(bool), w0, sigma)
    return x[0], target, weights, content, img.size


class FeatureCache:
    """The frozen backbone's taps of a folder's photos, float16 memmaps in ``path``."""

    KEYS = ("f2", "f4", "f5", "f6")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.n = self.meta["n"]
        self.arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in (*self.KEYS, "target", "weight")}

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: np.ndarray, keys=("f4", "f6")) -> dict[str, torch.Tensor]:
        idx = np.sort(idx)
        out = {k: torch.from_numpy(np.asarray(self.arrays[k][idx], np.float32)) for k in keys}
        out["target"] = torch.from_numpy(np.asarray(self.arrays["target"][idx], np.int64))
        out["weight"] = torch.from_numpy(np.asarray(self.arrays["weight"][idx], np.float32))
        if "core" in self.arrays:
            out["core"] = torch.from_numpy(np.asarray(self.arrays["core"][idx], np.float32))
        return out

    def add_cores(self, samples: list[Sample], ratio: float) -> None:
        """The core targets (`core_target`, at the target's resolution) of the cached photos, from
        their polygons alone: computed once into ``core-r{ratio}.npy`` (atomically), so a cache
        built without them needs no second pass through the backbone."""
        path = self.path / f"core-r{ratio:g}.npy"
        if not path.is_file():
            t = self.meta["input_size"] // TARGET_STRIDE
            cores = np.zeros((self.n, t, t), np.uint8)
            for i, s in enumerate(samples):
                left, top, _, _ = self.meta["content"][i]
                scale = self.meta["input_size"] / max(self.meta["size"][i]) / TARGET_STRIDE
                polys = [p * scale + (left / TARGET_STRIDE, top / TARGET_STRIDE) for p in s.instances]
                cores[i] = core_target(polys, (t, t), ratio)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, cores)
            os.replace(tmp, path)
        self.arrays["core"] = np.load(path, mmap_mode="r")

    @classmethod
    def build(cls, root: Path, samples: list[Sample], net, opts: SegmenterOptions, cache_root: Path,
              desc: str) -> FeatureCache:
        gt_hash = hashlib.sha256((root / "gt.json").read_bytes()).hexdigest()[:12]
        key = f"{gt_hash}-n{len(samples)}-s{opts.input_size}-os{opts.output_stride}-b{opts.border_weight:g},{opts.border_sigma:g}-v{CACHE_VERSION}"
        path = cache_root / f"{root.name}-{key}"
        if (path / "meta.json").is_file():
            return cls(path)
        path.mkdir(parents=True, exist_ok=True)
        s, g, t = opts.input_size, opts.input_size // opts.output_stride, opts.input_size // TARGET_STRIDE
        from cbir.models.pspnet import AUX_CHANNELS, LAST_CHANNELS, LOW_CHANNELS, LOW_STRIDE, STAGE5_CHANNELS

        low = opts.input_size // LOW_STRIDE
        shapes = {"f2": (LOW_CHANNELS, low, low), "f4": (AUX_CHANNELS, g, g), "f5": (STAGE5_CHANNELS, g, g),
                  "f6": (LAST_CHANNELS, g, g), "target": (t, t), "weight": (t, t)}
        dtypes = {**dict.fromkeys(cls.KEYS, np.float16), "target": np.uint8, "weight": np.float16}
        done_file = path / "done.json"
        done = json.loads(done_file.read_text())["done"] if done_file.is_file() else 0
        mode = "r+" if done else "w+"
        arrays = {k: np.lib.format.open_memmap(path / f"{k}.npy", mode=mode, dtype=dtypes[k], shape=(len(samples), *shp))
                  for k, shp in shapes.items()}
        info = json.loads((path / "info.json").read_text()) if done and (path / "info.json").is_file() else {"content": [], "size": []}
        info["content"], info["size"] = info["content"][:done], info["size"][:done]
        bar = progress(len(samples), desc)
        bar.update(done)
        step = 8
        t0 = time.time()
        for i in range(done, len(samples), step):
            chunk = samples[i:i + step]
            loaded = [load_sample(x, s, opts.border_weight, opts.border_sigma) for x in chunk]
            x = torch.from_numpy(np.stack([a[0] for a in loaded]))
            with torch.inference_mode():
                taps = net.features(x)
            sl = slice(i, i + len(chunk))
            for k, f in zip(cls.KEYS, taps):
                arrays[k][sl] = f.numpy().astype(np.float16)
            arrays["target"][sl] = np.stack([a[1] for a in loaded])
            arrays["weight"][sl] = np.stack([a[2] for a in loaded]).astype(np.float16)
            info["content"] += [list(a[3]) for a in loaded]
            info["size"] += [list(a[4]) for a in loaded]
            for a in arrays.values():
                a.flush()
            (path / "info.json").write_text(json.dumps(info))
            _write_json(done_file, {"done": i + len(chunk)})
            bar.update(len(chunk))
            bar.set_postfix(img_s=f"{(i + len(chunk) - done) / (time.time() - t0):.1f}")
        bar.close()
        del arrays
        meta = {"n": len(samples), "root": str(root), "images": [str(x.image) for x in samples],
                "masks": [str(x.mask) for x in samples], "n_objects": [len(x.instances) for x in samples],
                "input_size": s, "output_stride": opts.output_stride, **info}
        _write_json(path / "meta.json", meta)
        return cls(path)


class CacheSet:
    """Several folders' caches as one training set (rows in folder order)."""

    def __init__(self, caches: list[FeatureCache]) -> None:
        self.caches = caches
        self.offsets = np.cumsum([0] + [len(c) for c in caches])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx: np.ndarray, keys) -> dict[str, torch.Tensor]:
        idx = np.sort(idx)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        parts = [c.batch(idx[which == i] - self.offsets[i], keys) for i, c in enumerate(self.caches) if (which == i).any()]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ training


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Pixel-weighted cross-entropy + Dice (the toolbox's), logits upsampled to the target."""
    from cbir.toolbox.losses import dice_loss

    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    ce = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()
    return ce + dice_weight * dice_loss(logits, target, mode="multiclass")


def core_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The core channel's loss: BCE + binary Dice, ``logit (B, h, w)`` upsampled to ``target (B, H, W)``."""
    from cbir.toolbox.losses import dice_loss

    logit = F.interpolate(logit[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return F.binary_cross_entropy_with_logits(logit, target) + dice_loss(logit, target, mode="binary")


def total_loss(net, main: torch.Tensor, batch: dict, opts: SegmenterOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The main head's loss (segmentation over the classes, plus the weighted core loss with a
    core channel) -> ``(loss, core part or None)``."""
    k = net.config.num_classes
    loss = segmentation_loss(main[:, :k], batch["target"], batch["weight"], opts.dice_weight)
    if not net.config.core:
        return loss, None
    part = core_loss(main[:, k], batch["core"])
    return loss + opts.core_weight * part, part


def _keys(net, finetune: bool) -> tuple[str, ...]:
    """The cached taps a training step reads."""
    return ("f4", "f5" if finetune else "f6") + (("f2",) if net.config.decoder else ())


def _forward(net, batch: dict, finetune: bool):
    f6 = net.last(batch["f5"]) if finetune else batch["f6"]
    main = net.head(f6, batch["f2"]) if net.config.decoder else net.head(f6)
    return main, net.aux(batch["f4"])


def pixel_iou(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1).bool()
    t = target.bool()
    return int((pred & t).sum()), int((pred | t).sum())


@torch.no_grad()
def evaluate_cache(net, cache: FeatureCache, opts: SegmenterOptions, finetune: bool) -> dict:
    net.eval()
    keys = _keys(net, finetune)
    loss_sum, inter, union, core_inter, core_union = 0.0, 0, 0, 0, 0
    k = net.config.num_classes
    for i in range(0, len(cache), opts.batch):
        b = cache.batch(np.arange(i, min(i + opts.batch, len(cache))), keys)
        main, aux = _forward(net, b, finetune)
        n = len(b["target"])
        loss_sum += float(total_loss(net, main, b, opts)[0]) * n
        a, u = pixel_iou(main[:, :k], b["target"])
        inter, union = inter + a, union + u
        if net.config.core:  # the core as a 2-class map: logit > 0
            a, u = pixel_iou(torch.stack([-main[:, k], main[:, k]], 1), b["core"].long())
            core_inter, core_union = core_inter + a, core_union + u
    figs = {"val_loss": loss_sum / len(cache), "val_iou": inter / max(union, 1)}
    return figs | ({"val_core_iou": core_inter / max(core_union, 1)} if net.config.core else {})


@torch.no_grad()
def probabilities(net, cache: FeatureCache, finetune: bool, batch: int = 16) -> np.ndarray:
    """`painting_maps` at the head's resolution for every cached photo ``(N, M, h, w)``: the
    painting probability, then the core probability with a core channel."""
    from cbir.models.pspnet import painting_maps

    net.eval()
    keys = _keys(net, finetune)
    out = []
    for i in range(0, len(cache), batch):
        b = cache.batch(np.arange(i, min(i + batch, len(cache))), keys)
        main, _ = _forward(net, b, finetune)
        out.append(painting_maps(main, net.config.num_classes).numpy())
    return np.concatenate(out)


def photo_figures(maps: np.ndarray, caches: list[FeatureCache], samples: list[Sample], thresholds=THRESHOLDS,
                  min_areas=MIN_AREAS, openings=OPENINGS, valleys=VALLEYS, core_levels=CORE_LEVELS,
                  split: bool = True) -> dict[tuple[float, float, int, bool, float | None], dict]:
    """At the photos' resolution (longer side capped to ``SELECT_SIDE``), for each
    (threshold, min_area, opening, valley, core level): pixel F1 (mean over photos), box AP50 and
    AP (COCO), count accuracy. ``maps`` ``(N, M, h, w)`` (`probabilities`) and ``samples`` run
    over the ``caches`` in order; the core level is None (and ``core_levels`` unused) when
    ``M`` is 1, as with ``valleys`` a grid axis otherwise."""
    from cbir.localize.pspnet import open_map, regions_from_probability, to_photo
    from cbir.metrics.detection import DetectionMAP

    rows = [(c.meta["input_size"], c.meta["size"][i], c.meta["content"][i]) for c in caches for i in range(len(c))]
    levels = tuple(core_levels) if maps.shape[1] > 1 else (None,)
    res = {(t, a, o, v, c): {"f1": [], "count": [], "preds": []}
           for t in thresholds for a in min_areas for o in openings for v in valleys for c in levels}
    targets = []
    for i, (s, (size, (w, h), content)) in enumerate(zip(samples, rows)):
        # At the photo's resolution, capped to SELECT_SIDE px: areas are fractions of the photo,
        # so the choice does not depend on the cap, and it is 4x faster than 1000 px photos.
        k = min(1.0, SELECT_SIDE / max(w, h))
        sw, sh = max(1, round(w * k)), max(1, round(h * k))
        gt = np.asarray(Image.open(s.mask).convert("L").resize((sw, sh), Image.NEAREST)) > 127
        boxes = k * np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in s.instances]).reshape(-1, 4)
        targets.append({"boxes": boxes, "labels": np.zeros(len(boxes), int)})
        for o in openings:  # the opening removes thin bridges from both maps
            prob = to_photo(open_map(maps[i, 0], o), size, tuple(content), (sw, sh))
            core = to_photo(open_map(maps[i, 1], o), size, tuple(content), (sw, sh)) if maps.shape[1] > 1 else None
            for t, a, v, c in itertools.product(thresholds, min_areas, valleys, levels):
                regions = regions_from_probability(prob, t, a, split=split, valley=v, core=core, core_level=c or 0.5)
                pm = np.zeros_like(gt)
                for r in regions:
                    pm |= r.mask
                tp = float((pm & gt).sum())
                f1 = 2 * tp / max(float(pm.sum() + gt.sum()), 1.0) if (pm.any() or gt.any()) else 1.0
                d = res[(t, a, o, v, c)]
                d["f1"].append(f1)
                d["count"].append(len(regions) == len(s.instances))
                d["preds"].append({"boxes": np.array([r.box for r in regions]).reshape(-1, 4),
                                   "scores": np.array([r.score for r in regions]), "labels": np.zeros(len(regions), int)})
    out = {}
    for key, d in res.items():
        m = DetectionMAP(style="coco")
        m.update(d["preds"], targets)
        c = m.compute()
        out[key] = {"pixel_f1": float(np.mean(d["f1"])), "det_ap50": float(c["map_50"]), "det_ap": float(c["map"]),
                    "count_accuracy": float(np.mean(d["count"]))}
    return out


def _select(figures: dict) -> tuple[tuple[float, float, int, bool, float | None], dict]:
    """The best mean of pixel F1, AP50 and count accuracy; ties go to the threshold nearest 0.5,
    then to the smallest opening, no valley split and the core level nearest 0.5 (the least
    post-processing)."""
    def score(f):
        return (f["pixel_f1"] + f["det_ap50"] + f["count_accuracy"]) / 3

    best = max(figures, key=lambda k: (round(score(figures[k]), 6), -abs(k[0] - 0.5), -k[2], -k[3],
                                       -abs((k[4] or 0.5) - 0.5)))
    return best, figures[best]


def _resumable(state: dict, hp: dict, data_key: list) -> bool:
    """Same options and data; or the same head phase, not yet past it, with another number of
    fine-tuning epochs (so a head-only run can be extended by a fine-tuning phase)."""
    if "model" not in state or state.get("data") != data_key:
        return False
    old = dict(state.get("hparams") or {})
    if old == hp:
        return True
    same_head = {k: v for k, v in old.items() if k != "finetune_epochs"} == {k: v for k, v in hp.items() if k != "finetune_epochs"}
    return same_head and state.get("epoch", 1 << 30) < hp["epochs"] and not state.get("finetune")


def _folders(arg: Path | list[Path]) -> list[Path]:
    """One folder or several -> a list of paths."""
    return [Path(d) for d in (arg if isinstance(arg, (list, tuple)) else [arg])]


def train(data: Path | list[Path], val: Path | list[Path], out: Path, opts: SegmenterOptions, log=print) -> dict:
    """Cache, train the head (and optionally stage 6), choose thresholds, write ``out``.

    ``data``: one training folder or several, trained on as one set; ``val`` likewise (the
    thresholds are chosen on all its photos pooled)."""
    from cbir.models.pspnet import PSPConfig, PSPNet

    torch.set_num_threads(max(1, opts.threads))
    if opts.epochs < 1 or opts.finetune_epochs < 0:
        raise TrainingError("--epochs must be at least 1 and --finetune-epochs at least 0")
    if opts.input_size % 32 or not 64 <= opts.input_size <= 1536:
        raise TrainingError(f"--input-size {opts.input_size}: a multiple of 32 within 64..1536")
    if opts.output_stride not in (8, 16):
        raise TrainingError(f"--output-stride {opts.output_stride}: 8 or 16")
    folders, val_folders = _folders(data), _folders(val)
    train_sets = [read_folder(d, "training") for d in folders]
    val_sets = [read_folder(v, "validation") for v in val_folders]
    if opts.limit:  # the first N photos, folder by folder
        left = opts.limit
        for i, ss in enumerate(train_sets):
            train_sets[i], left = ss[:left], max(0, left - len(ss))
    n_train = sum(map(len, train_sets))
    out = Path(out)
    work = out.with_name(out.name + ".train")
    total = opts.epochs + opts.finetune_epochs
    ckpt_path = work / "checkpoint.pt"
    hp = {k: v for k, v in asdict(opts).items() if k != "threads"}
    if not opts.core:  # runs without a core channel key as before it existed (old checkpoints resume)
        hp = {k: v for k, v in hp.items() if not k.startswith("core")}
    # One folder keys as a plain path, as before --data could be repeated (old checkpoints resume).
    data_key = [str(f[0]) if len(f) == 1 else [str(d) for d in f] for f in (folders, val_folders)] + [n_train]
    title = f"PSPNet on {' + '.join(d.name for d in folders)} (seed {opts.seed})"
    state = None
    if ckpt_path.is_file():  # checked before anything is computed or written
        state = load_checkpoint(ckpt_path)
        if not _resumable(state, hp, data_key):
            raise TrainingError(f"{ckpt_path}: a checkpoint of a run with other options or data; "
                                "delete it or use another --out")
    work.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(opts.seed)
    config = PSPConfig(input_size=opts.input_size, output_stride=opts.output_stride, decoder=opts.decoder,
                       core=opts.core)
    net = PSPNet(config, pretrained=True)
    net.eval()
    t_start = time.time()
    cache_root = work / "cache"
    tr = CacheSet([FeatureCache.build(d, ss, net, opts, cache_root, "cache train")
                   for d, ss in zip(folders, train_sets) if ss])
    val_caches = [FeatureCache.build(v, ss, net, opts, cache_root, "cache val") for v, ss in zip(val_folders, val_sets)]
    if opts.core:
        for c, ss in zip(tr.caches + val_caches, [ss for ss in train_sets if ss] + val_sets):
            c.add_cores(ss, opts.core_shrink)
    va = CacheSet(val_caches)
    cache_s = time.time() - t_start
    log(f"cached {len(tr)} training and {len(va)} validation photos in {cache_s:.0f} s")

    history = History()
    start_epoch, train_s = 0, 0.0
    seed_everything(opts.seed)
    ema = None
    opt = None
    if state is not None:
        net.load_trained_state(state["model"])
        start_epoch, train_s = state["epoch"] + 1, state["train_s"]
        history.rows = state["history"]
        gen.set_state(state["rng"])
        log(f"resuming from epoch {start_epoch + 1}/{total}")
    for epoch in range(start_epoch, total):
        finetune = epoch >= opts.epochs
        if opt is None or (finetune and epoch == opts.epochs):
            params = [{"params": list(net.head.parameters()) + list(net.aux.parameters()),
                       "lr": opts.finetune_lr if finetune else opts.lr}]
            if finetune:
                params.append({"params": list(net.last.parameters()), "lr": opts.finetune_lr * 0.3})
            for p in net.parameters():
                p.requires_grad_(False)
            for g in params:
                for p in g["params"]:
                    p.requires_grad_(True)
            opt = torch.optim.AdamW(params, weight_decay=opts.weight_decay)
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
            ema = ModelEMA(net, decay=opts.ema_decay, tau=20)
            if state is not None and state.get("optimizer") and state.get("finetune") == finetune:
                opt.load_state_dict(state["optimizer"])
                ema.ema.load_trained_state(state["ema"])
                ema.updates = state["ema_updates"]
        net.train()
        net.stem.eval(), net.stage5.eval(), net.last.eval()  # frozen BN statistics in the backbone
        keys = _keys(net, finetune)
        perm = torch.randperm(len(tr), generator=gen).numpy()
        steps = math.ceil(len(tr) / opts.batch)
        bar = progress(len(tr), f"{'finetune' if finetune else 'head'} {epoch + 1}/{total}")
        t0, seen, loss_sum = time.time(), 0, 0.0
        phase_epoch, phase_total = (epoch - opts.epochs, opts.finetune_epochs) if finetune else (epoch, opts.epochs)
        for k in range(steps):
            idx = perm[k * opts.batch:(k + 1) * opts.batch]
            if len(idx) < 2:  # the pyramid's 1x1 bin needs two samples for BatchNorm
                continue
            f = cosine_lr(phase_epoch + k / steps, phase_total, warmup=min(1.0, phase_total / 4))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            b = tr.batch(idx, keys)
            main, aux = _forward(net, b, finetune)
            loss_main, loss_core = total_loss(net, main, b, opts)
            loss_aux = segmentation_loss(aux, b["target"], b["weight"], opts.dice_weight)
            loss = loss_main + opts.aux_weight * loss_aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net)
            seen += len(idx)
            loss_sum += float(loss_main.detach()) * len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss_main.item():.3f}", aux=f"{loss_aux.item():.3f}",
                            **({"core": f"{loss_core.item():.3f}"} if loss_core is not None else {}),
                            img_s=f"{seen / (time.time() - t0):.0f}")
        bar.close()
        train_s += time.time() - t0
        figs = evaluate_cache(ema.ema, va, opts, finetune)
        history.append(train_loss=loss_sum / max(seen, 1), **figs)
        log(f"epoch {epoch + 1}/{total} ({'finetune' if finetune else 'head'}): train loss {loss_sum / max(seen, 1):.4f}, "
            f"val loss {figs['val_loss']:.4f}, val IoU {figs['val_iou']:.4f}, {seen / (time.time() - t0):.0f} img/s")
        state = {"epoch": epoch, "finetune": finetune, "model": net.trained_state(True), "ema": ema.ema.trained_state(True),
                 "ema_updates": ema.updates, "optimizer": opt.state_dict(), "history": history.rows, "hparams": hp,
                 "data": data_key, "rng": gen.get_state(), "train_s": train_s}
        atomic_save(state, ckpt_path)
        history.write(work, title=title)

    final = ema.ema if ema is not None else net
    if ema is None:  # resumed after the last epoch: the checkpoint's EMA is the model
        final.load_trained_state(state["ema"])
    finetuned = opts.finetune_epochs > 0
    t0 = time.time()
    maps = probabilities(final, va, finetuned)
    # With a core channel the cores are the instance signal: the valley split is not searched
    # (it would triple the grid's time for a split that lost on both round-2 models).
    grid = photo_figures(maps, val_caches, [x for ss in val_sets for x in ss], valleys=(False,) if opts.core else VALLEYS)
    (t, a, o, valley, core_level), figures = _select(grid)
    log(f"chose threshold {t}, min_area {a}, opening {o}, valley split {valley}, core level {core_level} on "
        f"{' + '.join(d.name for d in val_folders)}: " + ", ".join(f"{k} {x:.4f}" for k, x in figures.items()))
    trained = {k: (v.half() if v.is_floating_point() else v) for k, v in final.trained_state(finetuned).items()
               if not k.startswith("aux.")}
    weights = {
        "format": "cbir-pspnet", "version": 1, "config": config.to_dict(), "state": trained,
        "threshold": t, "min_area": a, "open_cells": o, "valley": valley, "core_level": core_level, "finetuned": finetuned,
        "options": asdict(opts), "val_figures": figures, "val_grid": {",".join(map(str, k)): v for k, v in grid.items()},
        "history": history.rows,
        "data": {"train": " + ".join(map(str, folders)), "train_photos": len(tr), "val": " + ".join(map(str, val_folders)), "val_photos": len(va)},
        "times": {"cache_s": round(cache_s, 1), "train_s": round(train_s, 1), "select_s": round(time.time() - t0, 1)},
    }
    atomic_save(weights, out)
    curves = history.write(work, title=title)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), curves {curves}")
    return weights


# ---------------------------------------------------------------------------------- CLI


def command(
    data: Annotated[list[Path], typer.Option("--data", help="`cbir synth` training folder (gt.json with masks); repeat to train on several as one set.")],
    val: Annotated[list[Path], typer.Option("--val", help="`cbir synth` validation folder (another seed); repeat to pool several for the threshold choice.")],
    out: Annotated[Path, typer.Option("--out", help="Weights file to write (checkpoint, cache and curves go to OUT.train/).")],
    epochs: Annotated[int, typer.Option(help="Epochs of the PSP head on the frozen, cached backbone.")] = 12,
    finetune_epochs: Annotated[int, typer.Option(help="Then epochs with the backbone's last stage trained too.")] = 0,
    batch: Annotated[int, typer.Option(help="Photos per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the head.")] = 2e-3,
    input_size: Annotated[int, typer.Option(help="Photos are letterboxed to this square.")] = 384,
    output_stride: Annotated[int, typer.Option(help="Backbone output stride (dilated): 16 or 8.")] = 16,
    decoder: Annotated[bool, typer.Option("--decoder", help="Add the edge decoder: the stride-4 map fused before the classifier (mask at input / 4).")] = False,
    core: Annotated[bool, typer.Option("--core", help="Add a core channel (each painting shrunk inwards) that splits paintings hung close.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of weights init and data order.")] = 0,
    threads: Annotated[int, typer.Option(help="PyTorch threads.")] = 1,
    limit: Annotated[int, typer.Option(help="Train on the first N photos only (0: all).")] = 0,
) -> None:
    """Train the PSPNet localizer (registered as `pspnet`) on synthetic gallery photos."""
    opts = SegmenterOptions(epochs=epochs, finetune_epochs=finetune_epochs, batch=batch, lr=lr, input_size=input_size,
                            output_stride=output_stride, decoder=decoder, core=core, seed=seed, threads=threads, limit=limit)
    w = train(data, val, out, opts, log=lambda m: typer.echo(m, err=True))
    f = w["val_figures"]
    typer.echo(json.dumps({"weights": str(out), "threshold": w["threshold"], "min_area": w["min_area"],
                           **{k: round(v, 4) for k, v in f.items()}, **w["times"]}))
