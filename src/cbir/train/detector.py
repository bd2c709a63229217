"""``cbir train detector``: the YOLOv5 localizer (`cbir.models.yolo`) on `cbir synth` data.

Two variants share the neck, head, loss and schedule:

* ``lite0`` (default): the packaged ImageNet EfficientNet-Lite0 backbone, frozen; its
  features are computed once per training view and cached, so an epoch only runs the neck
  and head. Augmentation (mosaic, mixup, HSV, flip, scale) is applied when the views are
  made: each photo is cached as ``views`` augmented copies (the first plain), and an epoch
  draws one view per photo. It cannot be re-drawn every epoch as yolov5 does.
* ``n``: yolov5n from scratch (depth 0.33, width 0.25), augmented afresh every step.

yolov5's habits: autoanchor (k-means on the training boxes) when the COCO anchors' best
possible recall is low (here: always refitted), EMA of the weights (the EMA copy is
validated and shipped), linear warm-up then cosine learning rate, a checkpoint every epoch
(a killed run resumes from it), ``history.json`` and ``curves.png`` (losses, mAP50,
mAP50-95 on the validation set) in the run folder. The score threshold and the NMS IoU the
localizer uses are chosen on the validation set (best count accuracy, then F1 at IoU 0.5) and
stored with the weights. ``--init WEIGHTS`` fine-tunes from a weights file (its anchors kept,
at any input size); ``--data`` may be repeated.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

from cbir.train import (History, ModelEMA, TrainingError, atomic_save, cosine_lr, load_checkpoint, progress,
                        read_ground_truth, seed_everything)

GREY = 114


@dataclass
class DetectorHParams:
    variant: str = "lite0"
    image_size: int = 320
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3  # AdamW (yolov5's --optimizer AdamW), warm-up then cosine to lr * final_lr
    final_lr: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    ema_decay: float = 0.999
    ema_tau: float = 200.0
    anchor_t: float = 4.0
    mosaic: float = 0.5
    mixup: float = 0.1
    hsv: tuple[float, float, float] = (0.015, 0.7, 0.4)  # hue (turns), saturation, value gains
    flip: float = 0.5
    scale: tuple[float, float] = (0.6, 1.4)
    views: int = 3  # lite0: cached views per photo (the first one plain)
    val_images: int = 300
    seed: int = 0
    threads: int = 1
    max_train: int = 0  # 0: all photos
    init: str = ""  # a weights file to start the neck and head from (fine-tuning; its anchors are kept)


# ------------------------------------------------------------------ data


@dataclass
class DetSet:
    """Photos letterboxed to ``size x size`` (uint8, grey pad) with their boxes (xyxy, pixels)."""

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    names: list[str] = field(default_factory=list)


def letterbox_uint8(image: Image.Image, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """RGB photo -> ``(size, size, 3)`` uint8, longer side ``size``, centred on YOLO grey; the
    scale and the ``(left, top)`` offset, so ``photo = (letterboxed - offset) / scale``."""
    w, h = image.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = np.asarray(image.convert("RGB").resize((nw, nh), Image.BILINEAR))
    canvas = np.full((size, size, 3), GREY, np.uint8)
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas[top:top + nh, left:left + nw] = small
    return canvas, s, (left, top)


def read_boxes(folder: Path) -> list[tuple[Path, np.ndarray]]:
    """``gt.json`` of a benchmark-format folder -> (photo path, ``(n, 4)`` boxes) per query.

    One-line `TrainingError` s: no gt.json, no queries, no box at all, a malformed box."""
    gt_path = Path(folder) / "gt.json"
    queries = read_ground_truth(folder)
    if not queries:
        raise TrainingError(f"{gt_path}: no queries")
    out = []
    for q in queries:
        objs = q.get("objects")
        if objs is None:
            objs = [{"bbox": q["bbox"]}] if q.get("bbox") else []
        boxes = []
        for o in objs:
            b = o.get("bbox")
            if b is None or len(b) != 4 or not np.isfinite(np.asarray(b, float)).all():
                raise TrainingError(f"{gt_path}: {q.get('image')}: bad bbox {b!r} (want [x0, y0, x1, y1])")
            boxes.append([float(v) for v in b])
        out.append((folder / q["image"], np.asarray(boxes, np.float32).reshape(-1, 4)))
    if sum(len(b) for _, b in out) == 0:
        raise TrainingError(f"{gt_path}: the label list is empty (no query has a box)")
    return out


def load_set(folder: Path, size: int, limit: int = 0) -> DetSet:
    """Read, letterbox and label-check every photo of ``folder`` (see `read_boxes`)."""
    items = read_boxes(Path(folder))
    if limit:
        items = items[:limit]
    images, boxes, names = [], [], []
    for path, b in items:
        try:
            with Image.open(path) as im:
                im.load()
                photo = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path}: unreadable image ({type(e).__name__})") from None
        w, h = photo.size
        if len(b) and ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, 0] < -1) | (b[:, 1] < -1)
                       | (b[:, 2] > w + 1) | (b[:, 3] > h + 1)).any():
            bad = b[((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, 0] < -1) | (b[:, 1] < -1)
                     | (b[:, 2] > w + 1) | (b[:, 3] > h + 1))][0]
            raise TrainingError(f"{path.name}: box {[round(float(v), 1) for v in bad]} is empty or outside "
                                f"the {w}x{h} image")
        img, s, (left, top) = letterbox_uint8(photo, size)
        bb = b.copy()
        bb[:, [0, 2]] = np.clip(bb[:, [0, 2]], 0, w) * s + left
        bb[:, [1, 3]] = np.clip(bb[:, [1, 3]], 0, h) * s + top
        images.append(img)
        boxes.append(bb.astype(np.float32))
        names.append(path.name)
    return DetSet(images, boxes, names)


def load_sets(folders: Path | list[Path], size: int, limit: int = 0) -> DetSet:
    """`load_set` of each folder (``limit`` photos each), as one set."""
    sets = [load_set(d, size, limit) for d in ([folders] if isinstance(folders, (str, Path)) else folders)]
    return DetSet(*([x for d in sets for x in getattr(d, f)] for f in ("images", "boxes", "names")))


class Augmenter:
    """yolov5's training augmentation from the toolbox (boxes kept consistent): mosaic of four
    photos (2S canvas, a random S crop after a random scale), mixup of two such samples, HSV
    gains, horizontal flip, random scale; output ``(S, S, 3)`` uint8 and boxes."""

    def __init__(self, data: DetSet, hp: DetectorHParams) -> None:
        from cbir.toolbox.augment import YOLO_GREY, ColorJitter, Compose, HorizontalFlip, Mosaic, MixUp, RandomCrop, RandomScale

        s = hp.image_size
        self.data, self.hp = data, hp
        self.mosaic = Mosaic(output_size=(2 * s, 2 * s))
        self.mix = MixUp(alpha=32.0)  # yolov5: Beta(32, 32)
        self.geom = Compose([RandomScale(hp.scale), RandomCrop(size=(s, s), fill=YOLO_GREY)])
        h, sat, val = hp.hsv
        self.color = Compose([ColorJitter(brightness=val, contrast=0.0, saturation=sat, hue=h),
                              HorizontalFlip(hp.flip)])

    def _sample(self, i: int) -> dict:
        return {"image": self.data.images[i], "boxes": self.data.boxes[i]}

    def _one(self, i: int, rng: np.random.Generator) -> dict:
        n = len(self.data.images)
        if rng.random() < self.hp.mosaic:
            idx = [i] + [int(k) for k in rng.integers(0, n, 3)]
            s = self.mosaic([self._sample(k) for k in idx], rng)
        else:
            s = self._sample(i)
        return self.geom(s, rng)

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self._one(i, rng)
        if rng.random() < self.hp.mixup:
            s = self.mix(s, self._one(int(rng.integers(len(self.data.images))), rng), rng)
            s.pop("weights", None)
        s = self.color(s, rng)
        img = np.asarray(s["image"])
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        return img, np.asarray(s["boxes"], np.float32).reshape(-1, 4)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def to_targets(boxes: list[np.ndarray]) -> torch.Tensor:
    """Per-image xyxy boxes -> ``(nt, 6)`` ``[image, class 0, cx, cy, w, h]`` in pixels."""
    rows = []
    for i, b in enumerate(boxes):
        if len(b):
            b = torch.as_tensor(b, dtype=torch.float32)
            rows.append(torch.cat([torch.full((len(b), 1), float(i)), torch.zeros(len(b), 1),
                                   (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 6)


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def detect_batch(model, raw, conf: float = 0.001, iou: float = 0.6, max_det: int = 100, pre_nms: int = 1000) -> list[np.ndarray]:
    """Raw head outputs -> per image ``(k, 5)`` x0, y0, x1, y1, score after greedy NMS."""
    from cbir.metrics.boxes import cxcywh_to_xyxy, nms

    p = model.head.decode(raw)
    out = []
    for pi in p:
        score = pi[:, 4] * (pi[:, 5:].max(1).values if pi.shape[1] > 6 else 1.0)
        top = torch.topk(score, min(pre_nms, score.shape[0])).indices  # as the exported graph does
        pi, score = pi[top], score[top]
        keep = score > conf
        b, s = cxcywh_to_xyxy(pi[keep, :4]), score[keep]
        k = nms(b, s, iou)[:max_det]
        out.append(torch.cat([b[k], s[k, None]], 1).numpy())
    return out


CUTS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # score cuts tried: a box is kept if its score > cut
NMS_IOUS = (0.3, 0.4, 0.45, 0.5, 0.6, 0.7)


def cut_table(dets: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """Per score cut in `CUTS`: photos whose box count is right (``count_ok``), paintings found
    at IoU 0.5 (greedy, ``tp``), boxes kept (``npred``), and ``errors`` = missed paintings +
    extra boxes (the numerator of 1 - F1)."""
    from cbir.metrics.boxes import box_iou

    ok, tp, npred = (np.zeros(len(CUTS), int) for _ in range(3))
    ngt = sum(len(g) for g in gts)
    for d, g in zip(dets, gts):
        d = d[np.argsort(-d[:, 4], kind="stable")]
        iou = box_iou(torch.as_tensor(g), torch.as_tensor(d[:, :4])).numpy() if len(d) and len(g) else None
        for i, t in enumerate(CUTS):
            k = int((d[:, 4] > t).sum())  # the boxes kept are the k best
            ok[i] += k == len(g)
            npred[i] += k
            if iou is not None and k:
                used = set()
                for r in range(len(g)):
                    for c in np.argsort(-iou[r, :k]):
                        if iou[r, c] >= 0.5 and c not in used:
                            used.add(c)
                            tp[i] += 1
                            break
    return {"count_ok": ok, "tp": tp, "npred": npred, "ngt": ngt, "n": len(gts), "errors": npred + ngt - 2 * tp}


def tolerance(e_min: int) -> int:
    """Error counts within this many boxes of the least are ties: one Poisson standard deviation
    of ``e_min``, at least two boxes (docs/yolo-round4-rule.md)."""
    return max(2, int(np.ceil(np.sqrt(e_min))))


def choose_cut(errors, tau: int | None = None) -> int:
    """Index of the score cut: the middle of the plateau, i.e. of the longest run of consecutive
    cuts whose errors are within ``tau`` (default `tolerance`) of the least (ties between runs:
    the one holding the least errors, then the lower; an even run: the lower middle)."""
    e = np.asarray(errors)
    ok = e <= e.min() + (tolerance(int(e.min())) if tau is None else tau)
    runs, start = [], None  # (first, last) of each run of near-best cuts
    for i, near in enumerate([*ok, False]):
        if near and start is None:
            start = i
        elif not near and start is not None:
            runs.append((start, i - 1))
            start = None
    a, b = max(runs, key=lambda r: (r[1] - r[0], -e[r[0]:r[1] + 1].min(), -r[0]))
    return (a + b) // 2


def at_cut(table: dict, i: int) -> dict:
    """Count accuracy, F1 at IoU 0.5 and errors of `cut_table` row ``i``."""
    return {"count_acc": float(table["count_ok"][i] / max(1, table["n"])), "conf": CUTS[i],
            "f1": float(2 * table["tp"][i] / max(1, table["npred"][i] + table["ngt"])), "errors": int(table["errors"][i])}


def evaluate(dets: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """COCO AP (pycocotools-equal), the `cut_table` and the figures at the cut `choose_cut` picks."""
    from cbir.metrics.detection import mean_average_precision

    preds = [{"boxes": d[:, :4], "scores": d[:, 4], "labels": np.zeros(len(d), int)} for d in dets]
    targets = [{"boxes": g, "labels": np.zeros(len(g), int)} for g in gts]
    m = mean_average_precision(preds, targets)
    table = cut_table(dets, gts)
    return {"map": float(m["map"]), "map50": float(m["map_50"]), **at_cut(table, choose_cut(table["errors"])),
            "table": table}


def pick_iou_cut(evs: dict, default: float = 0.45) -> dict:
    """The localizer's NMS IoU and score cut from `evaluate` at each NMS IoU (``evs``): among the
    IoUs whose least errors are within `tolerance` of the least overall, the nearest ``default``
    (ties: the lower); then `choose_cut` at that IoU with the same tolerance."""
    least = {t: int(ev["table"]["errors"].min()) for t, ev in evs.items()}
    tau = tolerance(min(least.values()))
    t = min((t for t in evs if least[t] <= min(least.values()) + tau), key=lambda t: (abs(t - default), t))
    table = evs[t]["table"]
    return {**at_cut(table, choose_cut(table["errors"], tau)), "iou": float(t)}


def evaluate_nms(model, raws: list, gts: list[np.ndarray], ious=NMS_IOUS, default: float = 0.45) -> dict:
    """`evaluate` at every NMS IoU in ``ious``: the AP figures are those at IoU 0.6 (as yolov5's
    validation), the localizer's NMS IoU and score cut `pick_iou_cut`'s."""
    evs = {}
    for t in sorted(set(ious) | {0.6}):
        evs[t] = evaluate([d for raw in raws for d in detect_batch(model, raw, iou=t)], gts)
    ev = {k: v for k, v in evs[0.6].items() if k != "table"}
    return {**ev, **pick_iou_cut({t: evs[t] for t in ious}, default)}


# ------------------------------------------------------------------ training


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class FeatureCache:
    """The frozen backbone's P3/P4/P5 for a list of images, fp16 in memory."""

    def __init__(self, backbone: torch.nn.Module, images: list[np.ndarray], desc: str, batch: int = 16) -> None:
        backbone.eval()
        levels: list[list[torch.Tensor]] = [[], [], []]
        bar = progress(len(images), desc)
        with torch.no_grad():
            for k in range(0, len(images), batch):
                feats = backbone(to_tensor(images[k:k + batch]))
                for lv, f in zip(levels, feats):
                    lv.append(f.half())
                bar.update(len(images[k:k + batch]))
        bar.close()
        self.levels = [torch.cat(lv) for lv in levels]

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def get(self, idx) -> list[torch.Tensor]:
        return [lv[idx].float() for lv in self.levels]


