"""Smallest end-to-end run: random tiny models -> three-phase sampler -> texture decoder -> PNG.

No weights, no data: it checks that the pieces fit together on this machine and prints what ran.
The images are noise (the models are untrained); `just demo` trains a real tiny model.

Example:
    python bench/smoke.py --out runs/smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfd.config import TEXTURE_VAE_PRESETS, model_preset
from sfd.diffusion import AsyncClock
from sfd.guidance import classifier_free_guidance, model_velocity
from sfd.models.autoencoder import AutoencoderKL, to_uint8
from sfd.models.lightningdit import LightningDiT
from sfd.samplers import initial_noise, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smoke", help="output folder")
    ap.add_argument("--num", type=int, default=8, help="number of samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    vae_cfg = TEXTURE_VAE_PRESETS["tiny"]  # 32x32 images -> 8 x 8 x 8 latents
    sem_chans = 4
    cfg = model_preset(
        "tiny", f"in_channels={vae_cfg.embed_dim + sem_chans}", f"semantic_chans={sem_chans}",
        f"input_size={vae_cfg.resolution // vae_cfg.downsample_factor}",
    )
    model, vae = LightningDiT(cfg).eval(), AutoencoderKL(vae_cfg).eval()
    # adaLN-Zero makes a fresh model output exactly zero: perturb so the sampler has work to do.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))

    clock = AsyncClock(delta_t=cfg.semfirst_delta_t, semantic_chans=sem_chans)
    fn = classifier_free_guidance(
        model_velocity(model), 1.5, null_class=cfg.num_classes, semantic_chans=sem_chans
    )
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = initial_noise(range(args.num), shape, seed=args.seed)
    y = torch.arange(args.num) % cfg.num_classes
    t0 = time.perf_counter()
    with torch.no_grad():
        result = sample(fn, x0, y, clock, method="dopri5", atol=1e-4, rtol=1e-3)
        images = to_uint8(vae.decode(result.x[:, : cfg.texture_chans]))
    seconds = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate(list(images.numpy()), axis=1)  # one row of 32x32 tiles
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(out / "grid.png")
    summary = {
        "samples": args.num, "sampler": "dopri5", "nfe": result.nfe, "seconds": round(seconds, 3),
        "grid": str(out / "grid.png"), "note": "random untrained models: the images are noise",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
