"""Sample a class-conditional grid from an SFD checkpoint: one row per class, a PNG with captions.

Three-phase ODE sampling over the global clock τ ∈ [0, 1 + Δt] (docs/method.md §7.1), optional CFG or
AutoGuidance (§7.2), texture channels denormalised with the cache statistics and decoded with the
texture VAE. Runs on CPU and GPU (``-o device=auto``); fp32 by default as the authors sample.

Every setting is a key of sfd.config.GridConfig: --preset names the sampling settings (authors =
dopri5, atol 1e-6, rtol 1e-3, no guidance), -o changes any key (the sampling ones directly:
-o method=heun, -o cfg_scale=1.5), --dry-run prints the resolved config without loading anything
(the checkpoint's own Δt shows as delta_t null until it is read).

Examples:
    # the authors' released XL/1 with AutoGuidance (paper setting: dopri5, w = 1.5); weights/ is
    # laid out as published (`just weights` lists it)
    python sample/grid.py --ckpt weights/model_weights/sfd_xl/checkpoints/4000000.pt --model XL/1 \\
        --guide weights/model_weights/sfd_autoguidance_b/checkpoints/0070000.pt --guide-model B/1 \\
        -o ag_scale=1.5 --stats "$(python -m sfd.weights --path latents_stats)" \\
        --classes 207,360,387,974,88,979,417,279 --per-class 4 --out runs/grids/sfd-xl-ag.png

    # the latest checkpoint of our own run (latent statistics stored with it; a cache via --stats
    # adds class names), Euler 100 steps, CFG 1.5 from τ ≥ 0.1
    python sample/grid.py --ckpt runs/sfd-xl --stats data/cache/imagenet256 \\
        --classes n02099601,n01443537 --preset euler -o num_steps=100 -o cfg_scale=1.5 \\
        -o cfg_interval_start=0.1 --out runs/grids/own-run.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sfd import runtime
from sfd.checkpoint import file_sha256
from sfd.cli import (
    SOURCE_ARGS,
    SOURCE_DEPRECATED,
    Arg,
    check_inputs,
    config_parser,
    parse_config,
    print_config,
    run_cli,
    source_inputs,
    source_kwargs,
)
from sfd.config import GRID_PRESETS, ConfigError, GridConfig
from sfd.guidance import build_velocity_fn, compile_mode, compile_velocity_fn
from sfd.loading import load_pipeline
from sfd.pixels import latents_to_images, make_grid
from sfd.samplers import clock_for, generate_latents


def read_class_names(cfg: GridConfig, num_classes: int) -> list[str] | None:
    """Class names by label: --class-names FILE (one per line), else a latent cache's attrs."""
    names = None
    if cfg.class_names is not None:
        names = [line.strip() for line in Path(cfg.class_names).read_text().splitlines() if line.strip()]
    elif cfg.stats is not None and Path(cfg.stats).is_dir():
        from sfd.data.cache import LatentCache

        stored = LatentCache.open(cfg.stats).attrs.get("class_names")
        names = list(stored) if stored is not None else None
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def parse_classes(spec: str, names: list[str] | None, num_classes: int) -> list[int]:
    """Comma-separated labels: indices, or (with names) wnids / names, case-insensitive."""
    lookup = {n.lower(): i for i, n in enumerate(names or [])}
    labels = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.isdigit():
            label = int(token)
        elif token.lower() in lookup:
            label = lookup[token.lower()]
        else:
            hint = "" if names else " (pass --class-names or a cache with class names to use names)"
            raise ConfigError(f"unknown class {token!r} in --classes{hint}")
        if not 0 <= label < num_classes:
            raise ConfigError(f"--classes: class {label} outside [0, {num_classes})")
        labels.append(label)
    if not labels:
        raise ConfigError("--classes is empty")
    return labels


