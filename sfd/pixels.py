"""From composite latents to pixels: denormalise, decode, tile (docs/method.md §2.4, §7.1).

- :class:`TextureStats` / :func:`load_texture_stats` — per-channel texture statistics from a
  checkpoint (stored with the weights), a latent cache or the authors' ``latents_stats.pt``;
- :func:`latents_to_images` — drop the semantic channels, z = x·σ + μ, decode to uint8;
- :func:`make_grid` — a labelled PNG grid;
- :func:`preview_grid` — a model's progress picture on fixed seeds (the trainer's periodic EMA grid).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from sfd.checkpoint import Checkpoint, WeightsError, load_tensors, read_checkpoint
from sfd.models.autoencoder import to_uint8

__all__ = ["TextureStats", "load_texture_stats", "texture_stats_of", "Decoder", "latents_to_images", "make_grid", "preview_grid"]


@dataclass(frozen=True)
class TextureStats:
    """Per-channel statistics of the raw texture latent (docs/method.md §2.4)."""

    mean: Tensor  # (C_tex,)
    std: Tensor  # (C_tex,)
    source: str

    @classmethod
    def identity(cls, channels: int) -> TextureStats:
        """No denormalisation: for models trained on raw latents (and untrained demos)."""
        return cls(torch.zeros(channels), torch.ones(channels), "identity")


def load_texture_stats(path: str | os.PathLike[str]) -> TextureStats:
    """Texture mean/std from a checkpoint, a latent-cache directory or the authors' ``latents_stats.pt``.

    - a run directory, checkpoint directory or our ``.safetensors`` → the ``latent_stats`` the
      trainer stored with the weights (the checkpoint contract, sfd/checkpoint.py);
    - a latent-cache directory → its stored statistics;
    - the authors' file ``{'mean': [1, 32, 1, 1], 'std': [1, 32, 1, 1]}`` (docs/method.md §2.4), or a
      file with ``texture_mean``/``texture_std`` keys (as the cache stores them).
    """
    p = Path(path)
    if p.is_dir() and not (p / "checkpoints").is_dir() and not (p / "state.pt").is_file():
        from sfd.data.cache import LatentCache  # zarr only when a cache is used

        stats = LatentCache.open(p).stats()
        mean, std = torch.as_tensor(stats["texture_mean"]), torch.as_tensor(stats["texture_std"])
    elif p.is_dir() or p.suffix == ".safetensors":
        return texture_stats_of(read_checkpoint(p, weights=False), source=p)
    else:
        raw = load_tensors(p)
        if not isinstance(raw, dict):
            raise WeightsError(f"'{p}' holds a {type(raw).__name__}, not a dict of latent statistics")
        for m_key, s_key in (("mean", "std"), ("texture_mean", "texture_std")):
            if m_key in raw and s_key in raw:
                mean, std = torch.as_tensor(raw[m_key]), torch.as_tensor(raw[s_key])
                break
        else:
            raise WeightsError(
                f"'{p}' has keys {sorted(raw)}; expected 'mean'/'std' (the authors' latents_stats.pt) "
                "or 'texture_mean'/'texture_std'"
            )
    return _checked(mean, std, p)


def texture_stats_of(ckpt: Checkpoint, source: str | os.PathLike[str] | None = None) -> TextureStats:
    """The texture statistics the trainer stored with a checkpoint already read (no second read)."""
    stored = ckpt.latent_stats or {}
    if "texture_mean" not in stored:
        raise WeightsError(
            f"'{ckpt.path}' stores no latent statistics (written before they were stored, or not "
            "trained on a cache); pass them: --stats CACHE_DIR or the authors' latents_stats.pt"
        )
    return _checked(torch.tensor(stored["texture_mean"]), torch.tensor(stored["texture_std"]), source or ckpt.path)


def _checked(mean: Tensor, std: Tensor, source: str | os.PathLike[str]) -> TextureStats:
    mean, std = mean.float().reshape(-1), std.float().reshape(-1)
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise WeightsError(f"'{source}': bad texture statistics (mean {tuple(mean.shape)}, std {tuple(std.shape)}, std > 0 required)")
    return TextureStats(mean, std, str(source))


class Decoder(Protocol):
    def decode(self, z: Tensor) -> Tensor:  # (B, C_tex, h, w) → (B, 3, H, W) in [-1, 1]
        ...


@torch.no_grad()
def latents_to_images(
    latents: Tensor, stats: TextureStats, decoder: Decoder, texture_chans: int
) -> Tensor:
    """Composite latents (B, C, h, w) → uint8 images (B, H, W, 3) on the CPU.

    The semantic channels are discarded (docs/method.md §7.1); the texture channels are mapped back to
    the VAE's scale, z = x·σ + μ (latent_multiplier 1), decoded and quantised as the authors do.
    """
    if stats.mean.numel() != texture_chans:
        raise ValueError(f"texture statistics have {stats.mean.numel()} channels, the model {texture_chans}")
    param = next(iter(decoder.parameters()), None) if isinstance(decoder, torch.nn.Module) else None
    device = param.device if param is not None else latents.device
    x = latents[:, :texture_chans].float().to(device)
    z = x * stats.std.to(device)[None, :, None, None] + stats.mean.to(device)[None, :, None, None]
    return to_uint8(decoder.decode(z)).cpu()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap default font
        return ImageFont.load_default()


def make_grid(
    images: Tensor | np.ndarray,
    nrow: int,
    captions: Sequence[str] | None = None,
    *,
    pad: int = 2,
    caption_height: int = 12,
    background: tuple[int, int, int] = (255, 255, 255),
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Tile uint8 images (N, H, W, 3), ``nrow`` per row, each with a caption strip below it.

    Size: width = nrow·(W + pad) + pad, height = rows·(H + caption_height + pad) + pad, where
    rows = ceil(N / nrow); ``caption_height`` 0 (or no captions) gives a plain grid. Captions
    use PIL's default font and are cut to the tile width; ``row_labels`` (one per row) are drawn
    whole in a left margin.
    """
    imgs = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {imgs.dtype} {imgs.shape}")
    if captions is not None and len(captions) != len(imgs):
        raise ValueError(f"{len(captions)} captions for {len(imgs)} images")
    n, h, w, _ = imgs.shape
    cap = caption_height if captions is not None else 0
    rows = max(1, math.ceil(n / nrow))
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    font = _font(max(cap - 2, 6))
    # Row labels (e.g. full class names) get a left margin as wide as the longest one, so they are
    # never cut the way per-tile captions must be.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_font = _font(max(min(h // 3, 14), 8))
    left = 0 if not row_labels else int(max(measure.textlength(t, font=label_font) for t in row_labels)) + 2 * pad + 4
    grid = Image.new("RGB", (left + nrow * (w + pad) + pad, rows * (h + cap + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(row_labels or []):
        draw.text((pad + 2, pad + r * (h + cap + pad) + max(0, (h - getattr(label_font, "size", 10)) // 2)), text,
                  fill=(0, 0, 0), font=label_font)
    for i, tile in enumerate(imgs):
        x, y = left + pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + cap + pad)
        grid.paste(Image.fromarray(tile), (x, y))
        if cap and captions[i]:
            text = captions[i]
            while text and draw.textlength(text, font=font) > w:
                text = text[:-1]
            draw.text((x, y + h), text, fill=(0, 0, 0), font=font)
    return grid


@torch.no_grad()
def preview_grid(
    model: torch.nn.Module, num: int = 16, stats: TextureStats | None = None, decoder: Decoder | None = None,
    path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Sample ``model`` on ``num`` fixed seeds (labels 0, 1, 2, ... cycling over its classes): the
    latents' statistics, and with a decoder and ``path`` a PNG grid there (its path under ``png``)."""
    from sfd.config import SamplingConfig
    from sfd.samplers import generate_latents

    m = model.cfg
    labels = [i % m.num_classes for i in range(num)]
    # Heun on the exact three-phase grid: 50 NFE, plenty for a progress picture.
    latents, nfe = generate_latents(model, labels, range(num), SamplingConfig(method="heun", num_steps=25))
    tex, sem = latents[:, : m.texture_chans], latents[:, m.texture_chans :]
    record: dict[str, Any] = {"nfe": nfe, "texture_mean": tex.mean().item(), "texture_std": tex.std().item()}
    if m.semantic_chans > 0:
        record |= {"semantic_mean": sem.mean().item(), "semantic_std": sem.std().item()}
    if decoder is not None and stats is not None and path is not None:
        images = latents_to_images(latents, stats, decoder.to(latents.device), m.texture_chans)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, nrow=8, captions=[str(c) for c in labels]).save(path)
        record["png"] = str(path)
    return record
