"""Image discovery, robust decoding and the ADM centre crop used before encoding.

The encode pipeline (docs/architecture.md, Data flow) turns an ImageNet-style folder of class folders into rows of
the latent cache. This module owns the first steps:

- :func:`discover` fixes the row order before any encoding: class folders sorted by name give the
  labels 0..K-1 (torchvision ``ImageFolder`` order, so ImageNet wnids map to the usual 0..999), and
  files are sorted by relative path within each class.
- :func:`load_image` decodes one file into the 256×256 ADM crop, or returns a short reason when
  the file is bad. It never raises for bad data: one broken JPEG must not kill a shard of a
  multi-hour job, and the reason ends up in the cache's invalid-row report.
- :func:`adm_center_crop`, :func:`hflip` and :func:`to_model_input` reproduce the authors'
  pre-processing (docs/method.md §2.1): ADM crop → optional horizontal flip → ``ToTensor`` →
  ``Normalize(0.5, 0.5)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

# The torchvision ImageFolder list plus a few common spellings; compared case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".gif",
)

# Below this short side an image carries no usable content (1×1 icons, 3-pixel strips): ADM would
# upscale it by >32× into a blur. Larger "tiny" images (ImageNet train has many short sides of
# 100-250 px) are upscaled exactly as ADM does, so the dataset matches the authors'.
MIN_SHORT_SIDE = 8
# ADM keeps the full aspect ratio before the crop; an extreme strip (e.g. 8×500000) would make the
# bicubic resize allocate gigabytes, so such files are rejected instead.
MAX_ASPECT_RATIO = 50.0


class DatasetError(ValueError):
    """The dataset folder itself is unusable (no classes, an empty class, ...)."""


@dataclass(frozen=True)
class ImageList:
    """The fixed, ordered list of images that become the rows of a latent cache.

    ``paths`` are POSIX paths relative to ``root``; ``labels[i]`` is the class index of
    ``paths[i]``; ``class_names[k]`` is the folder name of class ``k``.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray = field(repr=False)  # [N] int64

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> Path:
        return self.root / self.paths[i]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))

    def permuted(self, seed: int) -> ImageList:
        """The same images in a fixed pseudo-random order (rows of a class no longer contiguous).

        Useful as the cache row order when training will read the cache in chunk-shuffled
        streaming mode: every chunk then holds a random mix of classes instead of ~one class.
        """
        order = np.random.default_rng(seed).permutation(len(self.paths))
        return ImageList(
            root=self.root,
            class_names=self.class_names,
            paths=tuple(self.paths[i] for i in order),
            labels=self.labels[order],
        )


def _is_hidden(name: str) -> bool:
    # ".ipynb_checkpoints", macOS "._foo.JPEG" resource forks, ".DS_Store": never data.
    return name.startswith(".")


