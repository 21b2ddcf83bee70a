"""Judge a series of checkpoints in one process: sample class-balanced images, score them.

``eval/fid.py gen`` writes PNGs and starts a fresh process per checkpoint, which on a CPU costs
more than sampling the demo's small model (import and first-use compilation ≈ 10 CPU-s). The
study evaluates dozens of checkpoints, so it samples here, in memory, through the *same* public
functions as ``eval/fid.py gen`` and ``sample/grid.py`` (their flags and keys, ``sfd.cli``,
``sfd.loading.load_pipeline``, ``sfd.samplers.generate_latents``, ``sfd.pixels.latents_to_images``,
and the class-balanced labels of the 50K protocol): same checkpoint resolution, same per-index
seeds, same decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd.demo.judge import Judge, judge_report


def _pipeline_config(ckpt: str | Path, stats: str | Path, flags: Sequence[str]) -> Any:
    """The :class:`sfd.config.GenConfig` that ``eval/fid.py gen`` resolves from the same flags."""
    from sfd.cli import SOURCE_ARGS, SOURCE_DEPRECATED, config_parser, parse_config
    from sfd.config import GEN_PRESETS, GenConfig

    p = config_parser(GenConfig, prog="sampling flags", presets=GEN_PRESETS, default_preset="authors",
                      args=SOURCE_ARGS, deprecated=SOURCE_DEPRECATED)
    return parse_config(p, ["--ckpt", str(ckpt), "--stats", str(stats), *flags])[0]


@torch.no_grad()
def sample_images(
    ckpt: str | Path, stats: str | Path, num_samples: int, num_classes: int, flags: Sequence[str] = (),
    batch_size: int = 120, record: dict[str, list] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and labels: sample i has label ⌊i/(N/K)⌋ and noise seed (seed, i),
    exactly as ``eval/fid.py gen`` with the same ``flags`` (e.g. ``-o method=heun -o num_steps=16``).
    ``record``, if given, gets each batch's NFE (``"nfe"``) and latents (``"latents"``) appended."""
    from sfd.cli import source_kwargs
    from sfd.loading import load_pipeline
    from sfd.pixels import latents_to_images
    from sfd.samplers import generate_latents

    cfg = _pipeline_config(ckpt, stats, flags)
    device = torch.device("cpu")
    model, _, guide, tex_stats, decoder = load_pipeline(cfg.ckpt, device=device, **source_kwargs(cfg))
    model.eval()
    sampling = cfg.sampling
    # Sample i has label ⌊i/(N/K)⌋: the class-balanced order of eval/fid.py's 50K protocol.
    labels = np.arange(num_samples) // (num_samples // num_classes)
    images = []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        latents, nfe = generate_latents(model, labels[idx], idx, sampling, guide)
        if record is not None:
            record.setdefault("nfe", []).append(nfe)
            record.setdefault("latents", []).append(latents)
        images.append(latents_to_images(latents, tex_stats, decoder, model.cfg.texture_chans).numpy())
    return np.concatenate(images), labels


def judge_checkpoint(
    judge: Judge, ref_features: np.ndarray, ckpt: str | Path, stats: str | Path, num_samples: int,
    num_classes: int, flags: Sequence[str] = (),
) -> dict[str, Any]:
    images, labels = sample_images(ckpt, stats, num_samples, num_classes, flags)
    return judge_report(judge, images, labels, ref_features)


__all__ = ["sample_images", "judge_checkpoint"]
