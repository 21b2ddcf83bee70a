"""Texture KL-VAE: the LDM ``AutoencoderKL`` (docs/method.md §2.1).

SFD's texture latent comes from hustvl's ``ldm-imagenet256-f16d32-50ep.ckpt``, a plain LDM /
"SD-VAE" architecture KL autoencoder (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at
resolution 16, 32 latent channels): a 256² image in [-1, 1] becomes a 32×16×16 latent.
Parameter names follow the LDM code (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``) so the released Lightning checkpoint loads as is.

Differences from the LDM code that do not change the numbers: attention runs through
``F.scaled_dot_product_attention`` (single head over the H·W tokens, scale C^-1/2, as LDM's
explicit bmm/softmax), the posterior is a pair of tensors instead of a distribution object, and
posterior noise can come from a caller's generator(s).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import (
    WeightsError,
    check_state_dict,
    load_state_dict_strict,
    load_tensors,
    read_safetensors_metadata,
    resolve_weights,
    unwrap_state_dict,
)
from sfd.config import TEXTURE_VAE_PRESETS, ConfigError, TextureVAEConfig, from_dict
from sfd.config import preset as config_preset

# LDM's DiagonalGaussianDistribution clamps the log-variance to this range before exp.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Key prefixes inside the authors' checkpoints that are not part of the autoencoder. The authors'
# loader (tokenizer/autoencoder.py ``init_from_ckpt``) drops every key containing "loss" (LPIPS
# and the PatchGAN discriminator of the Lightning training module) and loads the rest with
# strict=False, so it also silently ignores the VA-VAE alignment parts (``foundation_model.*``,
# ``linear_proj.*``, present only in checkpoints trained with ``use_vf``) and LDM's LitEma
# shadow weights (``model_ema.*``; LDM writes them only for models built with ``use_ema``, which
# its AutoencoderKL is not, so this is defensive: the authors' loader would use the raw weights).
# We drop exactly these and load everything else strictly.
IGNORED_PREFIXES: tuple[str, ...] = ("loss.", "model_ema.", "foundation_model.", "linear_proj.")

Generators = torch.Generator | Sequence[torch.Generator] | None


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → swish → conv, twice, plus a 1×1 shortcut when the width changes.

    LDM's block also has a timestep projection, unused in the autoencoder (``temb_ch = 0``), so
    it has no parameters here.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with 1×1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # B,C,H,W -> B,1,HW,C (one head)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale C^-1/2 is LDM's; fused kernels keep memory linear in H·W.
        out = F.scaled_dot_product_attention(tokens(self.q(x_n)), tokens(self.k(x_n)), tokens(self.v(x_n)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one zero row/column at the bottom/right only (LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, each followed by attention where the level has it."""

    def __init__(self, channels: list[tuple[int, int]], with_attn: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout) for i, o in channels)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in channels) if with_attn else nn.ModuleList()
        self.downsample: Downsample | None = None  # set by Encoder on all but the last level
        self.upsample: Upsample | None = None  # set by Decoder on all but level 0

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B,3,H,W) → 2·z_channels moments at (H/f, W/f), f = 2^(len(ch_mult)-1)."""

    def __init__(self, cfg: TextureVAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, width in enumerate(widths):
            # Attention is placed by the *nominal* resolution of the config, as in LDM, not by
            # the size of the image actually passed in.
            res = cfg.resolution // 2**level
            chans = [(block_in if i == 0 else width, width) for i in range(cfg.num_res_blocks)]
            down = _Level(chans, res in cfg.attn_resolutions, cfg.dropout)
            if level != len(widths) - 1:
                down.downsample = Downsample(width)
            self.down.append(down)
            block_in = width
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down.run_blocks(h)
            if down.downsample is not None:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent → image (B,out_ch,H·f,W·f); ``up[level]`` runs from the coarsest level."""

    def __init__(self, cfg: TextureVAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        num_levels = len(widths)
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        ups: list[_Level] = []
        for level in reversed(range(num_levels)):
            width = widths[level]
            res = cfg.resolution // 2**level
            # One more res block per level than the encoder (LDM).
            chans = [(block_in if i == 0 else width, width) for i in range(cfg.num_res_blocks + 1)]
            up = _Level(chans, res in cfg.attn_resolutions, cfg.dropout)
            if level != 0:
                up.upsample = Upsample(width)
            ups.append(up)
            block_in = width
        # Indexed by level (finest first), matching the checkpoint's ``decoder.up.<level>`` names.
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up.run_blocks(h)
            if up.upsample is not None:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _posterior_noise(mean: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``mean``.

    Noise is drawn on the generator's own device (then moved), so a CPU generator gives the same
    latent on any machine; one generator per row makes each image's draw independent of the batch
    it was encoded in (seed it from the image index for a resumable, re-shardable cache).
    Without a generator it is ``randn_like`` from the global RNG of ``mean``'s device. (The
    authors draw from the global CPU RNG with no per-image seeding, so their exact draws cannot
    be reproduced anyway; docs/method.md §2.1.)
    """
    if generator is None:
        return torch.randn_like(mean)
    if isinstance(generator, torch.Generator):
        eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
    else:
        gens = list(generator)
        if len(gens) != mean.shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {mean.shape[0]}")
        eps = torch.stack(
            [torch.randn(mean.shape[1:], generator=g, device=g.device, dtype=mean.dtype).to(mean.device) for g in gens]
        )
    return eps.to(mean.device)


class AutoencoderKL(nn.Module):
    """LDM KL autoencoder. Images in [-1, 1]; latents as the authors cache them (unnormalised)."""

    def __init__(self, cfg: TextureVAEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else TextureVAEConfig()
        if not cfg.double_z:
            raise ConfigError("the KL autoencoder needs double_z=True (the encoder emits mean and log-variance)")
        if any(cfg.ch * m % 32 for m in cfg.ch_mult):
            raise ConfigError(f"every width ch*ch_mult must be a multiple of 32 (GroupNorm groups), got ch={cfg.ch}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)``, each (B, embed_dim, H/f, W/f); logvar NOT yet clamped."""
        moments = self.quant_conv(self.encoder(image))
        if moments.dtype in (torch.float16, torch.bfloat16):
            # Under autocast keep the posterior maths (exp of logvar, the sample) in fp32.
            moments = moments.float()
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode(self, image: torch.Tensor, *, sample: bool = True, generator: Generators = None) -> torch.Tensor:
        """Texture latent z of ``image`` in [-1, 1].

        ``sample=True`` returns the posterior sample mean + exp(0.5·clamp(logvar, -30, 20))·ε that
        the authors cache (docs/method.md §2.1, §12.3 item 6); ``sample=False`` returns the mean.
        ``generator`` is one ``torch.Generator`` for the whole batch or a sequence with one per
        row (per-image determinism independent of batching); see :func:`_posterior_noise`.
        """
        mean, logvar = self.encode_moments(image)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        return mean + std * _posterior_noise(mean, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw decoder output (nominally in [-1, 1], not clamped); map to pixels with :func:`to_uint8`."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, image: torch.Tensor, *, sample: bool = False, generator: Generators = None) -> torch.Tensor:
        """Reconstruction: ``decode(encode(image))`` (posterior mean by default)."""
        return self.decode(self.encode(image, sample=sample, generator=generator))


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Decoder output (B,3,H,W) in [-1, 1] → uint8 pixels (B,H,W,3), on the same device.

    Exactly the authors' mapping (LightningDiT's ``decode_to_images``, docs/method.md §2.1):
    clamp(127.5·x + 128, 0, 255) then a cast to uint8, which truncates. Because of the +128 (not
    +127.5) this is round-half-up of 127.5·(x + 1): x = -1 → 0, x = 0 → 128, x = 1 → 255
    (255.5 clamped). The arithmetic runs in fp32: in bf16, 127.5·x + 128 is only exact to ±1.
    """
    pixels = torch.clamp(127.5 * image.float() + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def texture_vae_config_from_authors(ddconfig: Mapping[str, Any], embed_dim: int | None = None) -> TextureVAEConfig:
    """:class:`TextureVAEConfig` from an LDM ``ddconfig`` mapping (e.g. a golden file's metadata).

    LDM keeps ``embed_dim`` outside ``ddconfig``; the authors' tokenizer sets it equal to
    ``z_channels``, which is the default here.
    """
    fields = dict(ddconfig)
    fields.setdefault("embed_dim", embed_dim if embed_dim is not None else fields.get("z_channels", 32))
    return from_dict(TextureVAEConfig, fields, where="texture VAE ddconfig")


def texture_vae_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The autoencoder's state dict from a checkpoint container, minus :data:`IGNORED_PREFIXES`."""
    sd = unwrap_state_dict(obj, prefer=("state_dict", "model_state_dict", "model", "ema"))
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}


# Metadata keys of a safetensors texture VAE that declares its own architecture (LDM's names: the
# ``ddconfig`` mapping of its yaml and ``embed_dim``, which LDM keeps beside it).
DDCONFIG_KEY, EMBED_DIM_KEY = "ddconfig", "embed_dim"


def texture_vae_metadata(cfg: TextureVAEConfig) -> dict[str, str]:
    """The metadata that makes a safetensors file declare ``cfg`` (see :func:`texture_vae_config_for_file`)."""
    ddconfig = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k != "embed_dim"}
    return {DDCONFIG_KEY: json.dumps(ddconfig), EMBED_DIM_KEY: str(cfg.embed_dim)}


