"""Stand-in encoders for demos and tests, and rebuilding the texture decoder a cache was made with.

No pretrained weights exist on a fresh machine, yet a demo should produce *visible* samples. The
:class:`PixelUnshuffleAutoencoder` is an exactly invertible "autoencoder": encode folds each
f×f pixel block into channels (``pixel_unshuffle``) and scales by a constant; decode undoes it.
A diffusion model trained on it learns pixels at 1/f resolution with 3·f² channels, so its
samples look like images. It is **not a VAE** (no compression, no learned prior) and its name
says so everywhere it is recorded.

:func:`build_texture_decoder` reads the ``texture_encoder`` attribute that the encode job
(``pipeline/encode.py``) writes into the cache and returns the matching decoder: the stand-in
(nothing to load), a random-init tiny VAE rebuilt from its seed (tests), or the real f16d32 VAE,
which needs its weight file and is checked against the recorded SHA-256.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import WeightsError, file_sha256, file_weights_identity, resolve_weights
from sfd.config import TextureVAEConfig, from_dict

STANDIN_PREFIX = "standin-f"  # CLI spelling: standin-f4, standin-f8, ...
# Pixels in [-1, 1] have a per-channel std of roughly 0.5 on natural images; ×2 brings the stand-in
# latent near unit scale (the cache's per-channel statistics normalise it exactly at load anyway).
STANDIN_SCALE = 2.0


class PixelUnshuffleAutoencoder(nn.Module):
    """Invertible pixel-unshuffle "autoencoder": (B, 3, H, W) ↔ (B, 3·f², H/f, W/f). Not a VAE."""

    def __init__(self, factor: int = 4, scale: float = STANDIN_SCALE, in_channels: int = 3) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.scale = float(scale)
        self.in_channels = in_channels

    @property
    def name(self) -> str:
        return f"pixel-unshuffle-f{self.factor} (stand-in, not a VAE)"

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def embed_dim(self) -> int:
        return self.in_channels * self.factor**2

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.factor:
            raise ValueError(f"image size {image_size} is not a multiple of the stand-in factor {self.factor}")
        side = image_size // self.factor
        return (self.embed_dim, side, side)

    def encode(self, image: torch.Tensor, *, sample: bool = True, generator: Any = None) -> torch.Tensor:
        """Images in [-1, 1] → latent; ``sample``/``generator`` accepted for API parity (deterministic)."""
        del sample, generator
        return F.pixel_unshuffle(image.float(), self.factor) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → images in [-1, 1] (exact inverse of :meth:`encode`)."""
        return F.pixel_shuffle(z.float() / self.scale, self.factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image))


def parse_standin(name: str) -> int | None:
    """``"standin-f4"`` → 4; any other name → None."""
    if not name.startswith(STANDIN_PREFIX):
        return None
    digits = name[len(STANDIN_PREFIX) :]
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"bad stand-in name {name!r}: expected e.g. 'standin-f4'")
    return int(digits)


def random_init(module_cls: type[nn.Module], cfg: Any, seed: int) -> nn.Module:
    """``module_cls(cfg)`` with parameters drawn from ``seed`` (the global RNG is left untouched).

    The same (class, config, seed) always gives the same weights on CPU, so a cache encoded with
    random tiny encoders can name them as ``random-init:<preset>:<seed>`` and be decoded later.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = module_cls(cfg)
    return model.eval().requires_grad_(False)


def random_lightningdit(cfg: Any, seed: int, scale: float = 0.02) -> nn.Module:
    """A LightningDiT of config ``cfg`` with random weights nudged off adaLN-Zero (a fresh model
    predicts exactly zero, which makes any sampler or benchmark trivial): seeds the global RNG,
    builds the model, adds ``scale``·N(0, 1) to every parameter; eval mode. Benches and tests."""
    from sfd.models.lightningdit import LightningDiT

    torch.manual_seed(seed)
    model = LightningDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def build_texture_decoder(
    cache_attrs: Mapping[str, Any], vae_path: str | os.PathLike[str] | None = None
) -> nn.Module:
    """The texture decoder matching a cache: a module with ``decode(z) -> images in [-1, 1]``.

    ``cache_attrs`` is ``LatentCache.attrs`` (or just its ``texture_encoder`` entry). Stand-in
    and random-init encoders are rebuilt without any file; a real VAE (``kind == "weights"``)
    is loaded from ``vae_path`` (default ``weights/<authors' file>``) and must have the SHA-256
    recorded at encoding time, so a latent is never decoded by a different VAE.
    """
    from sfd.models.autoencoder import AutoencoderKL, load_texture_vae

    info = cache_attrs.get("texture_encoder", cache_attrs)
    if not isinstance(info, Mapping) or "kind" not in info:
        raise ValueError("cache attributes have no 'texture_encoder' entry with a 'kind' (not made by pipeline/encode.py?)")
    kind = info["kind"]
    if kind == "standin":
        return PixelUnshuffleAutoencoder(int(info["factor"]), float(info["scale"])).eval()
    cfg = from_dict(TextureVAEConfig, dict(info["config"]), where="cache texture_encoder.config")
    if kind == "random-init":
        return random_init(AutoencoderKL, cfg, int(info["seed"]))
    if kind == "weights":
        path = resolve_weights("texture_vae", vae_path if vae_path is not None else _default_path(info))
        want = info.get("sha256")
        if want is not None:
            have = file_sha256(path)
            # Or the same weights in a file with other metadata (sfd.checkpoint.weights_identity).
            same = have == want
            if not same and "weights_sha256" in info:
                same = file_weights_identity(path, info["config"]) == info["weights_sha256"]
            if not same:
                raise WeightsError(
                    f"texture VAE '{path}' has SHA-256 {have[:16]}..., but the cache was encoded with "
                    f"{info.get('file', '?')} of SHA-256 {want[:16]}...: decoding would give wrong images"
                )
        return load_texture_vae(path, cfg=cfg)
    raise ValueError(f"unknown texture encoder kind {kind!r} in cache attributes")


def _default_path(info: Mapping[str, Any]) -> Path | None:
    file = info.get("file")
    return None if file is None else Path("weights") / str(file)


__all__ = [
    "PixelUnshuffleAutoencoder",
    "STANDIN_SCALE",
    "parse_standin",
    "random_init",
    "build_texture_decoder",
]
