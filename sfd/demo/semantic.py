"""The demo's semantic encoder: a small DINOv2-architecture ViT trained on the demo images.

SFD's semantic latent is a compression of DINOv2 patch tokens (docs/method.md §2.2, §3.1). With
a random-init ViT in that place the "semantic" channels carry no learned semantics, so a CPU
demo could not exercise the idea at all. Here the demo trains the same architecture (timm
``VisionTransformer`` with 4 register tokens and LayerScale, as sfd/models/dino.py builds it) on
its own training images and writes it in **Meta's original DINOv2 layout** (``cls_token``,
``pos_embed`` with the CLS slot, ``register_tokens``, ``mask_token``, ``blocks.i.ls1.gamma``, ...)
as a safetensors file whose metadata carries DINOv2's constructor arguments. The encode job
loads it through the same ``--dino`` path and the same timm conversion as the released
``dinov2_vitb14_reg4_pretrain.pth`` (sfd.encoding.dino_spec reads the config from the file).

Objective: self-supervised, no labels and no masks (the trainer takes pixels only). The default is
SimCLR (``objective="simclr"``, ``SSLConfig``): two augmented views of each image go through the
one network, and each view's projected CLS token and projected mean patch token (ours: SFD uses
the patch tokens) must pick its partner among the batch's other 2B − 1 views (NT-Xent). Two
alternatives are kept for comparison and measured worse on the ``val`` split in the same CPU
time (docs/decisions.md, "The CPU demo"):

- ``"dino"``: DINOv2's recipe at toy scale — DINO self-distillation (student and EMA teacher, a
  projection head to a softmax over K normalised prototypes, Sinkhorn-Knopp-centred teacher, 2
  global + local crops; CLS and mean patch token), iBOT's masked-patch term and KoLeo;
- ``"contrastive"``: MoCo v3-style InfoNCE against an EMA key encoder (+ a dense patch term).

Augmentation: random resized crops, any rotation, mirror flips, colour jitter and a hue rotation
by any angle, grey at random, and pixel-only fill erasers (Gaussian blur; solarisation and a
brightness-threshold silhouette as options); the classes are invariant to all of them, so only
the outline is shared between views. The returned network is the trained one (SimCLR) or the EMA
teacher (DINO, MoCo); heads are discarded. Quality is a linear probe of the mean patch token on
held-out images (the probe is where labels enter).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import save_safetensors
from sfd.demo.shapes import IMAGE_SIZE, VIT_PATCH
from sfd.models.dino import DinoEncoder, dino_config_from_original

# DINOv2's own constructor arguments (vision_transformer.vit_*), the metadata of the weight file.
# The demo's images at its patch size give the token grid of its texture latents (sfd/demo/shapes.py:
# 24² at patch 4 = 6×6, the f4 autoencoder's grid).
DEMO_VIT: dict[str, Any] = {
    "img_size": IMAGE_SIZE, "patch_size": VIT_PATCH, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4,
    "init_values": 1.0, "block_chunks": 0, "num_register_tokens": 4,
    "interpolate_antialias": True, "interpolate_offset": 0.0,
}


def build_vit(original: dict[str, Any] | None = None, seed: int = 0) -> DinoEncoder:
    """A trainable DinoEncoder from DINOv2 constructor arguments (run at the trained resolution)."""
    original = dict(DEMO_VIT if original is None else original)
    torch.manual_seed(seed)
    return DinoEncoder(dino_config_from_original(original, img_size=int(original["img_size"])))


@dataclass(frozen=True)
class SSLConfig:
    """Label-free training settings, sized for ≤ ~150 CPU-seconds on one core.

    Chosen on the ``val`` split (docs/decisions.md, "The CPU demo"): SimCLR beat DINO + iBOT and
    MoCo v3 there by 15 points at equal CPU time; the DINO fields are kept for that comparison.
    The paper values they depart from are noted where they do.
    """

    # "simclr": NT-Xent between two views (SimCLR); "dino": DINO + iBOT (DINOv2's recipe);
    # "contrastive": MoCo v3-style InfoNCE against an EMA key encoder.
    objective: str = "simclr"
    steps: int = 300
    batch_size: int = 64  # SimCLR: 2B − 2 negatives per view; 64 fits the budget at 300 steps
    lr: float = 3e-3  # peak AdamW lr (one-cycle); 1.5e-3 and 6e-3 were worse on val
    weight_decay: float = 0.04
    global_scale: tuple[float, float] = (0.55, 1.0)  # area fraction; DINO's (0.32, 1) cuts a 24² shape in half
    local_crops: int = 0  # DINO: 6–10; each costs a quarter of a global view here; SimCLR runs without
    local_size: int = 12  # a 3×3 token grid at patch 4
    local_scale: tuple[float, float] = (0.15, 0.5)
    prototypes: int = 128  # K of the softmax (DINO: 65536, for ImageNet's variety)
    head_hidden: int = 256
    head_bottleneck: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    centering: str = "sinkhorn"  # DINOv2's Sinkhorn-Knopp, or "ema": DINO's running-mean centre
    center_momentum: float = 0.9  # for "ema"
    koleo_weight: float = 0.1  # DINOv2's KoLeo spreading of the CLS features within a batch
    ema_start: float = 0.95  # teacher momentum, cosine to 1 (DINO: 0.996 over 100+ epochs)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: fraction of a global view's patches masked
    mask_prob: float = 0.5  # share of global views that are masked at all (iBOT's 0.5)
    ibot_weight: float = 1.0
    pooled_weight: float = 1.0  # the loss on the mean patch token too (ours: SFD uses the patch tokens)
    contrast_temp: float = 0.2  # InfoNCE/NT-Xent temperature (MoCo v3's 0.2; 0.1 was worse on val)
    # Pixel-only views that erase the fill (stripes, checkers) and keep the outline, per view:
    # (global view 1, global view 2, local crops). Blur as in SimCLR/BYOL (σ in pixels at 24²);
    # solarisation as DINO's second view; "silhouette" thresholds brightness (_silhouette).
    blur: tuple[float, float, float] = (0.5, 0.5, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: tuple[float, float, float] = (0.0, 0.0, 0.0)
    silhouette: tuple[float, float, float] = (0.0, 0.0, 0.0)  # measured worse on val (31.6 % vs 39.2 %)


class _Head(nn.Module):
    """DINO's projection head: MLP → L2-normalised bottleneck → cosine to K prototypes.

    The prototypes are normalised (DINO's weight-normalised last layer with the norm frozen at 1),
    so logits are cosines divided by the temperature.
    """

    def __init__(self, dim: int, cfg: SSLConfig) -> None:
        super().__init__()
        h = cfg.head_hidden
        self.mlp = nn.Sequential(nn.Linear(dim, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, cfg.head_bottleneck))
        self.prototypes = nn.Parameter(torch.randn(cfg.prototypes, cfg.head_bottleneck) * 0.02)
        # MoCo v3's predictor (student only, "contrastive"): breaks the student/teacher symmetry.
        self.predictor = nn.Sequential(nn.Linear(cfg.head_bottleneck, h), nn.GELU(), nn.Linear(h, cfg.head_bottleneck))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.embed(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


def _tokens(vit: DinoEncoder, x_normed: torch.Tensor, mask: torch.Tensor | None = None,
            mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``forward_features`` at any multiple of the patch size, with iBOT's patch masking.

    The timm model is built for one size (the position grid is resampled at load, not per call),
    but local crops are smaller: their position embeddings are resampled here (bicubic,
    antialiased, as DINOv2 does per forward). Masked patches have their embedding replaced by the
    learned ``mask_token`` before the position embedding is added, as in DINOv2.
    Output: final-norm tokens (B, 1 + R + N, D), CLS first, then registers, then patches.
    """
    v = vit.vit
    x = v.patch_embed.proj(x_normed)  # (B, D, g, g): the PatchEmbed conv without its size check
    g = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    if mask is not None:
        x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
    pos = v.pos_embed
    g0 = vit.grid_size
    if g != g0:
        pos = F.interpolate(pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2), size=(g, g), mode="bicubic",
                            align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(1, g * g, -1)
    x = torch.cat([v.cls_token.expand(len(x), -1, -1), v.reg_token.expand(len(x), -1, -1), x + pos], dim=1)
    return v.norm(v.blocks(v.norm_pre(x)))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (separable, reflect-padded); ``sigma`` in pixels, one per image (0: none)."""
    m, c, h, w = x.shape
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (m·c, 2r+1)
    y = F.pad(x.reshape(1, m * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=m * c)
    y = F.conv2d(y, k[:, None, None, :], groups=m * c)
    return y.reshape(m, c, h, w)


def _silhouette(x: torch.Tensor) -> torch.Tensor:
    """Pixels → a two-level image: brightest channel above the midpoint of its 10th and 90th percentiles.

    A pixel operation only (no renderer internals): the demo's fills are all brighter than its dark
    ground, so this keeps the outline and erases the fill (stripes, checkers, gradient, hue)."""
    v = x.amax(1).flatten(1)  # (m, H·W), in [0, 1]
    lo, hi = torch.quantile(v, 0.1, dim=1), torch.quantile(v, 0.9, dim=1)
    on = (x.amax(1, keepdim=True) > ((lo + hi) / 2)[:, None, None, None]).to(x.dtype)
    return on.expand_as(x)


def _views(x: torch.Tensor, n: int, size: int, scale: tuple[float, float], g: torch.Generator, *,
           blur_p: float = 0.0, sigma: tuple[float, float] = (0.1, 2.0), solarize_p: float = 0.0,
           silhouette_p: float = 0.0) -> torch.Tensor:
    """``n`` augmented views per image of a [-1, 1] batch, stacked view-major: (n·B, 3, size, size).

    Geometry (one affine resampling per view): random resized crop (area fraction in ``scale``,
    aspect 3/4–4/3), a rotation by any angle and a mirror flip with p = 0.5. Colour: with p = 0.8
    brightness, contrast and saturation jitter and a hue rotation by any angle; grey with
    p = 0.2. Every class is invariant to all of these; colour, fill, position and size are not
    class information, so the views agree only on the outline.
    """
    b = len(x)
    x = x.repeat(n, 1, 1, 1)
    m = n * b

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(m, generator=g) * (hi - lo) + lo

    area = u(*scale)
    aspect = torch.exp(u(math.log(3 / 4), math.log(4 / 3)))
    half_w = (area * aspect).sqrt().clamp(max=1.0)  # half-extents in normalised [-1, 1] coordinates
    half_h = (area / aspect).sqrt().clamp(max=1.0)
    cx, cy = u(-1, 1) * (1 - half_w), u(-1, 1) * (1 - half_h)
    angle = u(0, 2 * math.pi)
    flip = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * half_w * flip, -sin * half_h, cx], 1),
                         torch.stack([sin * half_w * flip, cos * half_h, cy], 1)], 1)
    grid = F.affine_grid(theta, [m, 3, size, size], align_corners=False)
    # Border padding: a turned crop's corners repeat the dark ground instead of a grey wedge.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    x = (x + 1) / 2
    if silhouette_p:
        x = torch.where((torch.rand(m, generator=g) < silhouette_p)[:, None, None, None], _silhouette(x), x)
    jitter = (torch.rand(m, generator=g) < 0.8)[:, None, None, None]
    y = x * u(0.6, 1.4)[:, None, None, None]
    y = (y - y.mean((1, 2, 3), keepdim=True)) * u(0.6, 1.4)[:, None, None, None] + y.mean((1, 2, 3), keepdim=True)
    grey_y = y.mean(1, keepdim=True)
    y = grey_y + (y - grey_y) * u(0.0, 1.5)[:, None, None, None]
    # Hue: a rotation of RGB about the grey axis (Rodrigues), by any angle.
    a = u(-math.pi, math.pi)
    k = torch.full((3,), 1 / math.sqrt(3))
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = (torch.eye(3) + torch.sin(a)[:, None, None] * kx + (1 - torch.cos(a))[:, None, None] * (kx @ kx))
    y = torch.einsum("mij,mjhw->mihw", rot, y)
    x = torch.where(jitter, y, x)
    to_grey = (torch.rand(m, generator=g) < 0.2)[:, None, None, None]
    x = torch.where(to_grey, x.mean(1, keepdim=True).expand_as(x), x)
    if blur_p:
        s_ = u(*sigma) * (torch.rand(m, generator=g) < blur_p)
        x = _blur(x, s_)
    if solarize_p:
        x = torch.where((torch.rand(m, generator=g) < solarize_p)[:, None, None, None], torch.where(x < 0.5, x, 1 - x), x)
    return x.clamp(0, 1) * 2 - 1


def _to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → [-1, 1] (N, 3, H, W), the encode job's input convention."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _sinkhorn(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Teacher targets with equal mass per prototype over the batch (DINOv2's Sinkhorn-Knopp centering).

    Rows are samples (M, K). Alternately normalising prototypes and samples makes the batch use
    every prototype equally, which rules out the collapse to one prototype that a short run
    with a running-mean centre fell into (measured: batch-mean teacher entropy 0.2 nats of 5.5).
    """
    q = torch.exp((logits - logits.max()) / temp).t()  # (K, M)
    q = q / q.sum()
    k, m = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / m
    return (q * m).t()


def _koleo(x: torch.Tensor) -> torch.Tensor:
    """KoLeo (DINOv2): −mean log distance of each L2-normalised feature to its nearest neighbour."""
    x = F.normalize(x, dim=-1)
    d = torch.cdist(x, x)
    d = d + torch.eye(len(x)) * 1e3  # not one's own neighbour
    return -torch.log(d.min(1).values + 1e-8).mean()


def _info_nce(q: torch.Tensor, k: torch.Tensor, temp: float) -> torch.Tensor:
    """Row i of ``q`` must pick row i of ``k`` among all rows of ``k`` (unit vectors)."""
    return F.cross_entropy(q @ k.t() / temp, torch.arange(len(q)))


def _nt_xent(z: torch.Tensor, temp: float) -> torch.Tensor:
    """SimCLR's loss on 2B unit vectors (view-major): row i's positive is row i ± B, negatives all other rows."""
    n = len(z) // 2
    logits = z @ z.t() / temp
    logits = logits - torch.eye(len(z)) * 1e4  # not oneself
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def _cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum(-1)


def train_semantic_vit(
    images: np.ndarray, *, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
    seed: int = 0, log_every: int = 100, original: dict[str, Any] | None = None, ssl: SSLConfig | None = None,
) -> DinoEncoder:
    """Self-distillation (DINO + iBOT) on unlabelled ``images`` (uint8 N×H×W×3); the teacher, in eval mode.

    No labels and no masks: the function sees pixels only. ``steps``/``batch_size``/``lr``
    override the ``ssl`` settings. Returns the EMA teacher (DINO's evaluated network), heads
    dropped; its learned ``mask_token`` rides along as ``vit.ssl_mask_token`` for the file.
    """
    cfg = ssl or SSLConfig()
    cfg = replace(cfg, **{k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)) if v is not None})
    student = build_vit(original, seed)
    vcfg = student.cfg
    if cfg.local_size % vcfg.patch_size:
        raise ValueError(f"local_size {cfg.local_size} is not a multiple of the patch size {vcfg.patch_size}")
    torch.manual_seed(seed)
    head = _Head(vcfg.embed_dim, cfg)
    mask_token = nn.Parameter(torch.zeros(1, vcfg.embed_dim))
    teacher, teacher_head = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
    if cfg.objective not in ("dino", "contrastive", "simclr"):
        raise ValueError(f"objective must be 'dino', 'contrastive' or 'simclr', got {cfg.objective!r}")
    if cfg.centering not in ("sinkhorn", "ema"):
        raise ValueError(f"centering must be 'sinkhorn' or 'ema', got {cfg.centering!r}")
    centers = {k: torch.zeros(cfg.prototypes) for k in ("cls", "pool", "patch")}

    def targets(name: str, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        if cfg.centering == "sinkhorn":
            return _sinkhorn(flat, cfg.teacher_temp).reshape(logits.shape)
        centers[name].mul_(cfg.center_momentum).add_(flat.mean(0), alpha=1 - cfg.center_momentum)
        return F.softmax((logits - centers[name]) / cfg.teacher_temp, -1)

    x_all = _to_model_input(images)
    size, grid = vcfg.img_size, student.grid_size
    if tuple(x_all.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(x_all.shape[-2:])}, the ViT expects {size}²")
    params = [*student.parameters(), *head.parameters(), mask_token]
    decay = [p for p in params if p.ndim >= 2 and p is not mask_token]
    no_decay = [p for p in params if p.ndim < 2 or p is mask_token]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    student.train()
    b = cfg.batch_size
    for step in range(cfg.steps):
        idx = torch.randint(len(x_all), (b,), generator=g)
        x = x_all[idx]
        def aug(i: int) -> dict[str, Any]:
            return {"blur_p": cfg.blur[i], "sigma": cfg.blur_sigma, "solarize_p": cfg.solarize[i], "silhouette_p": cfg.silhouette[i]}

        glob = student.preprocess(torch.cat([_views(x, 1, size, cfg.global_scale, g, **aug(i)) for i in range(2)]))  # (2B, 3, S, S)
        loc = student.preprocess(_views(x, cfg.local_crops, cfg.local_size, cfg.local_scale, g, **aug(2))) if cfg.local_crops else None
        # iBOT masks: half the global views get a random share of their patches masked.
        ratio = torch.rand(2 * b, generator=g) * (cfg.mask_ratio[1] - cfg.mask_ratio[0]) + cfg.mask_ratio[0]
        ratio = ratio * (torch.rand(2 * b, generator=g) < cfg.mask_prob)
        mask = torch.rand(2 * b, grid * grid, generator=g) < ratio[:, None]
        npre = student.num_prefix_tokens
        if cfg.objective == "simclr":
            # SimCLR's NT-Xent: one network, both global views, each view must pick its partner
            # among the other 2B − 1 views (CLS and mean patch token). No teacher pass, so a step
            # costs one student forward/backward.
            tok = _tokens(student, glob)
            s_views = [tok]
            if loc is not None:
                s_views.append(_tokens(student, loc))
            dino = _nt_xent(head.embed(tok[:, 0]), cfg.contrast_temp)
            pooled = _nt_xent(head.embed(tok[:, npre:].mean(1)), cfg.contrast_temp)
            if loc is not None:  # locals: each must pick its image's first global view (multi-crop)
                z_g = head.embed(tok[:b, npre:].mean(1))
                z_l = head.embed(s_views[1][:, npre:].mean(1)).chunk(cfg.local_crops)
                pooled = pooled + sum(_info_nce(zl, z_g, cfg.contrast_temp) for zl in z_l) / cfg.local_crops
            ibot = torch.zeros(())
            koleo = torch.zeros(())
            loss = dino + cfg.pooled_weight * pooled
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"semantic ViT step {step + 1}/{cfg.steps}: loss {loss.item():.4f} (CLS {dino.item():.3f}, pooled {pooled.item():.3f})", flush=True)
            continue
        with torch.no_grad():
            t_tok = _tokens(teacher, glob)
        s_views = [_tokens(student, glob, mask, mask_token)]
        if loc is not None:
            s_views.append(_tokens(student, loc))
        s_tok = s_views[0]
        nv = 2 + cfg.local_crops
        m = mask.float()
        has = m.sum(1) > 0
        if cfg.objective == "dino":
            with torch.no_grad():
                t_cls = teacher_head(t_tok[:, 0])  # (2B, K) logits
                t_patch = teacher_head(t_tok[:, npre:])  # (2B, N, K)
                t_pool = teacher_head(t_tok[:, npre:].mean(1))
                t_cls_p = targets("cls", t_cls).chunk(2)
                t_pool_p = targets("pool", t_pool).chunk(2)
                t_patch_p = targets("patch", t_patch)
            s_cls = torch.cat([head(t[:, 0]) for t in s_views]).div(cfg.student_temp).chunk(nv)
            s_pool = torch.cat([head(t[:, npre:].mean(1)) for t in s_views]).div(cfg.student_temp).chunk(nv)
            # DINO: each teacher global view teaches every *other* student view (CLS, and the pooled patches).
            pairs = [(iq, v) for iq in range(2) for v in range(nv) if v != iq]
            dino = sum(_cross_entropy(t_cls_p[iq], s_cls[v]).mean() for iq, v in pairs) / len(pairs)
            pooled = sum(_cross_entropy(t_pool_p[iq], s_pool[v]).mean() for iq, v in pairs) / len(pairs)
            # iBOT: the student's masked patches predict the teacher's distribution at those patches.
            per_patch = _cross_entropy(t_patch_p, head(s_tok[:, npre:]) / cfg.student_temp)  # (2B, N)
            ibot = ((per_patch * m).sum(1)[has] / m.sum(1)[has]).mean() if has.any() else per_patch.sum() * 0
        else:
            with torch.no_grad():
                k_cls = teacher_head.embed(t_tok[:, 0]).chunk(2)
                k_pool = teacher_head.embed(t_tok[:, npre:].mean(1)).chunk(2)
                k_patch = teacher_head.embed(t_tok[:, npre:])  # (2B, N, d)
            q_cls = torch.cat([head.predict(t[:, 0]) for t in s_views]).chunk(nv)
            q_pool = torch.cat([head.predict(t[:, npre:].mean(1)) for t in s_views]).chunk(nv)
            pairs = [(iq, v) for iq in range(2) for v in range(nv) if v != iq]
            dino = sum(_info_nce(q_cls[v], k_cls[iq], cfg.contrast_temp) for iq, v in pairs) / len(pairs)
            pooled = sum(_info_nce(q_pool[v], k_pool[iq], cfg.contrast_temp) for iq, v in pairs) / len(pairs)
            # Masked patches pick the teacher's token at the same place of the same view among
            # every token of the batch (a dense InfoNCE in iBOT's place).
            sel = mask.flatten()
            if sel.any():
                q = head.predict(s_tok[:, npre:]).flatten(0, 1)[sel]
                keys = k_patch.flatten(0, 1)
                logits = q @ keys.t() / cfg.contrast_temp
                ibot = F.cross_entropy(logits, torch.nonzero(sel).squeeze(1))
            else:
                ibot = s_tok.sum() * 0
        koleo = sum(_koleo(t) for t in s_tok[:, 0].chunk(2)) / 2 if cfg.koleo_weight else torch.zeros(())
        loss = dino + cfg.pooled_weight * pooled + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)  # DINO's clip
        opt.step()
        sched.step()
        with torch.no_grad():
            mom = 1 - (1 - cfg.ema_start) * (math.cos(math.pi * step / max(cfg.steps - 1, 1)) + 1) / 2
            for pt, ps in zip([*teacher.parameters(), *teacher_head.parameters()], [*student.parameters(), *head.parameters()]):
                pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)
        if log_every and (step + 1) % log_every == 0:
            # Collapse shows as few prototypes winning the teacher's raw logits across the batch
            # (Sinkhorn targets are balanced by construction, so their entropy would not tell).
            in_use = len(torch.unique(t_cls.argmax(-1))) if cfg.objective == "dino" else -1
            print(f"semantic ViT step {step + 1}/{cfg.steps}: loss {loss.item():.4f} (DINO {dino.item():.3f}, "
                  f"pooled {pooled.item():.3f}, iBOT {ibot.item():.3f}, KoLeo {koleo.item():.3f}); "
                  f"{in_use} prototypes win for {len(t_tok)} teacher views", flush=True)
    if cfg.objective == "simclr":
        teacher = student  # SimCLR has no teacher: the trained network is the one returned
    teacher.ssl_mask_token = mask_token.detach().clone()
    return teacher.eval().requires_grad_(False)


