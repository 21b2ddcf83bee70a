"""FID, sFID, IS, precision and recall as the paper reports them (ADM protocol, docs/method.md §7.3, §8).

Subcommands:
  gen   generate N class-balanced samples (N/K per class, label ⌊i/(N/K)⌋) as {index:06d}.png;
        distributed with torchrun, per-index seeds, resumable (re-run the same command);
        --npz packs the ADM sample batch (arr_0 uint8 N×H×W×3, shuffled with seed 42) that the
        official TensorFlow evaluator reads too.
  ref   reference statistics (mu, sigma, mu_s, sigma_s + pool features) of an image folder or npz.
  calc  metrics of a sample folder or npz against VIRTUAL_imagenet256_labeled.npz or a `ref` file;
        writes a results JSON with every setting and prints one headline line.

Only the verified Inception weights (pt_inception-2015-12-05-6726825d.pth, a local file) give
"FID"; any other detector (--detector random for tests) names itself in every number
("FD_random-inception", ...).

Examples:
    # 50K samples with AutoGuidance on 8 GPUs, then the npz for the official evaluator
    # (`just paper-fid xl-4m 8` runs exactly the paper's protocol for each published row)
    torchrun --nproc_per_node=8 eval/fid.py gen --ckpt weights/model_weights/sfd_xl/checkpoints/4000000.pt \\
        --model XL/1 --guide weights/model_weights/sfd_autoguidance_b/checkpoints/0070000.pt \\
        --guide-model B/1 --ag-scale 1.5 --stats "$(python -m sfd.weights --path latents_stats)" \\
        --grid authors --out runs/fid50k/sfd-xl-ag --npz runs/fid50k/sfd-xl-ag.npz

    # metrics against the ADM reference batch (weights/VIRTUAL_imagenet256_labeled.npz)
    python eval/fid.py calc runs/fid50k/sfd-xl-ag.npz --out runs/fid50k/sfd-xl-ag.json

    # reference statistics of your own image folder (ADM centre crop to 256)
    python eval/fid.py ref data/imagenet/val --center-crop 256 --out runs/refs/imagenet-val.npz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from sfd import runtime
from sfd.checkpoint import (
    KNOWN_WEIGHTS,
    file_sha256,
    resolve_checkpoint,
    resolve_weights,
)
from sfd.cli import (
    SOURCE_ARGS,
    SOURCE_DEPRECATED,
    Arg,
    Parser,
    check_inputs,
    config_parser,
    parse_config,
    print_config,
    run_cli,
    source_inputs,
    source_kwargs,
)
from sfd.config import GEN_PRESETS, CalcConfig, GenConfig, RefConfig
from sfd.guidance import build_velocity_fn, compile_mode, compile_velocity_fn
from sfd.loading import load_pipeline
from sfd.metrics import (
    IS_SPLIT_SIZE,
    PR_NEIGHBOURHOOD,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from sfd.models.inception import (
    FID_DETECTOR_NAME,
    is_fid_detector,
    load_inception,
    random_inception,
)
from sfd.pixels import latents_to_images
from sfd.samplers import clock_for, generate_latents

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SETTINGS_FILE = "gen.json"  # identity of a sample folder; a resume must match it
SETTINGS_KEY = "sfd_settings_json"  # the same settings, inside a packed npz (arr_0 stays ADM's)


def example_epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"    {line}" for line in lines)


# ---------------------------------------------------------------------------------------------
# The evaluation protocol: which index, which label, which order (docs/method.md §7.3)

# The authors shuffle the 50K files with seed 42 before packing the npz (docs/method.md §7.3).
AUTHORS_SHUFFLE_SEED = 42


def rank_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Global sample indices of ``rank``: rank, rank + W, rank + 2W, ... (disjoint, covering).

    Strided rather than blocks so every rank gets a mix of classes and a similar workload; the
    partition only decides who computes an index, never what it becomes (per-index seeds).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return range(rank, num_samples, world_size)


def balanced_labels(indices: Sequence[int] | range, num_samples: int, num_classes: int) -> np.ndarray:
    """Label ⌊i / (N/K)⌋ of each index: exactly N/K samples per class (the authors' balanced
    sampling, docs/method.md §7.3; they pad to the batch with random labels, we require K | N)."""
    if num_samples % num_classes:
        raise ValueError(
            f"{num_samples} samples cannot be split evenly over {num_classes} classes; "
            f"use a multiple of {num_classes}"
        )
    per_class = num_samples // num_classes
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
        raise ValueError(f"indices must lie in [0, {num_samples})")
    return idx // per_class


def shuffled_order(num_samples: int, seed: int = AUTHORS_SHUFFLE_SEED) -> np.ndarray:
    """A fixed permutation of range(N): the order in which samples go into the npz.

    The ADM evaluator takes IS over consecutive 5,000-sample splits, so class-sorted samples
    would bias it; the authors shuffle with seed 42 (Python's ``random`` over a directory
    listing, which is not reproducible); we use NumPy's PCG64 on the sorted indices.
    """
    return np.random.default_rng(seed).permutation(num_samples)


# ---------------------------------------------------------------------------------------------
# Image files and npz batches


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """Temp file + rename: a killed run never leaves a truncated PNG under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def read_image(path: Path, center_crop: int | None) -> np.ndarray:
    with Image.open(path) as im:
        if center_crop:
            from sfd.data.images import adm_center_crop

            return adm_center_crop(im.convert("RGB"), center_crop)
        return np.asarray(im.convert("RGB"))


