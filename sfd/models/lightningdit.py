"""LightningDiT for Semantic-First Diffusion (docs/method.md §4.4, §4.6, §5).

A port of the authors' ``models/lightningdit.py`` (SFD, built on hustvl/LightningDiT) with the
same parameter and buffer names, so their released checkpoints load strict:

- patch embed (1x1 conv for "/1") + fixed 2-D sin-cos position embedding (§5.2);
- blocks with RMSNorm, qk-norm, 2-D axial EVA-style RoPE, SDPA, SwiGLU and adaLN-Zero;
- conditioning c = concat[emb_sem(t_sem), emb_tex(t_tex)] + label embedding (§4.4), or the
  authors' single-timestep layout (``t_embedder.*``) that they silently switch to at Δt = 0
  (§12.3 bug 20);
- a REPA projector on the output of block ``repa_depth`` (1-indexed, §4.6), computed only when
  the caller asks for it.

Differences from the authors' module, all deliberate: the REPA projection is returned on request
(``return_repa``) instead of depending on ``self.training``; gradient checkpointing is a working
flag (their ``use_checkpoint`` was never wired, §12.3 bug 12); ``pos_embed`` is a buffer rather
than a frozen Parameter (same state-dict name and values); no ``torch.compile`` decorators.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sfd.checkpoint import (
    Checkpoint,
    WeightsError,
    load_state_dict_strict,
    save_checkpoint,
)
from sfd.config import ModelConfig
from sfd.kernels import block as fused
from sfd.weight_copies import Linear  # reads a bf16 weight copy with weight_cast=optimizer

# Recomputed at construction; older or foreign files may lack them (reference/README.md).
ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")



# ---------------------------------------------------------------------------------------------
# Fixed position codes


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """MAE/DiT 2-D sin-cos table, (grid_size², embed_dim), float32, row-major tokens.

    As the authors' ``get_2d_sincos_pos_embed``: the first half of the channels encodes the
    column (w) index, the second half the row index; each half is [sin | cos] with
    ω_k = 10000^(-k / (D/4)), evaluated in float64 and stored as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (
        torch.arange(quarter, dtype=torch.float64, device="cpu") / quarter
    )  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (g², D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def rope_tables_2d(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (grid_size², head_dim) of the authors' ``VisionRotaryEmbeddingFast``.

    Per-axis width a = head_dim/2 with frequencies θ^(-2k/a); every frequency is repeated for
    an adjacent (even, odd) channel pair. The first a channels rotate with the row index, the
    last a with the column index; tokens are row-major. Positions are computed as the authors
    do, arange(g)/g*g in float32, so the tables match theirs bit for bit.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / (
        theta ** (torch.arange(0, axis_dim, 2, device="cpu").float() / axis_dim)
    )  # (a/2,)
    pos = torch.arange(grid_size, device="cpu") / grid_size * grid_size  # float32, as the authors
    angles = torch.einsum("i,f->if", pos, freqs).repeat_interleave(2, dim=-1)  # (g, a)
    angles = torch.cat(
        [
            angles[:, None, :].expand(grid_size, grid_size, axis_dim),  # row index
            angles[None, :, :].expand(grid_size, grid_size, axis_dim),  # column index
        ],
        dim=-1,
    ).reshape(grid_size * grid_size, head_dim)
    return angles.cos(), angles.sin()


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): EVA's interleaved ``rotate_half``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class AxialRoPE2d(nn.Module):
    """2-D axial rotary embedding applied to (B, heads, N, head_dim) queries and keys."""

    def __init__(self, head_dim: int, grid_size: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.grid_size = grid_size
        # Persistent: the authors' checkpoints carry them, so state-dict keys match theirs.
        self.register_buffer("freqs_cos", torch.empty(grid_size * grid_size, head_dim))
        self.register_buffer("freqs_sin", torch.empty(grid_size * grid_size, head_dim))
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        cos, sin = rope_tables_2d(self.head_dim, self.grid_size)  # computed on CPU, in fp32
        self.freqs_cos.copy_(cos)
        self.freqs_sin.copy_(sin)

    def forward(self, x: Tensor) -> Tensor:
        # The rotation runs in fp32 (the tables are fp32) and is cast back for SDPA under autocast.
        x32 = x.float()
        return (x32 * self.freqs_cos + _rotate_pairs(x32) * self.freqs_sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, eps 1e-6, computed in fp32 and cast back (§5.2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    # LightningDiT without RMSNorm is DiT: LayerNorm without affine parameters.
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _qk_norm(head_dim: int, use_rmsnorm: bool) -> nn.Module:
    # The authors' qk-norm is RMSNorm with use_rmsnorm, else their Attention's default: an
    # affine LayerNorm (eps 1e-5).
    return RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """adaLN: x·(1 + scale) + shift, per sample, broadcast over tokens."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention: qkv with bias, qk-norm over head_dim before RoPE, SDPA."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool, use_rmsnorm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.q_norm = _qk_norm(self.head_dim, use_rmsnorm) if use_qknorm else nn.Identity()
        self.k_norm = _qk_norm(self.head_dim, use_rmsnorm) if use_qknorm else nn.Identity()
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, rope: AxialRoPE2d | None) -> Tensor:
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x)
            .reshape(B, N, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        q, k = self.q_norm(q), self.k_norm(k)  # (B, heads, N, head_dim)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    """SwiGLU with a fused input projection w12 (→ [gate | value]) and output w3 (§5.2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = Linear(dim, 2 * hidden, bias=True)
        self.w3 = Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class GeluMlp(nn.Module):
    """DiT's MLP (timm ``Mlp`` names fc1/fc2, tanh GELU) for ``use_swiglu=False``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """p×p patches → tokens via a strided conv (timm ``PatchEmbed`` names), row-major."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(
            in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected a {self.input_size}x{self.input_size} latent, got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] (fed as is, §4.1) → 256-d [cos | sin] code → Linear → SiLU → Linear."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, dim, bias=True),
            nn.SiLU(),
            Linear(dim, dim, bias=True),
        )

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class table with a null row (index ``num_classes``) for CFG and label dropout (§5.2).

    As the authors, the null row exists only when ``dropout_prob > 0``.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), dim)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is not None:
            if not self.has_null:
                raise ValueError("force_drop_ids needs a null class, but class_dropout_prob is 0")
            drop = force_drop_ids == 1
        elif train and self.has_null:
            # Global RNG on purpose: a seeded trainer reproduces the same drops.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return self.embedding_table(labels)
        return self.embedding_table(torch.where(drop, self.num_classes, labels))


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (6-way, or 4-way with ``wo_shift``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.wo_shift = cfg.wo_shift
        self.norm1 = _norm(D, cfg.use_rmsnorm)
        self.attn = Attention(D, cfg.num_heads, cfg.use_qknorm, cfg.use_rmsnorm)
        self.norm2 = _norm(D, cfg.use_rmsnorm)
        mlp_hidden = int(D * cfg.mlp_ratio)
        # SwiGLU keeps the FLOPs of a 4D GELU MLP with 2/3 of its width (§5.2).
        self.mlp = (
            SwiGLUFFN(D, int(2 / 3 * mlp_hidden)) if cfg.use_swiglu else GeluMlp(D, mlp_hidden)
        )
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), Linear(D, (4 if cfg.wo_shift else 6) * D, bias=True)
        )
        self.fused = False  # set by LightningDiT.use_kernels: the sfd.kernels path

    def forward(self, x: Tensor, c: Tensor, rope: AxialRoPE2d | None) -> Tensor:
        if self.fused:
            return fused.block_forward(self, x, c, rope)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
                c
            ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), rope
        )
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Norm → adaLN (always shift + scale, also with ``wo_shift``) → Linear to p²·C_out."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, use_rmsnorm: bool) -> None:
        super().__init__()
        self.norm_final = _norm(dim, use_rmsnorm)
        self.linear = Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim, bias=True))
        self.fused = False  # set by LightningDiT.use_kernels: the sfd.kernels path

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.fused:
            return fused.final_forward(self, x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model

TimeInput = Tensor | tuple[Tensor, Tensor]


class LightningDiT(nn.Module):
    """SFD LightningDiT. ``forward(x, t, y)`` predicts the velocity x1 − x0 (§4.1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.out_channels = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.patch_size = cfg.patch_size
        self.grad_checkpointing: bool = False  # per-block activation checkpointing (§12.3 bug 12)

        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, D)
        self.grid_size = self.x_embedder.grid_size
        if cfg.timestep_embedding == "dual":
            # Two half-width embedders, concatenated [sem, tex] (§4.4).
            self.t_embedder_sem = TimestepEmbedder(D // 2)
            self.t_embedder_tex = TimestepEmbedder(D // 2)
        else:
            self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed sin-cos table, filled by init_weights (a buffer: it never trains).
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, D))
        self.feat_rope = AxialRoPE2d(cfg.head_dim, self.grid_size) if cfg.use_rope else None

        self.blocks = nn.ModuleList([LightningDiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels, cfg.use_rmsnorm)

        self.repa_depth = cfg.repa_depth if cfg.use_repa else 0
        if cfg.use_repa:
            P = cfg.repa_projector_dim
            # REPA's build_mlp (§4.6): tokens of block `repa_depth` → DINOv2 feature width.
            self.repa_projector = nn.Sequential(
                Linear(D, P),
                nn.SiLU(),
                Linear(P, P),
                nn.SiLU(),
                Linear(P, cfg.repa_target_dim),
            )
        self.init_weights()

    # -- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """The whole init policy (docs/method.md §5.3, authors' ``initialize_weights``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):  # every Linear, REPA projector included
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_constant_buffers()
        # Patch conv initialised as the Linear it is on flattened patches.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in self._timestep_embedders():
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @torch.no_grad()
    def reset_constant_buffers(self) -> None:
        """Recompute the fixed tables (pos_embed, RoPE), e.g. after ``to_empty``."""
        self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.grid_size).unsqueeze(0))
        if self.feat_rope is not None:
            self.feat_rope.reset_tables()

    def use_kernels(self, fused_ops: bool) -> int:
        """Route blocks and final layer through the fused ops of ``sfd.kernels`` (or back).

        Same parameters, same maths; the ops run Triton on CUDA and their eager references
        elsewhere. Only RMSNorm layers have a fused path. Returns how many modules were switched.
        """
        switched = 0
        for module in (*self.blocks, self.final_layer):
            module.fused = bool(fused_ops) and fused.fusable(module)
            switched += module.fused
        return switched

    def _timestep_embedders(self) -> list[TimestepEmbedder]:
        if self.cfg.timestep_embedding == "dual":
            return [self.t_embedder_sem, self.t_embedder_tex]
        return [self.t_embedder]

    # -- forward ------------------------------------------------------------------------------

    def embed_time(self, t: TimeInput, batch: int) -> Tensor:
        """(B, D) time conditioning from ``t`` = (t_tex, t_sem) or one shared tensor."""
        t_tex, t_sem = t if isinstance(t, tuple) else (t, t)
        t_tex = t_tex.expand(batch) if t_tex.ndim == 0 else t_tex
        t_sem = t_sem.expand(batch) if t_sem.ndim == 0 else t_sem
        if self.cfg.timestep_embedding == "dual":
            return torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1)
        # Single layout (authors' Δt = 0 model): one clock, t_tex = t_sem there.
        return self.t_embedder(t_tex)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p²·C) tokens → (B, C, H, W)."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward(
        self,
        x: Tensor,
        t: TimeInput,
        y: Tensor,
        *,
        return_repa: bool = False,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity for latent ``x`` (B, C, H, W) at times ``t`` for labels ``y`` (B,).

        ``t`` is a (B,) tensor shared by both parts or the tuple (t_tex, t_sem), texture first
        (docs/architecture.md, Conventions). Label dropout happens only in training mode; ``force_drop_ids == 1``
        selects the null label in any mode. With ``return_repa`` also returns the REPA
        projection (B, N, repa_target_dim) of block ``repa_depth``'s output.
        """
        if return_repa and not self.cfg.use_repa:
            raise ValueError(
                "return_repa=True but this model has no REPA projector (use_repa=False)"
            )
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.embed_time(t, x.shape[0]) + self.y_embedder(
            y, self.training, force_drop_ids
        )  # (B, D)

        if self.blocks[0].fused and self.final_layer.fused:
            out, repa = self._blocks_fused(tokens, c, return_repa)
        else:
            out, repa = self._blocks(tokens, c, return_repa)
        velocity = self.unpatchify(out)  # (B, C_out, H, W)
        if self.cfg.learn_sigma:
            velocity = velocity[:, : self.in_channels]
        if return_repa:
            return velocity, repa
        return velocity

    def _blocks(self, tokens: Tensor, c: Tensor, return_repa: bool) -> tuple[Tensor, Tensor | None]:
        """Blocks and final layer: output tokens (B, N, p²·C_out) and the REPA projection (or None)."""
        repa = None
        for depth, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, self.feat_rope)
            if return_repa and depth == self.repa_depth:
                repa = self.repa_projector(tokens)
        return self.final_layer(tokens, c), repa

    def _blocks_fused(self, tokens: Tensor, c: Tensor, return_repa: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`_blocks` with each MLP residual added inside the next norm's fused pass
        (sfd/kernels/block.py): same maths, one pass over the stream fewer per block."""
        x, y, gate = tokens, None, None
        repa = None
        for depth, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                inp, x, y, gate = checkpoint(fused.block_deferred, block, x, y, gate, c, self.feat_rope, use_reentrant=False)
            else:
                inp, x, y, gate = fused.block_deferred(block, x, y, gate, c, self.feat_rope)
            if return_repa and depth == self.repa_depth + 1:  # block repa_depth's output, as written by this norm1
                repa = self.repa_projector(inp)
        out, inp = fused.final_deferred(self.final_layer, x, y, gate, c)
        if return_repa and self.repa_depth == len(self.blocks):
            repa = self.repa_projector(inp)
        return out, repa


