"""What every model trained here shares (the ultralytics/yolov5 training-loop habits).

- `seed_everything`: Python, numpy and torch seeded from one number.
- `Checkpoint`: the whole training state written atomically every epoch; a killed run
  resumes from the last complete epoch (a half-written file is never read).
- `History`: per-epoch figures appended to ``history.json`` and drawn as ``curves.png`` beside
  the weights.
- `ModelEMA`: an exponential moving average of the weights, the copy that gets evaluated.
- `progress`: a tqdm bar on stderr showing the loss parts and images/s.

Each model's ``train`` function keeps its hyper-parameters in one dataclass and is exposed as
``cbir train <what>`` (`cbir.train.cli`). Shipped weights live in ``cbir/weights/``.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class TrainingError(ValueError):
    """Training data, options or a checkpoint that cannot be used; one line naming it."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    from cbir.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint or weights file written by `atomic_save`; a corrupt one is a `TrainingError`."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not usable
        raise TrainingError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise TrainingError(f"{path}: not a cbir checkpoint (a {type(obj).__name__}, not a dict)")
    return obj


def read_ground_truth(folder: str | Path) -> list[dict]:
    """The ``queries`` of a training folder's ``gt.json`` (a `cbir synth` output or any benchmark
    in that layout); a missing, unreadable or empty one is a one-line `TrainingError`."""
    folder = Path(folder)
    gt_path = folder / "gt.json"
    if not gt_path.is_file():
        raise TrainingError(f"{folder}: no gt.json (expected a `cbir synth` output or a benchmark folder)")
    try:
        queries = json.loads(gt_path.read_text())["queries"]
    except (ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{gt_path}: not a benchmark ground truth ({type(e).__name__}: {e})") from None
    if not isinstance(queries, list):
        raise TrainingError(f"{gt_path}: 'queries' is not a list")
    return queries


def hparams_dict(hp: Any) -> dict:
    return asdict(hp) if is_dataclass(hp) else dict(hp)


@dataclass
class History:
    """Per-epoch figures: ``rows[i]`` is a dict for epoch ``i`` (e.g. train_loss, val_iou)."""

    rows: list[dict] = field(default_factory=list)

    def append(self, **figures: float) -> None:
        self.rows.append({k: float(v) for k, v in figures.items()})

    def write(self, out_dir: str | Path, title: str = "") -> Path:
        """``history.json`` and ``curves.png`` (one panel per figure family) in ``out_dir``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "history.json").write_text(json.dumps(self.rows, indent=1))
        keys = [k for k in dict.fromkeys(k for r in self.rows for k in r) if k != "epoch"]
        # Panels: losses together, every other figure on its own axis.
        panels = [[k for k in keys if "loss" in k]] + [[k] for k in keys if "loss" not in k]
        panels = [p for p in panels if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for k in panel:
                xs = [i + 1 for i, r in enumerate(self.rows) if k in r]
                ax.plot(xs, [r[k] for r in self.rows if k in r], marker="o", ms=3, label=k)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class ModelEMA:
    """Exponential moving average of a model's weights (YOLOv5's ``ModelEMA``).

    ``decay`` ramps up as ``d * (1 - exp(-updates / tau))`` so early, noisy weights fade fast.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def progress(total: int, desc: str):
    """A tqdm bar on stderr; call ``bar.set_postfix(loss=..., img_s=...)`` as it goes."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None, leave=False)


def cosine_lr(epoch: float, epochs: int, warmup: float = 1.0, final: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` epochs, then cosine down to ``final``."""
    if epoch < warmup:
        return (epoch + 1e-3) / warmup
    t = (epoch - warmup) / max(1e-9, epochs - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


__all__ = ["History", "ModelEMA", "TrainingError", "WEIGHTS_DIR", "atomic_save", "cosine_lr", "hparams_dict",
           "load_checkpoint", "progress", "seed_everything"]
