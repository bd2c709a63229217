"""Write docs/img/synth_grid.jpg: 3 x 3 `cbir synth` photos of the museum collection on the
museum's walls, with each painting's polygon outlined.

    PYTHONPATH=src python benchmarks/synth_grid.py [--seed 3] [--out docs/img/synth_grid.jpg]

Needs ../shared/datasets/museum beside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MUSEUM = ROOT.parent / "shared" / "datasets" / "museum"


def grid(out: Path, seed: int = 3, cols: int = 3, rows: int = 3, cell: int = 400) -> Path:
    from cbir.synth import synthesize

    if not (MUSEUM / "gt.json").exists():
        sys.exit(f"needs {MUSEUM}")
    with tempfile.TemporaryDirectory() as tmp:
        gt_path = synthesize(MUSEUM / "database", tmp, cols * rows, seed=seed, backgrounds=MUSEUM)
        gt = json.loads(gt_path.read_text())
        canvas = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
        for i, q in enumerate(gt["queries"]):
            img = Image.open(Path(tmp) / q["image"]).convert("RGB")
            s = min(cell / img.width, cell / img.height)
            draw = ImageDraw.Draw(img)
            for o in q["objects"]:
                pts = [tuple(p) for p in o["polygon"]]
                draw.line(pts + pts[:1], fill=(255, 40, 40), width=max(2, round(2 / s)))
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
            x = (i % cols) * cell + (cell - img.width) // 2
            y = (i // cols) * cell + (cell - img.height) // 2
            canvas.paste(img, (x, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, "JPEG", quality=82, optimize=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "synth_grid.jpg")
    a = ap.parse_args()
    print(grid(a.out, a.seed))