# ---------------------------------------------------------------------------------------------
# Sizes, configs and weight files


def count_params(cfg: ModelConfig, include_repa: bool = False) -> int:
    """Parameter count as the paper's #Params (docs/method.md §5.1), built on the meta device.

    Counts trainable parameters plus ``pos_embed`` (a frozen Parameter in the authors' model,
    which the paper's numbers include), excluding the REPA projector unless ``include_repa``.
    """
    with torch.device("meta"):
        model = LightningDiT(cfg)
    total = model.pos_embed.numel()
    for name, p in model.named_parameters():
        if include_repa or not name.startswith("repa_projector."):
            total += p.numel()
    return total


def _check_timestep_layout(state_dict: Mapping[str, Tensor], cfg: ModelConfig, source: str) -> None:
    single = any(k.startswith("t_embedder.") for k in state_dict)
    dual = any(k.startswith(("t_embedder_sem.", "t_embedder_tex.")) for k in state_dict)
    found = "single" if single and not dual else "dual" if dual and not single else None
    if found is not None and found != cfg.timestep_embedding:
        hint = (
            "one full-width `t_embedder.*` (the authors' Δt = 0 / plain LightningDiT layout)"
            if found == "single"
            else "two half-width `t_embedder_sem.*` / `t_embedder_tex.*` (the SFD layout)"
        )
        raise WeightsError(
            f"{source} has {hint}, but the config asks for timestep_embedding="
            f"{cfg.timestep_embedding!r}; pass a config with timestep_embedding={found!r}"
        )


