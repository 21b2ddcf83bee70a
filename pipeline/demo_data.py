"""The demo's procedural image set on disk (command line for sfd/demo/shapes.py).

Classes are shapes (disc, square, triangle, ring, cross, star); shapes upright; position, size,
colour and fill texture vary at random, so the class is the outline alone. Images are PNG class
folders in the ImageNet train layout (``<class>/<index>.png``), which the real encode job reads
exactly like ImageNet. Every image is a pure function of (seed, class, index): the held-out
split is the same function with another seed.

Example:
    python pipeline/demo_data.py --out data/demo/train --per-class 200 --size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sfd.demo.shapes import CLASSES, write_split


def make_demo_dataset(out: str | Path, per_class: int = 200, size: int = 32, seed: int = 0) -> Path:
    """Write ``per_class`` images for each class under ``out``; idempotent."""
    return write_split(out, per_class, size, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo/train", help="output folder (class folders are created in it)")
    ap.add_argument("--per-class", type=int, default=200, help=f"images per class ({len(CLASSES)} classes)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="split seed (the demo: 0 train, 1 held-out reference, 2 ceiling)")
    args = ap.parse_args()
    out = make_demo_dataset(args.out, args.per_class, args.size, args.seed)
    print(f"demo dataset: {len(CLASSES)} classes x {args.per_class} images of {args.size}x{args.size} in {out}")


if __name__ == "__main__":
    main()
