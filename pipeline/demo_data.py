"""The demo's procedural image set on disk (command line for sfd/demo/shapes.py).

Classes are shapes (sfd.demo.shapes.CLASSES: ten outlines, each drawn at any angle); position,
size, colour and fill texture vary at random, so the class is the outline alone. Images are PNG class
folders in the ImageNet train layout (``<class>/<index>.png``), which the real encode job reads
exactly like ImageNet. Every image is a pure function of (seed, class, index): the named splits
(train, val, test, ceiling) are the same function with their seeds (sfd.demo.shapes.SPLITS).

Example:
    python pipeline/demo_data.py --out data/demo/val --per-class 50 --split val
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sfd.demo.shapes import CLASSES, IMAGE_SIZE, SPLITS, split_seed, write_split


def make_demo_dataset(out: str | Path, per_class: int = 200, size: int = IMAGE_SIZE, seed: int | str = "train") -> Path:
    """Write ``per_class`` images for each class under ``out``; ``seed``: a split name or an int; idempotent."""
    return write_split(out, per_class, size, split_seed(seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo/train", help="output folder (class folders are created in it)")
    ap.add_argument("--per-class", type=int, default=200, help=f"images per class ({len(CLASSES)} classes)")
    ap.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    ap.add_argument("--split", choices=list(SPLITS), default="train", help=f"named split (seeds {SPLITS})")
    ap.add_argument("--seed", type=int, default=None, help="an explicit seed instead of --split")
    args = ap.parse_args()
    out = make_demo_dataset(args.out, args.per_class, args.size, args.split if args.seed is None else args.seed)
    print(f"demo dataset: {len(CLASSES)} classes x {args.per_class} images of {args.size}x{args.size} in {out}")


if __name__ == "__main__":
    main()
