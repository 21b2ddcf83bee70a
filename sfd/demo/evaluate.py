"""Judge a series of checkpoints in one process: sample class-balanced images, score them.

``eval/fid.py gen`` writes PNGs and starts a fresh process per checkpoint, which on a CPU costs
more than sampling the demo's small model (import and first-use compilation ≈ 10 CPU-s). The
study evaluates dozens of checkpoints, so it samples here, in memory, through the *same* public
functions as ``eval/fid.py gen`` and ``sample/grid.py`` (the flags of ``sfd.cli``,
``sfd.loading.load_pipeline``, ``sfd.samplers.generate_latents``, ``sfd.pixels.latents_to_images``,
and the class-balanced labels of the 50K protocol): same checkpoint resolution, same per-index
seeds, same decoder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd.demo.judge import Judge, judge_report


def _pipeline_args(ckpt: str | Path, stats: str | Path, flags: Sequence[str]) -> argparse.Namespace:
    from sfd.cli import add_model_args, add_sampling_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_sampling_args(p)
    return p.parse_args(["--ckpt", str(ckpt), "--stats", str(stats), *flags])


@torch.no_grad()
def sample_images(
    ckpt: str | Path, stats: str | Path, num_samples: int, num_classes: int, flags: Sequence[str] = (),
    batch_size: int = 120,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and labels: sample i has label ⌊i/(N/K)⌋ and noise seed (seed, i),
    exactly as ``eval/fid.py gen`` with the same ``flags`` (e.g. ``--sampler heun --steps 16``)."""
    from sfd.cli import pipeline_kwargs, sampling_config_from_args
    from sfd.loading import load_pipeline
    from sfd.pixels import latents_to_images
    from sfd.samplers import generate_latents

    args = _pipeline_args(ckpt, stats, flags)
    device = torch.device("cpu")
    model, _, guide, tex_stats, decoder = load_pipeline(args.ckpt, device=device, **pipeline_kwargs(args))
    model.eval()
    sampling = sampling_config_from_args(args)
    # Sample i has label ⌊i/(N/K)⌋: the class-balanced order of eval/fid.py's 50K protocol.
    labels = np.arange(num_samples) // (num_samples // num_classes)
    images = []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        latents, _ = generate_latents(model, labels[idx], idx, sampling, guide)
        images.append(latents_to_images(latents, tex_stats, decoder, model.cfg.texture_chans).numpy())
    return np.concatenate(images), labels


def judge_checkpoint(
    judge: Judge, ref_features: np.ndarray, ckpt: str | Path, stats: str | Path, num_samples: int,
    num_classes: int, flags: Sequence[str] = (),
) -> dict[str, Any]:
    images, labels = sample_images(ckpt, stats, num_samples, num_classes, flags)
    return judge_report(judge, images, labels, ref_features)


__all__ = ["sample_images", "judge_checkpoint"]