def texture_vae_config_for_file(path: str | os.PathLike[str]) -> TextureVAEConfig | None:
    """The architecture a safetensors texture VAE declares in its metadata, or None if it declares none.

    Such a file (the CPU demo's autoencoder, sfd/demo/texture.py) carries LDM's ``ddconfig`` as
    JSON and ``embed_dim``. The declaration is checked against the file's tensor names and shapes
    here (from the header, no weights read), so a file that lies about itself is one error naming
    it, before any model is built from it. ``.ckpt``/``.pt`` files declare nothing (their
    architecture is a preset's).
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        return None
    meta = read_safetensors_metadata(p)
    if DDCONFIG_KEY not in meta:
        return None
    where = f"texture VAE '{p}'"
    try:
        ddconfig = json.loads(meta[DDCONFIG_KEY])
        if not isinstance(ddconfig, dict):
            raise ValueError(f"it is a {type(ddconfig).__name__}, not a mapping")
        embed_dim = int(meta[EMBED_DIM_KEY]) if EMBED_DIM_KEY in meta else None
        cfg = texture_vae_config_from_authors(ddconfig, embed_dim)
        with torch.device("meta"):  # shapes only: no memory, no init time even for f16d32
            model = AutoencoderKL(cfg)
    except (ValueError, TypeError, ConfigError) as e:
        raise WeightsError(f"{where}: its metadata '{DDCONFIG_KEY}'/'{EMBED_DIM_KEY}' is not a valid LDM autoencoder config: {e}") from e
    from safetensors import safe_open

    with safe_open(str(p), framework="pt", device="cpu") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    shapes = {k: v for k, v in shapes.items() if not k.startswith(IGNORED_PREFIXES)}
    check_state_dict(model, shapes, source=f"{where} (architecture from its metadata {DDCONFIG_KEY} {meta[DDCONFIG_KEY]}, embed_dim {cfg.embed_dim})")
    return cfg


def load_texture_vae(
    path: str | os.PathLike[str] | None = None,
    preset: str = "f16d32",
    cfg: TextureVAEConfig | None = None,
) -> AutoencoderKL:
    """Frozen texture VAE (eval mode, ``requires_grad`` off) from a weight file.

    ``path`` defaults to ``weights/ldm-imagenet256-f16d32-50ep.ckpt``; a missing file raises
    :class:`WeightsError` naming it and its publisher. Accepts the authors' Lightning ``.ckpt``
    (``state_dict`` key; ``loss.*`` and the other :data:`IGNORED_PREFIXES` dropped), a plain
    state dict (``.pt``/``.pth``) or our safetensors. The architecture is ``cfg`` if given, else
    the one the file declares (:func:`texture_vae_config_for_file`), else the named preset; every
    remaining key must fit it exactly (strict load).
    """
    p = resolve_weights("texture_vae", path)
    if cfg is None:
        cfg = texture_vae_config_for_file(p) or config_preset(TEXTURE_VAE_PRESETS, preset, "texture VAE")
    state_dict = texture_vae_state_dict(load_tensors(p, inert_objects=True))
    model = AutoencoderKL(cfg)
    load_state_dict_strict(model, state_dict, source=f"'{p}'")
    model.eval().requires_grad_(False)
    return model


__all__ = [
    "AutoencoderKL",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "IGNORED_PREFIXES",
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "to_uint8",
    "texture_vae_config_from_authors",
    "texture_vae_config_for_file",
    "texture_vae_metadata",
    "texture_vae_state_dict",
    "load_texture_vae",
]
