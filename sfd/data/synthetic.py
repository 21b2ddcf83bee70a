"""Photo-like synthetic image folders for tests and benchmarks.

The repository ships no dataset, so the image paths (discovery, decode, ADM crop, encoding) are
exercised on images made here: smooth colour fields with edges, shapes and sensor-like noise, at
the sizes and aspect ratios ImageNet JPEGs really have, written as real JPEG/PNG files. A second
helper writes one file of every format quirk the decoder must handle (grayscale, CMYK, palette,
RGBA, 16-bit, EXIF-rotated, progressive, tiny, extreme strip) and of every kind it must refuse
(truncated, empty, not an image). Everything is seeded and takes well under a second per image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) pairs seen in ImageNet-1k train; 909×768 needs one ADM box-halving round at
# 256, 2100×1400 two, 106×150 is upscaled.
PHOTO_SIZES = (
    (500, 375), (909, 768), (375, 500), (1152, 864), (106, 150), (500, 333),
    (640, 427), (333, 500), (800, 600), (2100, 1400), (500, 500), (457, 380),
)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with the statistics that matter for resampling tests: smooth gradients,
    hard edges and per-pixel noise (a flat or purely random image would hide interpolation bugs)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height) + 1
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0 - r, y0 - r, x0 + r, y0 + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(base).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_image_folder(
    root: str | Path, num_classes: int = 30, per_class: int = 1, seed: int = 0, quality: int = 90
) -> list[Path]:
    """An ImageNet-like training folder ``root/<wnid>/<wnid>_<i>.JPEG`` of synthetic photos.

    Class folders are named like synsets (``n0000…``) and images cycle through ``PHOTO_SIZES``,
    so image ``k`` (in sorted order) has size ``PHOTO_SIZES[k % len(PHOTO_SIZES)]``.
    """
    root = Path(root)
    files = []
    for c in range(num_classes):
        wnid = f"n{c:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k = c * per_class + i
            w, h = PHOTO_SIZES[k % len(PHOTO_SIZES)]
            path = root / wnid / f"{wnid}_{i}.JPEG"
            photo(w, h, seed=seed * 100_003 + k).save(path, quality=quality)
            files.append(path)
    return files


# kind -> (file name, fragment of the decoder's reason; None = must decode)
QUIRKS = {
    "grayscale": ("gray.JPEG", None),
    "cmyk": ("cmyk.jpg", None),
    "palette": ("palette.png", None),
    "rgba": ("alpha.png", None),
    "deep16": ("deep16.png", None),
    "exif_rotated": ("rotated.JPEG", None),
    "progressive": ("progressive.JPEG", None),
    "tiny_17x11": ("tiny17x11.png", None),
    "strip_4000x90": ("strip4000x90.JPEG", None),
    "truncated": ("truncated.JPEG", "truncated"),
    "zero_bytes": ("empty.jpg", "empty file"),
    "not_an_image": ("notes.JPEG", "not a recognised image"),
}


def write_quirks(folder: str | Path, seed: int = 0, kinds: tuple[str, ...] | None = None) -> dict[str, Path]:
    """One file per quirk kind of ``QUIRKS`` in ``folder``; returns kind -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo(320, 240, seed)
    out: dict[str, Path] = {}
    for kind in kinds or tuple(QUIRKS):
        path = folder / QUIRKS[kind][0]
        if kind == "grayscale":
            rgb.convert("L").save(path)
        elif kind == "cmyk":
            rgb.convert("CMYK").save(path)
        elif kind == "palette":
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
        elif kind == "rgba":
            rgba = rgb.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
            rgba.save(path)
        elif kind == "deep16":
            g = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(g).save(path)
        elif kind == "exif_rotated":
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90° CW to display
            rgb.save(path, exif=exif)
        elif kind == "progressive":
            rgb.save(path, progressive=True, quality=85)
        elif kind == "tiny_17x11":
            rgb.resize((17, 11), Image.BICUBIC).save(path)
        elif kind == "strip_4000x90":
            photo(4000, 90, seed + 1).save(path)
        elif kind == "truncated":
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG")
            path.write_bytes(buf.getvalue()[: buf.tell() // 3])
        elif kind == "zero_bytes":
            path.write_bytes(b"")
        elif kind == "not_an_image":
            path.write_text("this is a text file with an image extension\n" * 10)
        else:
            raise KeyError(f"unknown quirk {kind!r}; known: {', '.join(QUIRKS)}")
        out[kind] = path
    return out
