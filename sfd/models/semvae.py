"""Semantic VAE: compresses DINOv2 patch tokens into the 16-channel semantic latent (docs/method.md §3).

Architecture of the authors' ``transformer`` arch (their ``SemanticVariationalAutoEncoder``):

    encoder: Linear(in→hidden), N pre-LN blocks, LayerNorm, Linear(hidden→2·bottleneck)
    decoder: Linear(bottleneck→hidden), N pre-LN blocks, LayerNorm, Linear(hidden→in)

Each block is ``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` with a 4× exact-GELU MLP. There is no
position embedding anywhere (docs/method.md §3.2, §12.3 item 5): every token is encoded with
attention over the image's other tokens, but nothing tells the network where a token sits.

Parameter names match ``semantic_ae_final.pt`` (``model_state_dict``) exactly, including
``attn.in_proj_weight`` / ``attn.out_proj`` of ``nn.MultiheadAttention``; the attention itself
is our own and runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU, autocast-safe).

The posterior is a diagonal Gaussian whose moments are ``[mean | logvar]`` along the last axis,
logvar clamped to [-30, 20]; the cached latent is a *sample*, not the mean (docs/method.md §3.4,
§12.3 item 6).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import load_state_dict_strict, load_tensors, resolve_weights, unwrap_state_dict
from sfd.config import SEMVAE_PRESETS, SemVAEConfig
from sfd.config import preset as config_preset

# diffusers' DiagonalGaussianDistribution clamp, used by the authors' posterior and KL.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class PackedSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter layout and initialisation.

    ``in_proj_weight`` stacks [W_q; W_k; W_v] (3·D × D), as the released checkpoint stores it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init, so training from scratch starts where the authors did.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (dropout 0)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PackedSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _tower(dim_in: int, dim_out: int, cfg: SemVAEConfig) -> nn.Sequential:
    # Index layout (0 = in-proj, 1..N = blocks, N+1 = norm, N+2 = out-proj) is the checkpoint's.
    blocks = [TransformerBlock(cfg.hidden_dim, cfg.transformer_heads) for _ in range(cfg.transformer_blocks)]
    return nn.Sequential(
        nn.Linear(dim_in, cfg.hidden_dim),
        *blocks,
        nn.LayerNorm(cfg.hidden_dim),
        nn.Linear(cfg.hidden_dim, dim_out),
    )


class SemVAE(nn.Module):
    """The authors' transformer Semantic VAE over per-image token sequences (B, N, input_dim)."""

    def __init__(self, cfg: SemVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _tower(cfg.input_dim, 2 * cfg.bottleneck_dim, cfg)
        self.decoder = _tower(cfg.bottleneck_dim, cfg.input_dim, cfg)

    def encode_moments(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, input_dim) → (B, N, 2·bottleneck): mean then (unclamped) logvar on the last axis."""
        return self.encoder(tokens)

    def posterior(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | tokens), logvar clamped as diffusers does, each (B, N, bottleneck)."""
        mean, logvar = self.encode_moments(tokens).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(
        self, tokens: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Semantic latent z (B, N, bottleneck): a posterior sample (what the cache holds) or the mean.

        The sample is ``mean + exp(0.5·logvar)·ε``. ε is drawn in the authors' layout, a
        (B, C, N) tensor (their posterior lives on a (B, C, 16, 16) map), so a generator seeded
        like theirs gives the same draw.
        """
        mean, logvar = self.posterior(tokens)
        if not sample:
            return mean
        return mean + torch.exp(0.5 * logvar) * _gaussian_like(mean, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, bottleneck) → reconstructed tokens (B, N, input_dim)."""
        return self.decoder(z)

    def forward(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (recon, mean, logvar); recon decodes a reparameterised posterior sample."""
        mean, logvar = self.posterior(tokens)
        z = mean + torch.exp(0.5 * logvar) * _gaussian_like(mean, generator)
        return self.decode(z), mean, logvar


def _gaussian_like(mean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    B, N, C = mean.shape
    device = generator.device if generator is not None else mean.device
    eps = torch.randn((B, C, N), generator=generator, device=device, dtype=mean.dtype)
    return eps.to(mean.device).transpose(1, 2)


def semvae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    kl_weight: float = 1e-7,
    mse_weight: float = 1.0,
    cos_weight: float = 1.0,
    cos_axis: Literal["token", "feature"] = "token",
) -> dict[str, torch.Tensor]:
    """The authors' SemVAE objective (docs/method.md §3.3): ``mse + (1 − cos) + 1e-7·KL``.

    Terms, for ``recon``/``target`` of shape (B, N, D) and a posterior (mean, logvar) (B, N, C):

    - ``mse``: mean squared error over every element.
    - ``cos``: ``1 − mean cosine similarity``. ``cos_axis="token"`` (default) is what the
      authors' training loop computes — ``F.cosine_similarity`` with its default ``dim=1`` on a
      (B, 256, 768) tensor, i.e. for each feature channel a cosine across the 256 tokens
      (docs/method.md §12.3 item 2). It reproduces the released SemVAE. ``cos_axis="feature"`` is the
      evidently intended per-token cosine across the D features (what their evaluation reports).
    - ``kl``: ``0.5·Σ(μ² + σ² − 1 − log σ²)`` **summed** over all N·C latent elements of an
      image (diffusers' ``kl()`` over dims 1..3), then **averaged** over the batch; logvar is
      clamped to [-30, 20] first, as in their posterior. Per-element normalisation is
      commented out in their code, so the 1e-7 weight multiplies a sum of 4096 terms at 256×16.
    - ``total``: the weighted sum (their L1 and classification terms have weight 0 and are omitted).
    """
    if cos_axis not in ("token", "feature"):
        raise ValueError(f"cos_axis must be 'token' or 'feature', got {cos_axis!r}")
    mse = F.mse_loss(recon, target)
    cos_dim = 1 if cos_axis == "token" else -1
    cos = 1.0 - F.cosine_similarity(recon, target, dim=cos_dim).mean()
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    kl_per_image = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)
    kl = kl_per_image.mean()
    total = mse_weight * mse + cos_weight * cos + kl_weight * kl
    return {"mse": mse, "cos": cos, "kl": kl, "total": total}


def tokens_to_latent(z: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, h, w) latent map, row-major (token i at row i // w, column i % w)."""
    B, N, C = z.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"{N} tokens do not form a square grid")
    return z.transpose(1, 2).reshape(B, C, side, side)


def latent_to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latent map → (B, h·w, C) tokens; inverse of :func:`tokens_to_latent`."""
    return latent.flatten(2).transpose(1, 2)


def load_semvae(
    path: str | os.PathLike[str] | None = None,
    preset: str = "transformer_ch16",
    cfg: SemVAEConfig | None = None,
) -> SemVAE:
    """A frozen SemVAE in eval mode from the authors' ``semantic_ae_final.pt`` or our safetensors.

    The authors' file is a trainer checkpoint with the weights under ``model_state_dict`` (plus
    optimizer/scheduler state, which is ignored); a safetensors file holds the bare state dict.
    ``cfg`` overrides the named preset. Loading is strict: every missing, unexpected or
    mis-shaped key is reported at once.
    """
    cfg = cfg if cfg is not None else config_preset(SEMVAE_PRESETS, preset, "SemVAE")
    file = resolve_weights("semvae", path)
    state = unwrap_state_dict(load_tensors(file, inert_objects=True), prefer=("model_state_dict", "ema", "model", "state_dict"))
    model = SemVAE(cfg)
    load_state_dict_strict(model, state, source=str(file))
    model.eval().requires_grad_(False)
    return model


__all__ = [
    "SemVAE",
    "semvae_loss",
    "tokens_to_latent",
    "latent_to_tokens",
    "load_semvae",
    "LOGVAR_MIN",
    "LOGVAR_MAX",
]