def fit_anchors(boxes: list[np.ndarray], seed: int, thr: float) -> tuple[np.ndarray, dict]:
    from cbir.models.yolo import COCO_ANCHORS, anchor_fitness, kmean_anchors

    wh = np.concatenate([b[:, 2:] - b[:, :2] for b in boxes if len(b)])
    new = kmean_anchors(wh, 9, seed=seed)
    coco = np.asarray(COCO_ANCHORS, np.float32).reshape(-1, 2) / 2  # COCO's, at a 320 input
    bpr_old, _ = anchor_fitness(coco, wh, thr)
    bpr_new, fit = anchor_fitness(new, wh, thr)
    return new.reshape(3, 3, 2), {"bpr_coco": bpr_old, "bpr_kmeans": bpr_new, "fitness": fit}


def train(train_dir: Path | list[Path], val_dir: Path | list[Path], out: Path, hp: DetectorHParams, run_dir: Path | None = None,
          fresh: bool = False, log=print) -> dict:
    """Train, validate every epoch, checkpoint, and write the final (EMA) weights to ``out``."""
    from cbir.models.yolo import YOLO, YoloLoss

    torch.set_num_threads(max(1, hp.threads))
    out = Path(out)
    run_dir = Path(run_dir) if run_dir else out.parent / f"{out.stem}-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    seed_everything(hp.seed)
    t0 = time.time()
    train_set = load_sets(train_dir, hp.image_size)  # several folders: one training set
    if hp.max_train:
        train_set = DetSet(train_set.images[:hp.max_train], train_set.boxes[:hp.max_train], train_set.names[:hp.max_train])
    val_set = load_sets(val_dir, hp.image_size, hp.val_images)  # several: pooled
    n_boxes = sum(len(b) for b in train_set.boxes)
    log(f"data: {len(train_set.images)} training photos ({n_boxes} boxes), {len(val_set.images)} validation photos")
    anchors, anchor_info = fit_anchors(train_set.boxes, hp.seed, hp.anchor_t)
    log(f"autoanchor: best possible recall {anchor_info['bpr_coco']:.3f} (COCO anchors) -> "
        f"{anchor_info['bpr_kmeans']:.3f} (k-means): {np.round(anchors.reshape(-1, 2)).astype(int).tolist()}")

    init = None
    if hp.init:
        init = load_checkpoint(Path(hp.init))
        if init.get("format") != "cbir-yolo-1" or init.get("variant") != hp.variant:
            raise TrainingError(f"{hp.init}: not cbir YOLO {hp.variant} weights")
        anchors = init["anchors"].float().numpy()  # kept: the head's sizes are learnt against them
        log(f"fine-tuning from {hp.init} (trained at {init['image_size']}), with its anchors")
    model = YOLO(hp.variant, nc=1, anchors=anchors, pretrained=True)
    if init is not None:
        missing, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                     for k, v in init["state"].items()}, strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise TrainingError(f"{hp.init}: weights do not fit the {hp.variant} model")
    else:
        model.head.init_bias(hp.image_size)
    cached = hp.variant == "lite0"
    if cached:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    aug = Augmenter(train_set, hp)
    loss_fn = YoloLoss(model.head, hp.image_size, anchor_t=hp.anchor_t)
    n_train = len(train_set.images)

    if cached:
        rng = np.random.default_rng(hp.seed)
        view_imgs, view_boxes = [], []
        for v in range(hp.views):
            for i in range(n_train):
                img, b = (train_set.images[i], train_set.boxes[i]) if v == 0 else aug(i, rng)
                view_imgs.append(img)
                view_boxes.append(b)
        log(f"made {hp.views} views of each photo ({time.time() - t0:.0f} s so far); caching their features")
        train_cache = FeatureCache(model.backbone, view_imgs, "caching training features")
        del view_imgs
        val_cache = FeatureCache(model.backbone, val_set.images, "caching validation features")
        log(f"cached {len(train_cache)} training views and {len(val_cache)} validation photos "
            f"({time.time() - t0:.0f} s so far)")

    opt = torch.optim.AdamW(_param_groups(model, hp.weight_decay), lr=hp.lr, betas=(0.937, 0.999))
    iters_per_epoch = max(1, -(-n_train // hp.batch_size))
    ema = ModelEMA(model, decay=hp.ema_decay, tau=hp.ema_tau)
    history = History()
    start = 0
    best = None
    if ckpt_path.exists() and not fresh:
        ck = load_checkpoint(ckpt_path)
        free = ("epochs", "threads")  # a run may be extended (or cut short) and moved to more cores
        same = lambda d: {k: v for k, v in d.items() if k not in free}  # noqa: E731
        if same(ck.get("hparams", {})) != same(asdict(hp)):
            raise TrainingError(f"{ckpt_path}: was made with other settings; pass --fresh to start over")
        model.load_state_dict(ck["model"])
        ema.ema.load_state_dict(ck["ema"])
        ema.updates = ck["ema_updates"]
        opt.load_state_dict(ck["optimizer"])
        history.rows = ck["history"]
        start = ck["epoch"] + 1
        best = ck.get("best")
        log(f"resuming from {ckpt_path} after epoch {start}")

    for epoch in range(start, hp.epochs):
        rng = np.random.default_rng([hp.seed, epoch])
        torch.manual_seed(hp.seed * 1000 + epoch)
        model.train()
        if cached:
            model.backbone.eval()
        order = rng.permutation(n_train)
        bar = progress(n_train, f"epoch {epoch + 1}/{hp.epochs}")
        sums = np.zeros(3)
        t_ep = time.time()
        seen = 0
        for it in range(iters_per_epoch):
            idx = order[it * hp.batch_size:(it + 1) * hp.batch_size]
            if len(idx) == 0:
                break
            f = cosine_lr(epoch + it / iters_per_epoch, hp.epochs, hp.warmup_epochs, hp.final_lr)
            for g in opt.param_groups:
                g["lr"] = hp.lr * f
            if cached:
                views = rng.integers(0, hp.views, len(idx))
                rows = torch.as_tensor(views * n_train + idx)
                raw = model.head_forward(train_cache.get(rows))
                targets = to_targets([view_boxes[int(r)] for r in rows])
            else:
                samples = [aug(int(i), rng) for i in idx]
                raw = model(to_tensor([s[0] for s in samples]))
                targets = to_targets([s[1] for s in samples])
            loss, parts = loss_fn(raw, targets)
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch + 1}: the loss is not finite ({parts.tolist()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update(model)
            sums += parts.numpy() * len(idx)
            seen += len(idx)
            bar.update(len(idx))
            bar.set_postfix(box=f"{sums[0] / seen:.4f}", obj=f"{sums[1] / seen:.4f}",
                            img_s=f"{seen / (time.time() - t_ep):.1f}")
            if bar.disable and (it + 1) % max(1, iters_per_epoch // 4) == 0 and it + 1 < iters_per_epoch:
                log(f"  epoch {epoch + 1} {seen}/{n_train}: box {sums[0] / seen:.4f} obj {sums[1] / seen:.4f} "
                    f"{seen / (time.time() - t_ep):.1f} img/s")
        bar.close()
        # validation of the EMA weights
        em = ema.ema.eval()
        raws = []
        with torch.no_grad():
            for k in range(0, len(val_set.images), 32):
                raws.append(em.head_forward(val_cache.get(slice(k, k + 32))) if cached
                            else em(to_tensor(val_set.images[k:k + 32])))
        ev = evaluate_nms(em, raws, val_set.boxes)
        row = dict(epoch=epoch + 1, box_loss=sums[0] / seen, obj_loss=sums[1] / seen, val_mAP50=ev["map50"],
                   val_mAP50_95=ev["map"], val_count_acc=ev["count_acc"], lr=hp.lr * f,
                   img_s=seen / (time.time() - t_ep), elapsed_s=time.time() - t0)
        history.append(**row)
        history.write(run_dir, title=f"YOLO {hp.variant}, {n_train} photos, seed {hp.seed}")
        if best is None or ev["map"] >= best["map"]:
            best = {**ev, "epoch": epoch + 1}
            payload = _weights_payload(ema.ema, hp, ev, anchor_info, n_train, time.time() - t0)
            atomic_save(payload, run_dir / "best.pt")
        atomic_save({"model": model.state_dict(), "ema": ema.ema.state_dict(), "ema_updates": ema.updates,
                     "optimizer": opt.state_dict(), "epoch": epoch, "history": history.rows,
                     "hparams": asdict(hp), "best": best}, ckpt_path)
        log(f"epoch {epoch + 1}/{hp.epochs}: box {row['box_loss']:.4f} obj {row['obj_loss']:.4f} "
            f"val mAP50 {ev['map50']:.3f} mAP50-95 {ev['map']:.3f} count acc {ev['count_acc']:.3f} "
            f"(conf {ev['conf']}, NMS IoU {ev['iou']}) {row['img_s']:.1f} img/s, {row['elapsed_s']:.0f} s")
    final = load_checkpoint(run_dir / "best.pt")
    final["train_s"] = time.time() - t0 if start == 0 else final.get("train_s", 0.0)
    final["history"] = history.rows
    atomic_save(final, out)
    log(f"weights: {out} ({out.stat().st_size / 1e6:.1f} MB), best epoch {best['epoch']}: "
        f"val mAP50 {best['map50']:.3f} mAP50-95 {best['map']:.3f}; curves: {run_dir / 'curves.png'}")
    return best


def _weights_payload(model, hp: DetectorHParams, ev: dict, anchor_info: dict, n_train: int, secs: float) -> dict:
    return {"format": "cbir-yolo-1", "variant": hp.variant, "nc": model.nc, "image_size": hp.image_size,
            "anchors": model.head.anchors.clone(), "conf": ev["conf"], "iou": ev["iou"],
            "state": {k: (v.half() if v.dtype.is_floating_point else v) for k, v in model.trainable_state().items()},
            "val": ev, "autoanchor": anchor_info, "hparams": asdict(hp), "n_train": n_train, "train_s": secs}


def command(
    data: Annotated[list[Path], typer.Option("--data", help="training folder (`cbir synth` output: gt.json, queries/); repeat to train on several")],
    val: Annotated[list[Path], typer.Option("--val", help="validation folder, same format; repeat to pool several (the score cut and NMS IoU are chosen on the pool)")],
    out: Annotated[Path, typer.Option("--out", help="weights file to write (e.g. src/cbir/weights/yolo_lite0.pt)")],
    variant: Annotated[str, typer.Option(help="lite0 (frozen ImageNet EfficientNet-Lite0, cached features) or n (yolov5n from scratch)")] = "lite0",
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    image_size: Annotated[int, typer.Option("--image-size", min=64, max=1280)] = 320,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-3,
    views: Annotated[int, typer.Option(min=1, help="lite0: augmented views cached per photo")] = 3,
    val_images: Annotated[int, typer.Option("--val-images", min=1, help="at most this many photos of each --val folder")] = 300,
    max_train: Annotated[int, typer.Option("--max-train", min=0, help="use only the first N photos (0: all)")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(min=1)] = 1,
    init: Annotated[Path | None, typer.Option("--init", help="fine-tune: start the neck and head from this weights file (e.g. the shipped one)")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="checkpoint and curves folder (default OUT's stem + -run)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore an existing checkpoint")] = False,
) -> None:
    """Train the YOLOv5 detector (localizer `yolo`) on synthesized gallery photos."""
    if image_size % 32:
        raise TrainingError(f"--image-size {image_size} must be a multiple of 32")
    hp = DetectorHParams(variant=variant, epochs=epochs, image_size=image_size, batch_size=batch_size, lr=lr,
                         views=views, val_images=val_images, max_train=max_train, seed=seed, threads=threads,
                         init=str(init) if init else "")
    if variant not in ("lite0", "n", "s", "m"):
        raise TrainingError(f"unknown variant {variant!r}; choose lite0, n, s or m")
    train(data, val, out, hp, run_dir=run_dir, fresh=fresh, log=lambda m: typer.echo(m, err=True))