def discover(root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageList:
    """List the images of a class-folder dataset in the fixed order used for encoding.

    ``root/<class_name>/**/<image>``: class folders sorted by name give labels 0..K-1; images
    (matched by extension, case-insensitively, searched recursively, hidden entries skipped) are
    sorted by relative path within each class. Raises :class:`DatasetError` when ``root`` has no
    class folders or a class folder has no images, since a silently missing class would shift
    every later label.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    class_names = sorted(
        e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not _is_hidden(e.name)
    )
    if not class_names:
        raise DatasetError(
            f"no class folders in {root}: expected an ImageNet-style layout root/<class>/<image>"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(class_names):
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            rel_dir = Path(dirpath).relative_to(root)
            found.extend(
                (rel_dir / f).as_posix()
                for f in filenames
                if not _is_hidden(f) and f.lower().endswith(exts)
            )
        if not found:
            empty.append(name)
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DatasetError(
            f"{len(empty)} class folder(s) in {root} contain no images with extensions "
            f"{'/'.join(exts)}: {shown}"
        )
    return ImageList(
        root=root,
        class_names=tuple(class_names),
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int64),
    )


def adm_center_crop(pil_image: Image.Image, size: int = 256) -> np.ndarray:
    """ADM's ``center_crop_arr``: the crop the authors apply before both encoders (docs/method.md §2.1).

    While the short side is at least ``2*size``, halve both sides (floor) with a BOX filter; then
    resize with BICUBIC so the short side becomes ``size`` (the long side ``round(side*scale)``,
    Python's round-half-even like ADM); then take the centre crop with floor offsets. Images
    smaller than ``size`` are upscaled, as in ADM. Returns uint8 ``[size, size, C]``.
    """
    while min(pil_image.size) >= 2 * size:
        half = (pil_image.size[0] // 2, pil_image.size[1] // 2)
        pil_image = pil_image.resize(half, resample=Image.Resampling.BOX)
    scale = size / min(pil_image.size)
    target = (round(pil_image.size[0] * scale), round(pil_image.size[1] * scale))
    pil_image = pil_image.resize(target, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def _to_rgb(im: Image.Image) -> Image.Image | str:
    """Convert any PIL mode to 8-bit RGB, or return a reason for modes with no safe mapping."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF (PIL gives "I;16*" or the 32-bit "I"): PIL's own convert clips at 255,
        # which turns most of the image white. Scale the 16-bit range to 8 bits instead.
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        gray = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "F":
        return "unsupported float image (mode F): no defined 8-bit range"
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are composited on white (a documented choice; ADM's loader drops
        # alpha with convert("RGB"), exposing whatever colour the transparent pixels store).
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's conversions (what ImageFolder's convert("RGB") does).
    return im.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    size: int = 256,
    *,
    min_short_side: int = MIN_SHORT_SIDE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> tuple[np.ndarray, None] | tuple[None, str]:
    """Decode one image file into its ADM crop: ``(uint8 [size, size, 3], None)`` or ``(None, reason)``.

    Never raises for bad data. Rejected: empty, unreadable or non-image files; truncated or
    corrupt files (the decode is forced with ``.load()`` and PIL's ``LOAD_TRUNCATED_IMAGES`` must
    stay False, so a half-written JPEG is an error, not a grey-padded image); decompression bombs
    (PIL's ``DecompressionBombWarning`` above ``Image.MAX_IMAGE_PIXELS`` is treated as an error);
    images whose short side is below ``min_short_side`` or whose aspect ratio exceeds
    ``max_aspect_ratio``; float images. Accepted with conversion: CMYK, grayscale, palette,
    16-bit (scaled to 8 bits), and alpha (composited on white). EXIF orientation is ignored, as in
    the authors' ImageFolder loading.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global flag another library may have set; with it PIL silently pads truncated files.
        return None, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode silently padded images"
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f, Image.open(f) as im:
                w, h = im.size
                # Same test as PIL's warning, repeated here because warning filters are
                # process-global and not thread-safe (decoders may run in threads).
                if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
                    return None, f"decompression bomb: {w}x{h} exceeds {Image.MAX_IMAGE_PIXELS} pixels"
                if min(w, h) < min_short_side:
                    return None, f"image too small ({w}x{h}; short side < {min_short_side} px)"
                if max(w, h) > max_aspect_ratio * min(w, h):
                    return None, f"extreme aspect ratio ({w}x{h} > {max_aspect_ratio:g}:1)"
                im.load()
                rgb = _to_rgb(im)
                if isinstance(rgb, str):
                    return None, rgb
                arr = adm_center_crop(rgb, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"decompression bomb: {e}"
    except UnidentifiedImageError:
        return None, "not a recognised image file"
    except PermissionError as e:
        return None, f"unreadable file: {e.strerror or e}"
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a directory"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncation and most corrupt streams as OSError; some plugins use
        # SyntaxError/ValueError/EOFError for malformed headers.
        return None, f"corrupt or truncated image: {e}"
    except Exception as e:  # noqa: BLE001 - a decoder bug must cost one row, not the job
        return None, f"decode failed ({type(e).__name__}: {e})"
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        return None, f"unexpected decoded array {arr.dtype} {arr.shape}"
    return arr, None


def hflip(images: np.ndarray) -> np.ndarray:
    """Horizontal flip of a uint8 ``[H, W, C]`` image or ``[N, H, W, C]`` batch (width axis -2)."""
    if images.ndim not in (3, 4):
        raise ValueError(f"expected HWC or NHWC, got shape {images.shape}")
    return np.ascontiguousarray(images[..., ::-1, :])


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → float32 ``[N, 3, H, W]`` in [-1, 1].

    Same arithmetic as the authors' ``ToTensor()`` (÷255) then ``Normalize(0.5, 0.5)``.
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div(255.0)
    return x.sub(0.5).div(0.5).contiguous()