def real_row_images(root: Path, classes: list[int], names: list[str] | None, size: int) -> np.ndarray:
    """One real image per class (the first decodable one of ``root/<class name>/``), ADM-cropped to
    ``size``: uint8 (K, size, size, 3). The class folders are found by the names the cache (or
    --class-names) gives, as the encode job numbered them."""
    from sfd.data.images import discover, load_image

    found = discover(root)
    by_name = {n: k for k, n in enumerate(found.class_names)}
    out = []
    for c in classes:
        name = names[c] if names else None
        if name not in by_name:
            raise ConfigError(f"--real-images {root}: no class folder for class {c} ({name!r}); "
                              "pass the image folder the cache was encoded from (and a cache via --stats for the names)")
        for i in np.flatnonzero(found.labels == by_name[name]):
            arr, _ = load_image(found.abspath(int(i)), size)
            if arr is not None:
                out.append(arr)
                break
        else:
            raise ConfigError(f"--real-images {root}: no decodable image in {name}/")
    return np.stack(out)


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        GridConfig, prog="sample/grid.py", description=__doc__, presets=GRID_PRESETS, default_preset="authors",
        args=(*SOURCE_ARGS, Arg("--classes"), Arg("--per-class"), Arg("--class-names", metavar="PATH"),
              Arg("--real-images", metavar="PATH"), Arg("--out", metavar="PATH")),
        deprecated=SOURCE_DEPRECATED,
    )


def main(argv: list[str] | None = None) -> int | None:
    cfg, args = parse_config(build_parser(), argv)
    if args.dry_run:
        return print_config(cfg)
    check_inputs({**source_inputs(cfg), "--class-names": cfg.class_names, "--real-images": cfg.real_images})

    # Policy, decided once: TF32 as in the authors' inference (docs/method.md §7.1) unless disabled.
    device = runtime.pick_device(cfg.device)
    runtime.set_precision(device, tf32=cfg.tf32)
    sampling = cfg.sampling
    model, ckpt_file, guide, stats, vae = load_pipeline(cfg.ckpt, device=device, **source_kwargs(cfg))
    names = read_class_names(cfg, model.cfg.num_classes)
    classes = parse_classes(cfg.classes, names, model.cfg.num_classes)
    labels = [c for c in classes for _ in range(cfg.per_class)]
    print(
        f"device {device} | {ckpt_file} | {len(classes)} classes x {cfg.per_class} | "
        f"{sampling.method} {sampling.solver_options()} | guidance {sampling.guidance} "
        f"(tex {sampling.scales[0]}, sem {sampling.scales[1]}) | stats {stats.source}"
    )

    # The guided velocity function, built (and compiled, SamplingConfig.compile) once for all batches.
    batch_size = min(cfg.batch_size, len(labels))
    fn = compile_velocity_fn(build_velocity_fn(model, sampling, guide), batch_size, compile_mode(sampling.compile, device))
    t0 = time.perf_counter()
    images, nfe = [], []
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        indices = list(range(start, start + len(batch_labels)))
        latents, batch_nfe = generate_latents(model, batch_labels, indices, sampling, guide, fn=fn)
        images.append(latents_to_images(latents, stats, vae, model.cfg.texture_chans))
        nfe.append(batch_nfe)
    seconds = time.perf_counter() - t0

    samples = torch.cat(images)
    row_labels = [f"{c} {names[c]}" if names else f"class {c}" for c in classes]  # whole, never cut
    nrow, captions = cfg.per_class, None
    if cfg.real_images:
        real = real_row_images(Path(cfg.real_images), classes, names, samples.shape[1])
        rows = samples.view(len(classes), cfg.per_class, *samples.shape[1:])
        samples = torch.cat([torch.from_numpy(real)[:, None], rows], dim=1).flatten(0, 1)
        nrow = cfg.per_class + 1
        captions = [("real" if j == 0 else "") for _ in classes for j in range(nrow)]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(samples, nrow=nrow, captions=captions, row_labels=row_labels).save(out)
    summary = {
        "png": str(out), "checkpoint": str(ckpt_file), "checkpoint_sha256": file_sha256(ckpt_file, 16),
        "classes": classes, "per_class": cfg.per_class, "sampling": sampling.describe(),
        "delta_t": clock_for(model.cfg, sampling).delta_t,
        "nfe_per_batch": nfe, "stats": stats.source, "decoder": vae.decoder_identity,
        "device": str(device), "seconds": round(seconds, 2),
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"NFE {max(nfe)} per batch ({len(nfe)} batches) in {seconds:.1f} s -> wrote {out}")
    return 0


if __name__ == "__main__":
    # A user error or a refused/damaged input: one `error:` line, exit status 2 (sfd.cli.run_cli).
    run_cli(main)
