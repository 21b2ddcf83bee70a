"""From checkpoints to ready modules: the sampler's model, guide, statistics and decoder.

Reading files is :func:`sfd.checkpoint.read_checkpoint`'s job; this room builds what a sampler
needs from what it read (``sample/grid.py``, ``eval/fid.py``, the trainer's grids and the demo).
:func:`load_model` is the one loader of a LightningDiT from a file, and every file is read once
per command: its header and weights in one :func:`~sfd.checkpoint.read_checkpoint` call, whose
result also gives the statistics and the decoder record stored with it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sfd.checkpoint import (
    KNOWN_WEIGHTS,
    WEIGHTS_DIR,
    Checkpoint,
    file_sha256,
    read_checkpoint,
    resolve_weights,
)
from sfd.config import ConfigError, ModelConfig, model_preset
from sfd.models.lightningdit import LightningDiT, build_lightningdit
from sfd.pixels import TextureStats, load_texture_stats, texture_stats_of

__all__ = ["load_model", "load_pipeline", "texture_decoder_for"]


def load_model(
    path: str | os.PathLike[str],
    config: ModelConfig | str | None = None,
    *,
    prefer_ema: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[LightningDiT, Path]:
    """(LightningDiT in eval mode on ``device``, the weight file it came from).

    ``path``: a run directory (latest checkpoint), a checkpoint directory or a weight file.
    ``config`` (a ModelConfig, or a preset name such as ``XL/1``) overrides a stored config and
    gives the architecture for files without one (the authors' released ``.pt`` are bare EMA
    state dicts, docs/method.md §12.2).
    """
    model, ckpt = _load(path, config, prefer_ema, device)
    return model, ckpt.path


def _load(
    path: str | os.PathLike[str], config: ModelConfig | str | None, prefer_ema: bool, device: torch.device | str
) -> tuple[LightningDiT, Checkpoint]:
    """The model and what its file held besides the weights (configs, statistics), read once."""
    cfg = model_preset(config) if isinstance(config, str) else config
    ckpt = read_checkpoint(path, prefer_ema=prefer_ema, model_config=cfg)
    model = build_lightningdit(ckpt)
    return model.to(device).eval().requires_grad_(False), dataclasses.replace(ckpt, state_dict={})


def load_pipeline(
    ckpt: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    model: str | None = None,
    guide: str | os.PathLike[str] | None = None,
    guide_model: str | None = None,
    ema: bool = True,
    stats: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    vae_preset: str = "f16d32",
) -> tuple[LightningDiT, Path, LightningDiT | None, TextureStats, Any]:
    """(model, its file, guide or None, texture stats, decoder) for sampling to pixels.

    ``stats``: a latent-cache directory, the authors' ``latents_stats.pt``, ``identity`` (no
    denormalisation) or None — the statistics stored with the checkpoint. A cache that records
    its texture encoder rebuilds exactly that decoder; otherwise the texture VAE file is loaded.
    """
    from sfd.models.autoencoder import load_texture_vae  # the decoder only when pixels are wanted

    net, read = _load(ckpt, model, ema, device)
    file = read.path
    guide_net = None
    if guide is not None:
        guide_net, _ = load_model(guide, guide_model, prefer_ema=ema, device=device)
    texture_chans = net.cfg.texture_chans
    if stats is not None and str(stats) == "identity":
        tstats = TextureStats.identity(texture_chans)
    elif stats is None and file.suffix == ".safetensors":
        tstats = texture_stats_of(read)  # stored with the weights: the file is not read again
    else:
        tstats = load_texture_stats(file if stats is None else stats)
    cache_attrs = _cache_attrs(stats)
    if stats is None and file.suffix == ".safetensors":
        # The trainer stored the cache's texture encoder with its statistics: no cache needed.
        cache_attrs = read.latent_stats
    if cache_attrs is not None and "texture_encoder" in cache_attrs:
        # The cache knows its texture encoder: rebuild exactly that decoder (a stand-in needs no
        # file; a real VAE must match the SHA-256 recorded at encoding time).
        from sfd.models.standins import build_texture_decoder

        decoder = build_texture_decoder(cache_attrs, None if vae is None else str(vae)).to(device)
        identity = {"from": "cache texture_encoder", **cache_attrs["texture_encoder"]}
        identity.pop("path", None)  # where the file lay on the encoding machine is no setting
    else:
        vae_file = resolve_weights("texture_vae", vae)
        decoder = load_texture_vae(vae_file, preset=vae_preset).to(device)
        identity = {"file": vae_file.name, "sha256": file_sha256(vae_file, 16), "preset": vae_preset}
    # What decodes the images is part of the settings that decide them (compared on resume).
    decoder.decoder_identity = identity
    have = decoder.embed_dim if hasattr(decoder, "embed_dim") else decoder.cfg.embed_dim
    if have != texture_chans:
        raise ConfigError(
            f"the texture decoder takes {have} latent channels but the model's texture part has "
            f"{texture_chans} (in_channels {net.cfg.in_channels} − semantic_chans {net.cfg.semantic_chans})"
        )
    return net, file, guide_net, tstats, decoder


def _cache_attrs(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The attributes of a latent cache at ``path``, or None when ``path`` is not one."""
    if path is None or str(path) == "identity" or not Path(path).is_dir():
        return None
    from sfd.data.cache import LatentCache

    try:
        return dict(LatentCache.open(path).attrs)
    except Exception:  # not a cache (e.g. a run dir or a folder holding latents_stats.pt)
        return None


def texture_decoder_for(cache_attrs: dict[str, Any], vae: str | None = None) -> tuple[nn.Module | None, str]:
    """The texture decoder of a latent cache (its attributes), or None and why there is none.

    The cache records its texture encoder: stand-in and random-init encoders are rebuilt without
    files; a real VAE is loaded from ``vae`` (or its README place under weights/) and must carry
    the SHA-256 recorded at encoding time. Returns (decoder, a line saying which)."""
    from sfd.models.standins import build_texture_decoder

    info = cache_attrs.get("texture_encoder")
    if not isinstance(info, dict):
        return None, "the cache records no texture encoder; EMA sample grids are logged as latent statistics"
    if info.get("kind") == "weights" and not vae:
        default = WEIGHTS_DIR / KNOWN_WEIGHTS["texture_vae"].filename
        if not default.is_file():
            return None, (f"no texture VAE at {default} (or -o texture_vae=PATH); EMA sample grids are "
                          "logged as latent statistics")
        vae = str(default)
    return build_texture_decoder(cache_attrs, vae or None), f"decoder {info.get('name', info.get('kind'))}"
