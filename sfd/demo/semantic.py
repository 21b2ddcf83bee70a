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

Objective (ours; DINOv2's self-distillation would need far more than a CPU minute): supervised,
on the images' shape labels and the renderer's coverage masks,

- cross-entropy of a linear head on the final-norm CLS token;
- cross-entropy of a linear head on the *mean of the final-norm patch tokens*, so every patch
  token (what SFD actually uses; CLS and registers are dropped) is pushed to carry the class;
- per-patch binary cross-entropy of a linear head predicting the shape's coverage of that patch,
  so the tokens also say *where* the object is, as DINOv2 patch features do (their PCA
  separates foreground from background).

Augmentation: flips and 90° turns (every class is invariant to them). The heads are discarded.
Quality is reported as a linear-probe accuracy of the mean patch token on held-out images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import save_safetensors
from sfd.models.dino import DinoEncoder, dino_config_from_original

# DINOv2's own constructor arguments (vision_transformer.vit_*), the metadata of the weight file.
# 24² images at patch 4 give the 6×6 token grid of the demo's 6×6 texture latents (standin-f4).
DEMO_VIT: dict[str, Any] = {
    "img_size": 24, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4,
    "init_values": 1.0, "block_chunks": 0, "num_register_tokens": 4,
    "interpolate_antialias": True, "interpolate_offset": 0.0,
}


def build_vit(original: dict[str, Any] | None = None, seed: int = 0) -> DinoEncoder:
    """A trainable DinoEncoder from DINOv2 constructor arguments (run at the trained resolution)."""
    original = dict(DEMO_VIT if original is None else original)
    torch.manual_seed(seed)
    return DinoEncoder(dino_config_from_original(original, img_size=int(original["img_size"])))


class _Heads(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls = nn.Linear(dim, num_classes)
        self.mean_patch = nn.Linear(dim, num_classes)
        self.cover = nn.Linear(dim, 1)


def _augment(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.rand((), generator=g) < 0.5:
        x, m = x.flip(3), m.flip(2)
    k = int(torch.randint(4, (), generator=g))
    return torch.rot90(x, k, (2, 3)), torch.rot90(m, k, (1, 2))


def _to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → [-1, 1] (N, 3, H, W), the encode job's input convention."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_semantic_vit(
    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, *, steps: int = 300, batch_size: int = 64,
    lr: float = 2e-3, seed: int = 0, log_every: int = 100, original: dict[str, Any] | None = None,
) -> DinoEncoder:
    """Train the ViT on (images, labels, coverage masks); returns it in eval mode, heads dropped."""
    vit = build_vit(original, seed)
    cfg = vit.cfg
    grid = cfg.img_size // cfg.patch_size
    heads = _Heads(cfg.embed_dim, int(labels.max()) + 1)
    x_all, y_all = _to_model_input(images), torch.as_tensor(labels)
    m_all = torch.as_tensor(masks, dtype=torch.float32)
    params = [*vit.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    vit.train()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x, m = _augment(x_all[idx], m_all[idx], g)
        feats = vit._features(vit.preprocess(x))
        patches = feats["x_norm_patchtokens"]  # (B, grid², D)
        cover = F.adaptive_avg_pool2d(m[:, None], grid).flatten(1)  # (B, grid²) fraction covered
        y = y_all[idx]
        loss_cls = F.cross_entropy(heads.cls(feats["x_norm_clstoken"]), y)
        loss_mean = F.cross_entropy(heads.mean_patch(patches.mean(1)), y)
        loss_cover = F.binary_cross_entropy_with_logits(heads.cover(patches).squeeze(-1), cover)
        # Class of each patch the shape covers (weighted by coverage): the part-level semantics.
        per_patch = F.cross_entropy(heads.mean_patch(patches).flatten(0, 1), y.repeat_interleave(grid * grid), reduction="none")
        loss_part = (per_patch * cover.flatten()).sum() / cover.sum().clamp_min(1e-6)
        loss = loss_cls + loss_mean + loss_cover + loss_part
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"semantic ViT step {step + 1}/{steps}: loss {loss.item():.4f} "
                  f"(cls {loss_cls.item():.3f}, mean-patch {loss_mean.item():.3f}, coverage {loss_cover.item():.3f}, "
                  f"covered-patch class {loss_part.item():.3f})", flush=True)
    return vit.eval().requires_grad_(False)


def to_dinov2_state_dict(vit: DinoEncoder) -> dict[str, torch.Tensor]:
    """timm names → Meta's original DINOv2 names: the inverse of timm's ``_convert_dinov2``.

    timm keeps the CLS position folded into ``cls_token`` and position embeddings for patches
    only; DINOv2 stores a CLS slot in ``pos_embed``. Writing the folded token with a zero CLS
    slot round-trips exactly (conversion adds them back). ``mask_token`` is unused at
    inference; DINOv2 files carry one, so we write zeros.
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
    out["mask_token"] = torch.zeros(1, vit.cfg.embed_dim)
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
