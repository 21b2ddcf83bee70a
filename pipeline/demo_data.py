"""A small class-conditional image set that needs no download: coloured shapes on textured ground.

Each class is a (shape, colour) pair, so a model must get both the global layout (semantics) and
the surface detail (texture) right. Images are drawn procedurally from a fixed seed and written as
PNG class folders in the ImageNet train layout (``<class>/<index>.png``), so the real encode job
reads them exactly like ImageNet.

Example:
    python pipeline/demo_data.py --out data/demo/train --per-class 64 --size 32
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
}
CLASSES = [f"{shape}-{colour}" for shape in SHAPES for colour in COLOURS]  # 10 classes


def draw(class_name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of ``class_name``: a jittered shape over a noisy two-tone background."""
    shape, colour = class_name.split("-")
    scale = 4  # draw large, then downsample: anti-aliased edges like a photo's
    s = size * scale
    bg = rng.integers(90, 200, size=3)
    ground = (bg + rng.normal(0, 12, size=(s, s, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(ground)
    d = ImageDraw.Draw(img)
    r = s * rng.uniform(0.22, 0.34)
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12) * s, s / 2 + rng.uniform(-0.12, 0.12) * s
    base = np.array(COLOURS[colour])
    fill = tuple(int(c) for c in (base + rng.integers(-25, 26, size=3)).clip(0, 255))
    if shape == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(r * 0.35))
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def make_demo_dataset(out: str | Path, per_class: int = 64, size: int = 32, seed: int = 0) -> Path:
    """Write ``per_class`` images for each of the 10 classes under ``out``; idempotent."""
    out = Path(out)
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:05d}.png"
            if path.exists():
                continue
            # Per-image seed: the set is the same whatever was already written.
            rng = np.random.default_rng([seed, label, i])
            tmp = path.with_suffix(".tmp.png")
            draw(name, size, rng).save(tmp)
            tmp.rename(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo/train", help="output folder (class folders are created in it)")
    ap.add_argument("--per-class", type=int, default=64, help="images per class (10 classes)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = make_demo_dataset(args.out, args.per_class, args.size, args.seed)
    print(f"demo dataset: {len(CLASSES)} classes x {args.per_class} images of {args.size}x{args.size} in {out}")


if __name__ == "__main__":
    main()