def npz_member_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype, Any]:
    """(shape, dtype, open stream positioned at the data) of ``key`` in an npz, without loading it."""
    stream = zf.open(f"{key}.npy")
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if fortran:
        raise SystemExit(f"{key} is stored in Fortran order; expected C order as np.savez writes")
    return shape, dtype, stream


def check_npz(path: Path) -> None:
    """A damaged or foreign .npz is one user error naming the file, not a zipfile traceback."""
    if not zipfile.is_zipfile(path):
        raise SystemExit(f"{path} is not a readable .npz (damaged, or not made by np.savez); check the file")


def npz_num_images(path: Path, key: str = "arr_0") -> tuple[int, tuple[int, ...]]:
    check_npz(path)
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise SystemExit(f"{path} has no '{key}' (keys: {[n[:-4] for n in zf.namelist()]})")
        shape, dtype, stream = npz_member_header(zf, key)
        stream.close()
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise SystemExit(f"{path}:{key} must be uint8 N×H×W×3, got {dtype} {shape}")
    return shape[0], shape


def iter_npz_images(path: Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of an npz image array, streamed (a 50K batch is ~10 GB)."""
    with zipfile.ZipFile(path) as zf:
        shape, _, stream = npz_member_header(zf, key)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buf = stream.read(count * per_image)
            yield np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(count, *shape[1:])
        stream.close()


def iter_folder_images(
    files: Sequence[Path], batch_size: int, center_crop: int | None = None, workers: int = 8
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches in the given file order (decoded on a thread pool)."""
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), batch_size):
            imgs = list(pool.map(lambda p: read_image(p, center_crop), files[start : start + batch_size]))
            sizes = {im.shape for im in imgs}
            if len(sizes) > 1:
                raise SystemExit(f"images of different sizes {sorted(sizes)}; use --center-crop SIZE")
            yield np.stack(imgs)