def build_lightningdit(ckpt: Checkpoint) -> LightningDiT:
    """A LightningDiT from what :func:`sfd.checkpoint.read_checkpoint` found, loaded strict, in eval
    mode (:func:`sfd.loading.load_model` reads and builds in one call)."""
    # Build without random init (instant for XL), then fill the constant tables and load.
    with torch.device("meta"):
        model = LightningDiT(ckpt.model_config)
    model = model.to_empty(device="cpu")
    model.reset_constant_buffers()
    load_weights(model, ckpt.state_dict, source=f"'{ckpt.path}'")
    return model.eval()


def load_weights(model: LightningDiT, state_dict: Mapping[str, Tensor], source: str = "state dict") -> None:
    """Load strict, naming every missing, unexpected and mis-shaped key (and the other timestep
    layout, if that is the cause); the RoPE tables are recomputed and may be absent."""
    _check_timestep_layout(state_dict, model.cfg, source)
    load_state_dict_strict(model, state_dict, optional=ROPE_BUFFERS, source=source)


def save_lightningdit(model: LightningDiT, path: str | os.PathLike[str]) -> None:
    """Export ``model``'s weights under the checkpoint contract (no run config)."""
    save_checkpoint(path, model.state_dict(), "lightningdit", model.cfg)


__all__ = [
    "LightningDiT",
    "count_params",
    "save_lightningdit",
    "build_lightningdit",
    "load_weights",
    "sincos_pos_embed_2d",
    "rope_tables_2d",
    "ROPE_BUFFERS",
]