def to_dinov2_state_dict(vit: DinoEncoder) -> dict[str, torch.Tensor]:
    """timm names → Meta's original DINOv2 names: the inverse of timm's ``_convert_dinov2``.

    timm keeps the CLS position folded into ``cls_token`` and position embeddings for patches
    only; DINOv2 stores a CLS slot in ``pos_embed``. Writing the folded token with a zero CLS
    slot round-trips exactly (conversion adds them back). ``mask_token`` is unused at
    inference (the loader drops it); DINOv2 files carry their trained one, and so does ours.
    """
    sd = {k: v.detach().clone().contiguous() for k, v in vit.vit.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v
        elif k == "pos_embed":
            out["pos_embed"] = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        else:
            out[k] = v
    # The learned one when self-distillation trained it (DINOv2 files carry theirs), else zeros.
    mask_token = getattr(vit, "ssl_mask_token", None)
    out["mask_token"] = (mask_token if mask_token is not None else torch.zeros(1, vit.cfg.embed_dim)).detach().clone().contiguous()
    return out


def save_semantic_vit(
    vit: DinoEncoder, path: str | os.PathLike[str], original: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write the DINOv2-layout safetensors; metadata: ``config`` (DINOv2 constructor args),
    ``input_size`` (the resolution the encode job runs it at) and a training ``record``."""
    original = dict(DEMO_VIT if original is None else original)
    meta = {"config": json.dumps(original), "input_size": str(vit.cfg.img_size), "record": json.dumps(record or {})}
    save_safetensors(to_dinov2_state_dict(vit), Path(path), meta)
    return Path(path)


@torch.no_grad()
def mean_patch_features(vit: DinoEncoder, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Mean final-norm patch token per image (what the semantic cache is made of, pooled)."""
    vit.eval()
    out = [vit(_to_model_input(images[i : i + batch_size])).mean(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def linear_probe(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, *,
    steps: int = 300, weight_decay: float = 1e-4,
) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    ytr = torch.as_tensor(train_y)
    k = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(0)
    lin = nn.Linear(xtr.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1).numpy() == np.asarray(test_y)).mean())


__all__ = [
    "DEMO_VIT", "build_vit", "train_semantic_vit", "to_dinov2_state_dict", "save_semantic_vit",
    "mean_patch_features", "linear_probe",
]