def write_npz_streamed(
    path: Path, files: Sequence[Path], image_shape: tuple[int, ...], settings: dict[str, Any]
) -> None:
    """ADM sample batch: ``arr_0`` uint8 (N, H, W, 3) in ``files`` order, plus the settings.

    Written member by member through zipfile (as np.savez lays it out) so 50K images never sit
    in memory at once, into a temp file renamed into place at the end.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    shape = (len(files), *image_shape)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for batch in tqdm(iter_folder_images(files, 256), total=-(-len(files) // 256), desc="npz", unit="batch"):
                if batch.shape[1:] != image_shape:
                    raise SystemExit(f"image of shape {batch.shape[1:]} in a batch of {image_shape}")
                f.write(np.ascontiguousarray(batch).tobytes())
        with zf.open(f"{SETTINGS_KEY}.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps(settings)))
    os.replace(tmp, path)


def read_npz_settings(path: Path) -> dict[str, Any] | None:
    check_npz(path)
    with np.load(path) as data:
        return json.loads(str(data[SETTINGS_KEY])) if SETTINGS_KEY in data.files else None


# ---------------------------------------------------------------------------------------------
# gen


def generation_settings(
    cfg: GenConfig, model: Any, ckpt_file: Path, stats: Any, num_classes: int, decoder: Any
) -> dict[str, Any]:
    """Everything that decides the images (compared on resume) — not batch size or GPU count."""
    sampling = cfg.sampling
    return {
        "checkpoint": str(ckpt_file),
        "checkpoint_sha256": file_sha256(ckpt_file, 16),
        "ema": cfg.ema,
        "model": json.loads(json.dumps(model.cfg.__dict__)),
        "guide_sha256": file_sha256(resolve_guide_file(cfg), 16) if cfg.sampling.guide_ckpt else None,
        "sampling": sampling.describe(),
        "delta_t": clock_for(model.cfg, sampling).delta_t,
        "num_samples": cfg.num_samples,
        "num_classes": num_classes,
        "labels": "balanced: label(i) = i // (num_samples / num_classes)",
        "texture_stats": stats.source,
        "texture_stats_values": [stats.mean.tolist(), stats.std.tolist()],
        "decoder": decoder.decoder_identity,
    }


def resolve_guide_file(cfg: GenConfig) -> Path:
    return resolve_checkpoint(cfg.sampling.guide_ckpt, prefer_ema=cfg.ema)


def check_or_write_settings(out: Path, settings: dict[str, Any]) -> None:
    """Rank 0: record the settings, or refuse to resume a folder made with different ones."""
    path = out / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # compare in JSON form (tuples become lists)
    if path.is_file():
        stored = json.loads(path.read_text())
        # File locations may move; their hashes and the values may not.
        identity = {k: v for k, v in settings.items() if k not in ("checkpoint", "vae", "texture_stats")}
        diffs = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if diffs:
            lines = "\n".join(f"  {k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diffs.items())
            raise SystemExit(f"{out} holds samples made with other settings; use a new --out.\n{lines}")
        return
    if any(out.glob("*.png")):
        raise SystemExit(f"{out} has PNGs but no {SETTINGS_FILE}: not a folder this script made; use a new --out")
    tmp = path.with_name(f".{SETTINGS_FILE}.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)


def read_nfe(out: Path) -> dict[str, float] | None:
    """Mean/min/max NFE per batch from the per-rank logs (a regenerated batch counts once)."""
    per_batch: dict[int, int] = {}
    for log in sorted(out.glob("nfe.rank*.jsonl")):
        for line in log.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                per_batch[rec["first_index"]] = rec["nfe"]
    if not per_batch:
        return None
    values = np.array(list(per_batch.values()), dtype=np.float64)
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()), "batches": len(values)}


def cmd_gen(cfg: GenConfig) -> None:
    check_inputs(source_inputs(cfg))
    d = runtime.init_distributed(cfg.device)
    rank, world, device = d.rank, d.world_size, d.device
    # Policy, decided once: TF32 matmuls as in the authors' inference (docs/method.md §7.1).
    runtime.set_precision(device, tf32=cfg.tf32)
    sampling = cfg.sampling
    model, ckpt_file, guide, stats, vae = load_pipeline(cfg.ckpt, device=device, **source_kwargs(cfg))
    num_classes = cfg.num_classes or model.cfg.num_classes
    if cfg.num_samples % num_classes:  # exactly N/K per class (docs/method.md §7.3)
        raise SystemExit(f"--num-samples {cfg.num_samples} is not a multiple of the {num_classes} classes")
    out = Path(cfg.out)
    error: list[str | None] = [None]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            check_or_write_settings(out, generation_settings(cfg, model, ckpt_file, stats, num_classes, vae))
        except SystemExit as e:
            error[0] = str(e)
    if dist.is_initialized():  # every rank stops on rank 0's refusal instead of hanging in a barrier
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise SystemExit(error[0])
    settings = json.loads((out / SETTINGS_FILE).read_text())

    # Fixed batches over this rank's indices: a resumed run recomputes exactly the batches that
    # are missing a file, with the same members, so its images match an uninterrupted run bit for bit.
    mine = rank_indices(cfg.num_samples, rank, world)
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    todo = [b for b in batches if not all(png_path(out, i).is_file() for i in b)]
    done_images = sum(len(b) for b in batches) - sum(len(b) for b in todo)
    if rank == 0:
        print(
            f"gen: {cfg.num_samples} samples ({cfg.num_samples // num_classes}/class) -> {out} | "
            f"world {world} | {sampling.method} {sampling.solver_options()} | guidance {sampling.guidance} | "
            f"rank 0: {done_images} done, {len(todo)} batches to go"
        )
    if cfg.max_batches is not None:
        todo = todo[: cfg.max_batches]
    # The guided velocity function, built (and compiled, SamplingConfig.compile) once for all batches.
    fn = compile_velocity_fn(
        build_velocity_fn(model, sampling, guide), min(cfg.batch_size, max(len(mine), 1)), compile_mode(sampling.compile, device)
    )
    bar = tqdm(total=len(mine), initial=done_images, unit="img", desc="gen", disable=rank != 0, dynamic_ncols=True)
    for batch in todo:
        indices = list(batch)
        for i in indices:  # leftovers of a run killed mid-write
            png_path(out, i).with_name(f".{i:06d}.png.tmp").unlink(missing_ok=True)
        labels = balanced_labels(indices, cfg.num_samples, num_classes)
        latents, nfe = generate_latents(model, labels, indices, sampling, guide, fn=fn)
        images = latents_to_images(latents, stats, vae, model.cfg.texture_chans).numpy()
        for i, image in zip(indices, images):
            if not png_path(out, i).is_file():
                write_png_atomic(png_path(out, i), image)
        with open(out / f"nfe.rank{rank}.jsonl", "a") as log:
            log.write(json.dumps({"first_index": indices[0], "count": len(indices), "nfe": nfe}) + "\n")
        bar.update(len(indices))
        bar.set_postfix(nfe=nfe)
    bar.close()
    d.barrier()

    if rank == 0:
        missing = [i for i in range(cfg.num_samples) if not png_path(out, i).is_file()]
        if missing:
            print(f"gen: {len(missing)} of {cfg.num_samples} samples still missing; re-run the same command to continue")
        else:
            print(f"gen: all {cfg.num_samples} samples in {out}")
            if cfg.npz:
                settings["nfe_per_batch"] = read_nfe(out)
                settings["npz_order"] = f"shuffled, numpy default_rng({cfg.shuffle_seed}).permutation"
                order = shuffled_order(cfg.num_samples, cfg.shuffle_seed)
                with Image.open(png_path(out, 0)) as im:
                    first = np.asarray(im.convert("RGB"))
                write_npz_streamed(Path(cfg.npz), [png_path(out, int(i)) for i in order], first.shape, settings)
                print(f"gen: wrote {cfg.npz} (arr_0 {cfg.num_samples}x{'x'.join(map(str, first.shape))} uint8, shuffled)")
    runtime.shutdown()


# ---------------------------------------------------------------------------------------------
# Features and reference statistics


def build_detector(cfg: RefConfig | CalcConfig, device: torch.device) -> torch.nn.Module:
    if cfg.detector == "random":
        return random_inception(seed=0).to(device)
    return load_inception(cfg.inception, device=device)


def detector_slug(detector: torch.nn.Module) -> str:
    """Short detector name for metric keys: 'random-inception (not FID)' → 'random-inception'."""
    return detector.detector_name.split(" (")[0]


@torch.no_grad()
def compute_features(
    batches: Iterator[np.ndarray], total: int, detector: torch.nn.Module, device: torch.device, desc: str
) -> dict[str, np.ndarray]:
    """pool (N, 2048), spatial (N, 2023) and IS probabilities (N, 1008), float32, in input order."""
    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "probs": []}
    with tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True) as bar:
        for batch in batches:
            outputs = detector(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            for key in parts:
                parts[key].append(getattr(outputs, key).float().cpu().numpy())
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


def source_batches(
    source: Path, batch_size: int, center_crop: int | None = None, order: np.ndarray | None = None
) -> tuple[Iterator[np.ndarray], int, str]:
    """(batches, count, description) of a folder (optionally reordered) or an npz's arr_0."""
    if source.is_dir():
        files = list_images(source)
        if order is not None:
            files = [files[int(i)] for i in order]
        return iter_folder_images(files, batch_size, center_crop), len(files), "folder"
    if source.suffix == ".npz":
        if center_crop:
            raise SystemExit("--center-crop applies to image folders; an npz batch is used as stored")
        count, _ = npz_num_images(source)
        return iter_npz_images(source, batch_size), count, "npz arr_0"
    raise SystemExit(f"{source}: expected an image folder or an .npz")


