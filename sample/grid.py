"""Sample a class-conditional grid from an SFD checkpoint: one row per class, a PNG with captions.

Three-phase ODE sampling over the global clock τ ∈ [0, 1 + Δt] (docs/method.md §7.1), optional CFG or
AutoGuidance (§7.2), texture channels denormalised with the cache statistics and decoded with the
texture VAE. Runs on CPU and GPU (``--device auto``); fp32 by default as the authors sample.

Examples:
    # the authors' released XL/1 with AutoGuidance (paper setting: dopri5, w = 1.5); weights/ is
    # laid out as published (`just weights` lists it)
    python sample/grid.py --ckpt weights/model_weights/sfd_xl/checkpoints/4000000.pt --model XL/1 \\
        --guide weights/model_weights/sfd_autoguidance_b/checkpoints/0070000.pt --guide-model B/1 \\
        --ag-scale 1.5 --stats "$(python -m sfd.weights --path latents_stats)" \\
        --classes 207,360,387,974,88,979,417,279 --per-class 4 --out runs/grids/sfd-xl-ag.png

    # the latest checkpoint of our own run (latent statistics stored with it; a cache via --stats
    # adds class names), Euler 100 steps, CFG 1.5 from τ ≥ 0.1
    python sample/grid.py --ckpt runs/sfd-xl --stats data/cache/imagenet256 \\
        --classes n02099601,n01443537 --sampler euler --steps 100 --cfg-scale 1.5 \\
        --cfg-interval-start 0.1 --out runs/grids/own-run.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sfd import runtime
from sfd.checkpoint import WeightsError, file_sha256
from sfd.cli import (
    add_model_args,
    add_sampling_args,
    check_inputs,
    pipeline_kwargs,
    run_cli,
    sampling_config_from_args,
)
from sfd.config import ConfigError
from sfd.data.cache import CacheError
from sfd.guidance import build_velocity_fn, compile_mode, compile_velocity_fn
from sfd.loading import load_pipeline
from sfd.pixels import latents_to_images, make_grid
from sfd.samplers import clock_for, generate_latents


def read_class_names(args: argparse.Namespace, num_classes: int) -> list[str] | None:
    """Class names by label: --class-names FILE (one per line), else a latent cache's attrs."""
    names = None
    if args.class_names is not None:
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
    elif args.stats is not None and Path(args.stats).is_dir():
        from sfd.data.cache import LatentCache

        stored = LatentCache.open(args.stats).attrs.get("class_names")
        names = list(stored) if stored is not None else None
    if names is not None and len(names) != num_classes:
        raise SystemExit(f"{len(names)} class names for a model with {num_classes} classes")
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
            raise SystemExit(f"unknown class {token!r}{hint}")
        if not 0 <= label < num_classes:
            raise SystemExit(f"class {label} outside [0, {num_classes})")
        labels.append(label)
    if not labels:
        raise SystemExit("--classes is empty")
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
    ap = argparse.ArgumentParser(
        prog="sample/grid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--classes", default="207,360,387,974,88,979,417,279", help="comma-separated labels (indices, or wnids/names with --class-names or a cache); default: the 8 classes of DiT's sample.py")
    ap.add_argument("--class-names", default=None, help="text file, one class name per line in label order (for captions and --classes)")
    ap.add_argument("--per-class", type=int, default=4, help="samples per class (one row per class)")
    ap.add_argument("--real-images", default=None, help="image folder <class>/<image> (e.g. the training images): "
                    "each row starts with one real image of its class, ADM-cropped to the sample size, to compare with")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per sampler call")
    ap.add_argument("--out", default="grid.png", help="output PNG (a JSON with the settings is written beside it)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    ap.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls on CUDA (the authors sample with TF32 on)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_inputs({"--ckpt": args.ckpt, "--guide": args.guide, "--stats": args.stats, "--vae": args.vae,
                  "--class-names": args.class_names, "--real-images": args.real_images})

    # Policy, decided once: TF32 as in the authors' inference (docs/method.md §7.1) unless disabled.
    device = runtime.pick_device(args.device)
    runtime.set_precision(device, tf32=not args.no_tf32)
    sampling = sampling_config_from_args(args)
    model, ckpt_file, guide, stats, vae = load_pipeline(args.ckpt, device=device, **pipeline_kwargs(args))
    cfg = model.cfg
    names = read_class_names(args, cfg.num_classes)
    classes = parse_classes(args.classes, names, cfg.num_classes)
    labels = [c for c in classes for _ in range(args.per_class)]
    print(
        f"device {device} | {ckpt_file} | {len(classes)} classes x {args.per_class} | "
        f"{sampling.method} {sampling.solver_options()} | guidance {sampling.guidance} "
        f"(tex {sampling.scales[0]}, sem {sampling.scales[1]}) | stats {stats.source}"
    )

    # The guided velocity function, built (and compiled, SamplingConfig.compile) once for all batches.
    batch_size = min(args.batch_size, len(labels))
    fn = compile_velocity_fn(build_velocity_fn(model, sampling, guide), batch_size, compile_mode(sampling.compile, device))
    t0 = time.perf_counter()
    images, nfe = [], []
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        indices = list(range(start, start + len(batch_labels)))
        latents, batch_nfe = generate_latents(model, batch_labels, indices, sampling, guide, fn=fn)
        images.append(latents_to_images(latents, stats, vae, cfg.texture_chans))
        nfe.append(batch_nfe)
    seconds = time.perf_counter() - t0

    samples = torch.cat(images)
    row_labels = [f"{c} {names[c]}" if names else f"class {c}" for c in classes]  # whole, never cut
    nrow, captions = args.per_class, None
    if args.real_images:
        real = real_row_images(Path(args.real_images), classes, names, samples.shape[1])
        rows = samples.view(len(classes), args.per_class, *samples.shape[1:])
        samples = torch.cat([torch.from_numpy(real)[:, None], rows], dim=1).flatten(0, 1)
        nrow = args.per_class + 1
        captions = [("real" if j == 0 else "") for _ in classes for j in range(nrow)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(samples, nrow=nrow, captions=captions, row_labels=row_labels).save(out)
    summary = {
        "png": str(out), "checkpoint": str(ckpt_file), "checkpoint_sha256": file_sha256(ckpt_file, 16),
        "classes": classes, "per_class": args.per_class, "sampling": sampling.describe(),
        "delta_t": clock_for(cfg, sampling).delta_t,
        "nfe_per_batch": nfe, "stats": stats.source, "decoder": vae.decoder_identity,
        "device": str(device), "seconds": round(seconds, 2),
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"NFE {max(nfe)} per batch ({len(nfe)} batches) in {seconds:.1f} s -> wrote {out}")


if __name__ == "__main__":
    # A user error or a refused/damaged input: one `error:` line, exit status 2.
    run_cli(main, (ConfigError, WeightsError, CacheError))
