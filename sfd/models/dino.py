"""DINOv2 ViT-B/14 with 4 registers through timm: the semantic-feature and REPA-target encoder.

The authors run ``torch.hub`` ``dinov2_vitb14_reg`` and keep ``x_norm_patchtokens``: the
final-LayerNorm patch tokens, without the CLS and the 4 register tokens (docs/method.md §2.2, §3.1,
§11). We build the same network as a timm ``VisionTransformer`` (register tokens, position
embedding on patches only, LayerScale) and load Meta's original
``dinov2_vitb14_reg4_pretrain.pth`` through timm's own DINOv2 checkpoint conversion.

That conversion does three things (timm ``checkpoint_filter_fn`` → ``_convert_dinov2``):
drops ``mask_token`` (only used by DINOv2's masked training), renames ``register_tokens`` →
``reg_token``, and folds the CLS slot of the position embedding into ``cls_token``
(``cls_token + pos_embed[:, 0]``) since timm adds position embeddings to patches only
(``no_embed_class``); it then resamples the 37×37 patch grid (518²) to the model's 16×16
(224²) once, bicubic with ``antialias=True``. The original DINOv2 code resamples on every
forward with the same call — bicubic to an explicit output size, antialiased — when
``interpolate_offset`` is 0 and ``interpolate_antialias`` is true, which are the settings of
the ``*_reg`` hub models. Resampling once at load time is therefore exact (golden test:
max |Δ| ≈ 1e-6 on the tiny DINOv2). Models built with a non-zero offset (the register-free
hub models use 0.1 with ``scale_factor``) would need a different resampling and are rejected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from sfd.checkpoint import (
    WeightsError,
    load_state_dict_strict,
    load_tensors,
    resolve_weights,
    unwrap_state_dict,
)
from sfd.config import DINO_PRESETS, ConfigError, DinoConfig
from sfd.config import preset as config_preset

# torchvision/timm ImageNet statistics, as the authors' Normalize uses (timm IMAGENET_DEFAULT_*).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoEncoder(nn.Module):
    """DINOv2 with registers; ``forward`` maps ADM-cropped images in [-1, 1] to patch tokens (B, 256, D)."""

    def __init__(self, cfg: DinoConfig, *, init_weights: bool = True) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ConfigError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        # Position grids are resampled once at load (timm, bicubic, antialiased), which equals
        # DINOv2's per-forward resampling only for offset 0 with antialias (the *_reg models).
        if cfg.interpolate_offset != 0.0:
            raise ConfigError(
                f"interpolate_offset={cfg.interpolate_offset}: DINOv2 then resamples with a scale factor, "
                "which the load-time resampling does not reproduce (only offset 0, as in the *_reg models)"
            )
        if not cfg.interpolate_antialias:
            raise ConfigError("interpolate_antialias=False is not supported (the *_reg models use True)")
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            init_values=cfg.init_values,  # LayerScale: blocks.*.ls1.gamma / ls2.gamma
            reg_tokens=cfg.num_register_tokens,
            no_embed_class=True,  # DINOv2's CLS position slot is folded into cls_token at load
            class_token=True,
            num_classes=0,  # no head: features only
            global_pool="token",
            norm_layer=LayerNorm,  # DINOv2 uses LayerNorm(eps=1e-6), timm's LayerNorm default
            dynamic_img_size=False,  # the position grid is resampled once, at load time
            weight_init="" if init_weights else "skip",
        )
        self.num_prefix_tokens = 1 + cfg.num_register_tokens
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid_size(self) -> int:
        return self.cfg.img_size // self.cfg.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) → normalised (B, 3, img_size, img_size), the authors' order.

        Their cache builder (docs/method.md §2.2; extract_features.py@8b17273:295-296) maps to [0, 1],
        applies ImageNet Normalize, and *then* resizes the whole 256² crop to 224² with
        ``F.interpolate(mode="bicubic")`` — default ``align_corners=False``, no antialiasing.
        """
        x = (images.float() + 1.0) / 2.0
        x = (x - self.mean) / self.std
        size = (self.cfg.img_size, self.cfg.img_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
        return x

    def _features(self, x_normed: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit.forward_features(x_normed)  # (B, 1 + R + N, D), after the final norm
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1 : self.num_prefix_tokens],
            "x_norm_patchtokens": tokens[:, self.num_prefix_tokens :],
        }

    def forward_features_01(self, images_01: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [0, 1] already at img_size² → DINOv2 ``forward_features``-style dict.

        Keys as DINOv2 names them: ``x_norm_patchtokens`` (B, N, D), ``x_norm_clstoken`` (B, D),
        ``x_norm_regtokens`` (B, R, D).
        """
        return self._features((images_01 - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ADM-cropped images in [-1, 1] (B, 3, 256, 256) → final-norm patch tokens (B, 256, D)."""
        return self._features(self.preprocess(images))["x_norm_patchtokens"]


def dino_config_from_original(
    original: Mapping[str, Any] | str, *, img_size: int = 224
) -> DinoConfig:
    """Map DINOv2's own constructor arguments (``vit_base(img_size=518, ...)``) to a DinoConfig.

    ``original["img_size"]`` is the grid the weights were trained for (518 → 37×37), which is our
    ``pretrained_img_size``; ``img_size`` is the input we run at. Raises for interpolation
    settings the load-time resampling cannot reproduce (see the module docstring).
    """
    cfg = json.loads(original) if isinstance(original, str) else dict(original)
    if int(cfg.get("block_chunks", 0)) != 0:
        raise ConfigError("block_chunks != 0 (chunked 'blocks.i.j' names) is not supported")
    return DinoConfig(
        embed_dim=int(cfg["embed_dim"]),
        depth=int(cfg["depth"]),
        num_heads=int(cfg["num_heads"]),
        patch_size=int(cfg["patch_size"]),
        num_register_tokens=int(cfg.get("num_register_tokens", 0)),
        img_size=img_size,
        pretrained_img_size=int(cfg["img_size"]),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        init_values=float(cfg.get("init_values", 1.0)),
        interpolate_antialias=bool(cfg.get("interpolate_antialias", True)),
        interpolate_offset=float(cfg.get("interpolate_offset", 0.0)),
    )


def convert_dinov2_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: DinoEncoder
) -> dict[str, torch.Tensor]:
    """Original DINOv2 names (pos_embed for the pretrained grid) → timm names at the model's grid."""
    cfg = model.cfg
    pretrained_grid = cfg.pretrained_img_size // cfg.patch_size
    if "pos_embed" in state_dict and "mask_token" in state_dict:  # original layout: CLS slot included
        expected = 1 + pretrained_grid * pretrained_grid
        got = state_dict["pos_embed"].shape[1]
        if got != expected:
            raise WeightsError(
                f"pos_embed has {got} positions, expected 1 + {pretrained_grid}² = {expected} "
                f"for pretrained_img_size {cfg.pretrained_img_size} at patch {cfg.patch_size}"
            )
    # timm's filter pops entries of the mapping it gets: hand it a copy.
    return checkpoint_filter_fn(dict(state_dict), model.vit, interpolation="bicubic", antialias=True)


def load_dino(
    path: str | os.PathLike[str] | None = None,
    preset: str = "dinov2_vitb14_reg",
    cfg: DinoConfig | None = None,
) -> DinoEncoder:
    """Frozen DINOv2 encoder (eval mode) from Meta's ``dinov2_vitb14_reg4_pretrain.pth``.

    Reads a local file only (nothing is downloaded), converts the original names with timm's
    DINOv2 conversion, and loads strictly. ``cfg`` overrides the named preset.
    """
    cfg = cfg if cfg is not None else config_preset(DINO_PRESETS, preset, "DINOv2")
    file = resolve_weights("dinov2", path)
    state = unwrap_state_dict(load_tensors(file))
    model = DinoEncoder(cfg, init_weights=False)  # every tensor is overwritten by the strict load
    load_state_dict_strict(model.vit, convert_dinov2_state_dict(state, model), source=str(file))
    model.eval().requires_grad_(False)
    return model


__all__ = [
    "DinoEncoder",
    "load_dino",
    "dino_config_from_original",
    "convert_dinov2_state_dict",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