def no_tf32(device: torch.device) -> None:
    # The Inception port's author asks for full fp32 convolutions: TF32 moves FID visibly.
    runtime.set_precision(device, tf32=False)


def cmd_ref(cfg: RefConfig) -> None:
    check_inputs({"source": cfg.source, "--inception": cfg.inception if cfg.detector == "inception" else None})
    device = runtime.pick_device(cfg.device)
    no_tf32(device)
    detector = build_detector(cfg, device)
    source = Path(cfg.source)
    batches, count, kind = source_batches(source, cfg.batch_size, cfg.center_crop)
    feats = compute_features(batches, count, detector, device, desc="ref")
    mu, sigma = feature_stats(feats["pool"])
    mu_s, sigma_s = feature_stats(feats["spatial"])
    stats_source = "computed"
    if kind == "npz arr_0" and is_fid_detector(detector) and not cfg.recompute_stats:
        with np.load(source) as data:
            if all(k in data.files for k in ("mu", "sigma", "mu_s", "sigma_s")):
                # The ADM batch's stored statistics come from the TF graph itself: keep them.
                mu, sigma, mu_s, sigma_s = (data[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
                stats_source = "stored in the source npz (ADM)"
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(
        tmp, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=feats["pool"],
        detector=np.array(detector.detector_name), source=np.array(str(source)),
        stats_source=np.array(stats_source),
    )
    os.replace(tmp, out)
    print(f"ref: {count} images from {source} ({kind}) | detector {detector.detector_name} | stats {stats_source} -> {out}")


def load_reference(
    path: Path, detector: torch.nn.Module, device: torch.device, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """mu, sigma, mu_s, sigma_s and pool features of the reference, plus how they were obtained."""
    check_npz(path)
    with np.load(path) as data:
        keys = set(data.files)
        stored = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in keys}
        ref_detector = str(data["detector"]) if "detector" in keys else None
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path, 16)}
    if ref_detector is not None:  # a `ref` output
        if ref_detector != detector.detector_name:
            raise SystemExit(f"{path} was made with detector {ref_detector!r}, this run uses {detector.detector_name!r}")
        info.update(kind="ref output", stats="from the ref file")
        return stored, info
    if "arr_0.npy" not in {f"{k}.npy" for k in keys}:
        raise SystemExit(f"{path} has neither a `ref` output's keys nor arr_0 images (keys: {sorted(keys)})")
    count, _ = npz_num_images(path)
    feats = compute_features(iter_npz_images(path, batch_size), count, detector, device, desc="ref features")
    info.update(kind="ADM reference batch", num_images=count)
    if is_fid_detector(detector) and all(k in stored for k in ("mu", "sigma", "mu_s", "sigma_s")):
        # The evaluator's protocol: stored FID/sFID statistics, images only for precision/recall.
        info["stats"] = "stored mu/sigma/mu_s/sigma_s"
        return {**stored, "pool": feats["pool"]}, info
    # The stored statistics belong to the real Inception: a different detector recomputes them.
    mu, sigma = feature_stats(feats["pool"])
    mu_s, sigma_s = feature_stats(feats["spatial"])
    info["stats"] = f"recomputed from arr_0 with {detector.detector_name}"
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": feats["pool"]}, info


def metric_names(detector: torch.nn.Module) -> dict[str, str]:
    """Report names: the paper's for the real Inception, detector-tagged ones for anything else
    (a Fréchet distance on other features is "FD_<detector>", never "FID")."""
    if is_fid_detector(detector):
        return {"fd": "FID", "sfd": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall"}
    slug = detector_slug(detector)
    return {"fd": f"FD_{slug}", "sfd": f"sFD_{slug}", "is": f"IS_{slug}",
            "precision": f"Precision_{slug}", "recall": f"Recall_{slug}"}


def cmd_calc(cfg: CalcConfig) -> None:
    check_inputs({"samples": cfg.samples, "--ref": cfg.ref or f"weights/{KNOWN_WEIGHTS['adm_reference'].filename}",
                  "--inception": (cfg.inception or f"weights/{KNOWN_WEIGHTS['inception'].filename}")
                  if cfg.detector == "inception" else None})
    device = runtime.pick_device(cfg.device)
    no_tf32(device)
    detector = build_detector(cfg, device)
    samples = Path(cfg.samples)
    settings: dict[str, Any] | None = None
    order = None
    if samples.is_dir():
        if (samples / SETTINGS_FILE).is_file():
            settings = json.loads((samples / SETTINGS_FILE).read_text())
            settings["nfe_per_batch"] = read_nfe(samples)
        num = len(list_images(samples))
        if settings is not None and num != settings["num_samples"]:
            raise SystemExit(f"{samples} holds {num} of {settings['num_samples']} samples; finish `gen` first")
        # IS takes sequential splits: shuffle the class-sorted files as the authors do (§7.3).
        order = shuffled_order(num, cfg.shuffle_seed)
        sample_order = f"folder, shuffled with numpy default_rng({cfg.shuffle_seed})"
    else:
        settings = read_npz_settings(samples) if samples.suffix == ".npz" else None
        sample_order = "npz arr_0 as stored"
    batches, count, _ = source_batches(samples, cfg.batch_size, order=order)
    if cfg.num_samples is not None and count != cfg.num_samples:
        raise SystemExit(f"{samples} has {count} samples, --num-samples asks for {cfg.num_samples}")

    t0 = time.perf_counter()
    feats = compute_features(batches, count, detector, device, desc="sample features")
    ref_path = resolve_weights("adm_reference", cfg.ref)
    ref, ref_info = load_reference(ref_path, detector, device, cfg.batch_size)
    mu, sigma = feature_stats(feats["pool"])
    mu_s, sigma_s = feature_stats(feats["spatial"])
    pr_device = device if device.type == "cuda" else None
    precision, recall = precision_recall(ref["pool"], feats["pool"], k=PR_NEIGHBOURHOOD, device=pr_device)
    names = metric_names(detector)
    metrics = {
        names["fd"]: frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        names["sfd"]: frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
        names["is"]: inception_score(feats["probs"], split_size=IS_SPLIT_SIZE),
        names["precision"]: precision,
        names["recall"]: recall,
    }
    headline = headline_line(metrics, detector, count, settings)
    results = {
        "metrics": metrics,
        "headline": headline,
        "detector": {
            "name": detector.detector_name, "is_fid_detector": is_fid_detector(detector),
            "weights_sha256": getattr(detector, "weights_sha256", None),
            "note": None if is_fid_detector(detector) else
            f"not the {FID_DETECTOR_NAME} Inception: these numbers are not FID/sFID/IS and not comparable to the paper",
        },
        "samples": {"path": str(samples), "num_samples": count, "order": sample_order},
        "generation": settings,
        "reference": ref_info,
        "protocol": {
            "evaluator": "ADM evaluations/evaluator.py, PyTorch port", "is_split_size": IS_SPLIT_SIZE,
            "pr_k": PR_NEIGHBOURHOOD, "tf32": False, "frechet": "float64, eigenvalue route",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(cfg.out) if cfg.out else default_results_path(samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(headline)
    print(f"calc: results -> {out}")


def default_results_path(samples: Path) -> Path:
    return samples / "metrics.json" if samples.is_dir() else samples.with_suffix(".metrics.json")


def headline_line(metrics: dict[str, float], detector: torch.nn.Module, count: int, settings: dict[str, Any] | None) -> str:
    parts = [f"{k} {v:.4g}" if "recall" not in k.lower() and "precision" not in k.lower() else f"{k} {v:.3f}" for k, v in metrics.items()]
    line = " | ".join(parts) + f" | N={count} | detector {detector.detector_name}"
    if settings is not None:
        s = settings.get("sampling", {})
        nfe = (settings.get("nfe_per_batch") or {}).get("mean")
        line += f" | {s.get('method')} NFE {nfe:.0f}" if nfe is not None else f" | {s.get('method')}"
        line += f" | guidance {s.get('guidance')} (tex {s.get('scale_tex')}, sem {s.get('scale_sem')}) | seed {s.get('seed')}"
    if not is_fid_detector(detector):
        line = "[NOT FID] " + line
    return line


# ---------------------------------------------------------------------------------------------
# CLI


DETECTOR_ARGS = (Arg("--detector"), Arg("--inception", metavar="PATH"))
DETECTOR_DEPRECATED = {"--batch-size": "batch_size", "--device": "device"}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="eval/fid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    gen = sub.add_parser("gen", help="generate class-balanced samples (resumable, torchrun)", formatter_class=fmt,
                         description="Generate N class-balanced samples as {index:06d}.png (resumable; torchrun). "
                         "Every setting is a key of sfd.config.GenConfig (the sampling ones directly: -o method=heun); "
                         "--dry-run loads nothing (the checkpoint's own Δt shows as delta_t null).",
                         epilog=example_epilog(
                             "torchrun --nproc_per_node=8 eval/fid.py gen --ckpt runs/sfd-xl -o method=dopri5 \\",
                             "    --out runs/fid50k/samples --npz runs/fid50k/samples.npz"))
    config_parser(GenConfig, parser=gen, presets=GEN_PRESETS, default_preset="authors",
                  args=(*SOURCE_ARGS, Arg("--out", required=True), Arg("--num-samples"), Arg("--npz", metavar="PATH")),
                  deprecated={**SOURCE_DEPRECATED, "--num-classes": "num_classes", "--shuffle-seed": "shuffle_seed",
                              "--max-batches": "max_batches"})
    gen.set_defaults(func=cmd_gen)

    ref = sub.add_parser("ref", help="reference statistics of an image folder or npz", formatter_class=fmt,
                         description="Reference statistics (mu, sigma, mu_s, sigma_s, pool features) with ADM key names; "
                         "every setting is a key of sfd.config.RefConfig.",
                         epilog=example_epilog("python eval/fid.py ref weights/VIRTUAL_imagenet256_labeled.npz --out runs/refs/adm256.npz"))
    config_parser(RefConfig, parser=ref,
                  args=(Arg("source"), Arg("--out", required=True), Arg("--center-crop"), *DETECTOR_ARGS),
                  deprecated={**DETECTOR_DEPRECATED, "--recompute-stats": "recompute_stats=true"})
    ref.set_defaults(func=cmd_ref)

    calc = sub.add_parser("calc", help="FID, sFID, IS, precision, recall of a sample folder or npz", formatter_class=fmt,
                          description="Metrics of samples against the ADM reference batch or a `ref` output; every "
                          "setting is a key of sfd.config.CalcConfig.",
                          epilog=example_epilog("python eval/fid.py calc runs/fid50k/samples.npz --ref weights/VIRTUAL_imagenet256_labeled.npz --out runs/fid50k/metrics.json"))
    config_parser(CalcConfig, parser=calc,
                  args=(Arg("samples"), Arg("--ref", metavar="PATH"), Arg("--out", metavar="PATH"), Arg("--num-samples"),
                        *DETECTOR_ARGS),
                  deprecated={**DETECTOR_DEPRECATED, "--shuffle-seed": "shuffle_seed"})
    calc.set_defaults(func=cmd_calc)
    return ap


def main(argv: Sequence[str] | None = None) -> int | None:
    cfg, args = parse_config(build_parser(), argv)
    if args.dry_run:
        return print_config(cfg)
    return args.func(cfg)


if __name__ == "__main__":
    # A user error (also a SystemExit with a message from the checks above): one line, exit 2.
    run_cli(lambda: main(sys.argv[1:]))
