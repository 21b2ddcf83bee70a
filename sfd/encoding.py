"""The encoders of the latent cache and the per-shard work of the encode job (docs/architecture.md, Data flow; docs/conventions.md: The latent cache).

``pipeline/encode.py`` (the Ray driver) resolves which encoders to use into *specs*: plain dicts
that say what an encoder is (kind, name, config, weight file, its SHA-256 and, where known, the
identity of its weights: ``sfd.checkpoint.weights_identity``). The specs without their local
``path`` become the cache's identity attributes, so a cache made with other encoders is refused
before any work starts; two records of the same weights in other files are the same encoder
(``sfd.checkpoint.same_weights``). :class:`ShardWorker` builds the encoders from the specs and
does the work of one shard; the driver wraps it as a Ray actor (one per GPU, or CPU actors), and
``bench/encode.py`` runs it in a plain loop.

Per-row posterior noise: every (row, flip, part) draws its posterior noise from its own
generator seeded by :func:`row_seed`, so a shard redone after a kill, on another worker or with
another batch size writes the same latents (byte-identical on CPU; on GPU up to kernel choice).

What one shard does (docs/method.md §2.1, §2.2, §2.5, §11): decode each file into its ADM crop
(bad files become invalid rows with a reason), add the horizontally flipped copy, then

- texture VAE encoder → posterior sample (or the stand-in's exact latent);
- DINOv2 → final-norm patch tokens of the crop resized bicubically to 224²
  (stored as fp16 REPA targets when the cache keeps them);
- SemVAE encoder on those fp32 tokens → posterior sample, reshaped row-major to (C, 16, 16),
  when a SemVAE is given; otherwise the semantic latents are filled later from the stored
  fp16 DINO features by :meth:`ShardWorker.semantic_shard`.

Compute runs in fp32 as the authors' extractor does (TF32 on GPU as the entry point
chooses, applied through sfd.runtime in each worker process); ``precision="bf16"``
opts into bf16 autocast for the encoders (posterior maths stay fp32).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfd.checkpoint import (
    WeightsError,
    file_sha256,
    file_weights_identity,
    read_checkpoint,
    read_safetensors_metadata,
    resolve_weights,
    weights_identity,
)
from sfd.config import (
    DINO_PRESETS,
    SEMVAE_PRESETS,
    TEXTURE_VAE_PRESETS,
    ConfigError,
    DinoConfig,
    SemVAEConfig,
    TextureVAEConfig,
    from_dict,
    to_dict,
)
from sfd.data.cache import NUM_FLIPS, LatentCache
from sfd.data.images import hflip, load_image, to_model_input
from sfd.models.standins import PixelUnshuffleAutoencoder, parse_standin, random_init
from sfd.runtime import autocast, derive_seed, set_precision

_PART_IDS = {"texture": 1, "semantic": 2}

Spec = dict[str, Any]


# ---- per-row seeds ---------------------------------------------------------------------------


def row_seed(seed: int, part: str, row: int, flip: int) -> int:
    """A 63-bit generator seed for the posterior noise of (row, flip) of one latent part."""
    return derive_seed("encode", seed, _PART_IDS[part], row, flip)


def row_generators(seed: int, part: str, rows: Sequence[int], flips: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per (row, flip): the noise is the same on any device (drawn on CPU)."""
    return [torch.Generator().manual_seed(row_seed(seed, part, r, f)) for r, f in zip(rows, flips)]


def semvae_sample(semvae: nn.Module, tokens: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """SemVAE posterior sample (B, N, C) with one generator per row (docs/method.md §3.4).

    Same draw as ``SemVAE.encode(sample=True)`` for a batch of one: ε drawn as (C, N) — the
    authors' (C, 16, 16) posterior layout — then transposed. Posterior maths in fp32.
    """
    mean, logvar = semvae.posterior(tokens)
    mean, logvar = mean.float(), logvar.float()
    _, n, c = mean.shape
    if len(generators) != mean.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {mean.shape[0]}")
    eps = torch.stack([torch.randn((c, n), generator=g) for g in generators]).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps.transpose(1, 2)


# ---- encoder specs -----------------------------------------------------------------------------


def identity(spec: Spec | None) -> Spec | None:
    """The part of a spec that defines the encoder (no local path): goes into the cache attributes."""
    return None if spec is None else {k: v for k, v in spec.items() if k != "path"}


def _weights_spec(kind_key: str, name: str, cfg: Any, path: str | os.PathLike[str] | None) -> Spec:
    """``sha256`` hashes the file (the worker's "file unchanged" check); ``weights_sha256`` (safetensors
    files) hashes the weights and config (sfd.checkpoint.weights_identity): what a cache compares,
    so a bit-identical model in a file with other metadata, name or place is the same encoder."""
    file = resolve_weights(kind_key, path)  # WeightsError naming the file if it is missing
    spec = {
        "kind": "weights",
        "name": name,
        "config": to_dict(cfg),
        "file": file.name,
        "sha256": file_sha256(file),
        "path": str(file.resolve()),
    }
    weights_id = file_weights_identity(file, spec["config"])
    if weights_id is not None:
        spec["weights_sha256"] = weights_id
    return spec


def _random_spec(preset: str, cfg: Any, seed: int) -> Spec:
    return {"kind": "random-init", "name": f"random-init:{preset}:{seed}", "preset": preset, "config": to_dict(cfg), "seed": int(seed)}


def texture_spec(choice: str, path: str | None, random_seed: int | None, image_size: int) -> Spec:
    """``choice``: a texture-VAE preset (``f16d32``, ...) or ``standin-fN``.

    A safetensors ``path`` that declares its architecture (LDM ``ddconfig`` + ``embed_dim`` in
    its metadata: the CPU demo's autoencoder, sfd/demo/texture.py) is built as declared, whatever
    the preset ``choice`` (as a DINOv2 file's declared config wins over ``--dino-preset``);
    ``standin-fN`` and ``random_seed`` still take precedence over any file.
    """
    from sfd.models.autoencoder import texture_vae_config_for_file

    factor = parse_standin(choice)
    if factor is not None:
        ae = PixelUnshuffleAutoencoder(factor)
        ae.latent_shape(image_size)  # raises if the size is not a multiple of f
        return {"kind": "standin", "name": ae.name, "factor": factor, "scale": ae.scale}
    if random_seed is not None:
        return _random_spec("tiny", TEXTURE_VAE_PRESETS["tiny"], random_seed)
    if path is not None:
        file = resolve_weights("texture_vae", path)
        declared = texture_vae_config_for_file(file)  # WeightsError naming the file if it lies
        if declared is not None:
            return _weights_spec("texture_vae", f"file-config:{file.name}", declared, file)
    if choice not in TEXTURE_VAE_PRESETS:
        raise ConfigError(f"unknown texture encoder {choice!r}; choose one of {sorted(TEXTURE_VAE_PRESETS)} or standin-f4")
    return _weights_spec("texture_vae", choice, TEXTURE_VAE_PRESETS[choice], path)


def dino_config_for_file(path: Path) -> DinoConfig | None:
    """The architecture a DINOv2-layout safetensors file declares, or None if it declares none.

    Such a file (the golden test file, the demo's trained ViT: sfd/demo/semantic.py) carries
    DINOv2's constructor arguments as metadata ``config`` and may carry ``input_size``, the
    resolution to run it at (default 224, the authors' resize of the 256² crop).
    """
    if path.suffix != ".safetensors":
        return None
    meta = read_safetensors_metadata(path)
    if "config" not in meta:
        return None
    from sfd.models.dino import dino_config_from_original

    return dino_config_from_original(meta["config"], img_size=int(meta.get("input_size", 224)))


def dino_spec(preset: str, path: str | None, random_seed: int | None) -> Spec:
    if random_seed is not None:
        return _random_spec("tiny", DINO_PRESETS["tiny"], random_seed)
    if path is not None:
        file = resolve_weights("dinov2", path)
        declared = dino_config_for_file(file)
        if declared is not None:  # the file's own architecture wins over --dino-preset
            return _weights_spec("dinov2", f"file-config:{file.name}", declared, file)
    if preset not in DINO_PRESETS:
        raise ConfigError(f"unknown DINOv2 preset {preset!r}; choose one of {sorted(DINO_PRESETS)}")
    return _weights_spec("dinov2", preset, DINO_PRESETS[preset], path)


def semvae_config_for_file(path: Path, preset: str) -> SemVAEConfig:
    """Our safetensors carry their config in the metadata; the authors' ``.pt`` uses ``preset``."""
    if path.suffix == ".safetensors":
        stored = read_checkpoint(path, kind="semvae", weights=False).model_config
        if stored is not None:
            return stored
    if preset not in SEMVAE_PRESETS:
        raise ConfigError(f"unknown SemVAE preset {preset!r}; choose one of {sorted(SEMVAE_PRESETS)}")
    return SEMVAE_PRESETS[preset]


def semvae_spec(path: str | None, preset: str, random_seed: int | None) -> Spec:
    """A given SemVAE: ``path`` to a weight file, or ``"random"`` (tiny, needs ``random_seed``)."""
    if path == "random":
        if random_seed is None:
            raise ConfigError("--semvae random needs --random-encoders SEED")
        return _random_spec("tiny", SEMVAE_PRESETS["tiny"], random_seed)
    file = resolve_weights("semvae", path)
    spec = _weights_spec("semvae", file.name, semvae_config_for_file(file, preset), file)
    # The SemVAE is small: identify it by the loaded model's weights, whatever the file format
    # (the authors' .pt and its copy stored in the cache are then the same SemVAE).
    spec["weights_sha256"] = weights_identity(build_semvae(spec).state_dict(), spec["config"])
    return spec


def semvae_plan_spec(preset: str) -> Spec:
    """The SemVAE is trained on this cache's DINO features after encoding (its hash comes later)."""
    if preset not in SEMVAE_PRESETS:
        raise ConfigError(f"unknown SemVAE preset {preset!r}; choose one of {sorted(SEMVAE_PRESETS)}")
    return {"kind": "trained-on-this-cache", "name": f"semvae-{preset}", "preset": preset, "config": to_dict(SEMVAE_PRESETS[preset])}


def spec_latent_shapes(tex: Spec, dino: Spec, sem: Spec, image_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int]]:
    """(texture_shape, semantic_shape, dino_shape) of one image, from the specs alone."""
    if tex["kind"] == "standin":
        texture_shape = PixelUnshuffleAutoencoder(int(tex["factor"])).latent_shape(image_size)
    else:
        tcfg = from_dict(TextureVAEConfig, dict(tex["config"]))
        f = tcfg.downsample_factor
        if image_size % f:
            raise ConfigError(f"image size {image_size} is not a multiple of the texture VAE factor {f}")
        texture_shape = (tcfg.embed_dim, image_size // f, image_size // f)
    dcfg = from_dict(DinoConfig, dict(dino["config"]))
    grid = dcfg.img_size // dcfg.patch_size
    scfg = from_dict(SemVAEConfig, dict(sem["config"]))
    if scfg.input_dim != dcfg.embed_dim:
        raise ConfigError(f"SemVAE input_dim {scfg.input_dim} does not match the DINO width {dcfg.embed_dim}")
    return texture_shape, (scfg.bottleneck_dim, grid, grid), (grid * grid, dcfg.embed_dim)


def build_texture_encoder(spec: Spec) -> nn.Module:
    from sfd.models.autoencoder import AutoencoderKL, load_texture_vae

    if spec["kind"] == "standin":
        return PixelUnshuffleAutoencoder(int(spec["factor"]), float(spec["scale"])).eval()
    cfg = from_dict(TextureVAEConfig, dict(spec["config"]))
    if spec["kind"] == "random-init":
        return random_init(AutoencoderKL, cfg, int(spec["seed"]))
    return load_texture_vae(spec["path"], cfg=cfg)


def build_dino(spec: Spec) -> nn.Module:
    from sfd.models.dino import DinoEncoder, load_dino

    cfg = from_dict(DinoConfig, dict(spec["config"]))
    if spec["kind"] == "random-init":
        return random_init(DinoEncoder, cfg, int(spec["seed"]))
    return load_dino(spec["path"], cfg=cfg)


def build_semvae(spec: Spec) -> nn.Module:
    from sfd.models.semvae import SemVAE, load_semvae

    cfg = from_dict(SemVAEConfig, dict(spec["config"]))
    if spec["kind"] == "random-init":
        return random_init(SemVAE, cfg, int(spec["seed"]))
    if spec["kind"] != "weights":
        raise ConfigError(f"SemVAE spec of kind {spec['kind']!r} has no weights to load")
    return load_semvae(spec["path"], cfg=cfg)


def check_weights_unchanged(spec: Spec) -> None:
    """Workers re-check the file hash: a weight file replaced under a running job is an error."""
    if spec.get("kind") == "weights" and file_sha256(spec["path"]) != spec["sha256"]:
        raise WeightsError(f"weight file {spec['path']} changed since the job started (SHA-256 differs)")


# ---- the work of one shard ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs (picklable, sent to Ray actors)."""

    task: str  # "encode" or "semantic"
    cache_path: str
    images_root: str
    image_size: int
    seed: int  # posterior-noise seed (cache attribute)
    texture: Spec | None = None
    dino: Spec | None = None
    semvae: Spec | None = None  # encode: semantic latents in the same pass; semantic: required
    batch_size: int = 32  # images per forward (×2 with the flipped copies)
    precision: str = "fp32"  # "fp32" (authors) or "bf16" (autocast, opt-in)
    tf32: bool = True  # the entry point's TF32 choice, applied in the worker process (sfd.runtime)
    device: str = "auto"
    threads: int = 1  # torch intra-op threads
    decode_threads: int = 0  # 0: decode inline; >0: a thread pool overlapping decode and compute


class ShardWorker:
    """Encodes whole shards of a cache. Plain class: Ray wraps it as an actor, benches call it."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        torch.set_num_threads(max(1, settings.threads))
        if settings.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(settings.device)
        # A worker is its own process (a Ray actor): it applies the policy the entry point chose.
        set_precision(self.device, settings.tf32)  # the authors' extractor: fp32 with TF32 (docs/method.md §3.4)
        self.cache = LatentCache.open(settings.cache_path, mode="r+")
        self.root = Path(settings.images_root)
        self.vae = self.dino = self.semvae = None
        if settings.task == "encode":
            assert settings.texture is not None and settings.dino is not None
            for spec in (settings.texture, settings.dino, settings.semvae):
                if spec is not None:
                    check_weights_unchanged(spec)
            self.vae = build_texture_encoder(settings.texture).to(self.device)
            self.dino = build_dino(settings.dino).to(self.device)
        elif settings.task != "semantic":
            raise ValueError(f"unknown task {settings.task!r}")
        if settings.semvae is not None:
            check_weights_unchanged(settings.semvae)
            self.semvae = build_semvae(settings.semvae).to(self.device)
        elif settings.task == "semantic":
            raise ValueError("the semantic pass needs a SemVAE spec")
        self.pool = ThreadPoolExecutor(settings.decode_threads) if settings.decode_threads > 0 else None

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device), "threads": torch.get_num_threads()}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, torch.bfloat16 if self.s.precision == "bf16" else None)

    def _semantic_latent(self, tokens: torch.Tensor, rows: Sequence[int], flips: Sequence[int]) -> torch.Tensor:
        from sfd.models.semvae import tokens_to_latent

        z = semvae_sample(self.semvae, tokens, row_generators(self.s.seed, "semantic", rows, flips))
        return tokens_to_latent(z)  # (B, C, 16, 16), row-major as the authors (docs/method.md §2.2)

    @torch.no_grad()
    def encode_shard(self, shard_id: int) -> dict[str, Any]:
        """Decode, encode and write one whole shard (flag last); returns counts and timings."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        layout = self.cache.layout
        start, stop = layout.shard_rows(shard_id)
        n = stop - start
        rel_paths = [str(p) for p in self.cache.group["paths"][start:stop]]
        load = lambda rel: load_image(self.root / rel, self.s.image_size)
        decoded = self.pool.map(load, rel_paths) if self.pool is not None else map(load, rel_paths)

        texture = np.zeros((n, NUM_FLIPS, *layout.texture_shape), dtype=np.float32)
        semantic = np.zeros((n, NUM_FLIPS, *layout.semantic_shape), dtype=np.float32)
        dino = np.zeros((n, NUM_FLIPS, *layout.dino_shape), dtype=np.float16) if layout.dino_shape else None
        valid = np.zeros(n, dtype=bool)
        reasons: list[str | None] = [None] * n
        t_decode = t_compute = 0.0

        batch_idx: list[int] = []
        batch_img: list[np.ndarray] = []

        def flush() -> None:
            nonlocal t_compute
            tc = time.perf_counter()
            b = len(batch_idx)
            imgs = np.stack(batch_img)
            x = to_model_input(np.concatenate([imgs, hflip(imgs)])).to(self.device)  # [2b, 3, H, W]
            rows = [start + i for i in batch_idx] * 2
            flips = [0] * b + [1] * b
            with self._autocast():
                z_tex = self.vae.encode(x, generator=row_generators(self.s.seed, "texture", rows, flips))
                feats = self.dino(x).float()  # (2b, 256, D) final-norm patch tokens
                z_sem = self._semantic_latent(feats, rows, flips) if self.semvae is not None else None
            idx = np.asarray(batch_idx)
            texture[idx] = z_tex.float().cpu().numpy().reshape(2, b, *layout.texture_shape).swapaxes(0, 1)
            if z_sem is not None:
                semantic[idx] = z_sem.float().cpu().numpy().reshape(2, b, *layout.semantic_shape).swapaxes(0, 1)
            if dino is not None:
                dino[idx] = feats.half().cpu().numpy().reshape(2, b, *layout.dino_shape).swapaxes(0, 1)
            batch_idx.clear()
            batch_img.clear()
            t_compute += time.perf_counter() - tc

        td = time.perf_counter()
        for i, (img, reason) in enumerate(decoded):
            if img is None:
                reasons[i] = reason
            else:
                valid[i] = True
                batch_idx.append(i)
                batch_img.append(img)
            if len(batch_idx) == self.s.batch_size:
                t_decode += time.perf_counter() - td
                flush()
                td = time.perf_counter()
        t_decode += time.perf_counter() - td
        if batch_idx:
            flush()

        tw = time.perf_counter()
        # Without a SemVAE in this pass the cache has semantic_pass=True and takes None (zeros).
        self.cache.write_shard(
            shard_id, texture, semantic if self.semvae is not None else None, dino, valid=valid, reasons=reasons
        )
        t_write = time.perf_counter() - tw
        return {
            "shard": shard_id, "rows": n, "valid": int(valid.sum()), "seconds": time.perf_counter() - t0,
            "decode_s": t_decode, "compute_s": t_compute, "write_s": t_write, "pid": os.getpid(),
            "cpu_s": time.process_time() - cpu0,  # this process's CPU time (all its threads)
        }

    @torch.no_grad()
    def semantic_shard(self, shard_id: int) -> dict[str, Any]:
        """Semantic latents of one encoded shard from its stored fp16 DINO features."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        layout = self.cache.layout
        start, stop = layout.shard_rows(shard_id)
        n = stop - start
        feats_all = np.asarray(self.cache.group["dino"][start:stop])  # (n, 2, 256, D) fp16
        valid = np.asarray(self.cache.group["valid"][start:stop], dtype=bool)
        semantic = np.zeros((n, NUM_FLIPS, *layout.semantic_shape), dtype=np.float32)
        idx_all = np.flatnonzero(valid)
        for b0 in range(0, len(idx_all), self.s.batch_size):
            idx = idx_all[b0 : b0 + self.s.batch_size]
            b = len(idx)
            tokens = torch.from_numpy(feats_all[idx].swapaxes(0, 1).reshape(2 * b, *layout.dino_shape))
            rows = [start + int(i) for i in idx] * 2
            flips = [0] * b + [1] * b
            with self._autocast():
                z = self._semantic_latent(tokens.to(self.device).float(), rows, flips)
            semantic[idx] = z.float().cpu().numpy().reshape(2, b, *layout.semantic_shape).swapaxes(0, 1)
        self.cache.write_semantic(shard_id, semantic)
        return {
            "shard": shard_id, "rows": n, "valid": int(valid.sum()), "seconds": time.perf_counter() - t0,
            "pid": os.getpid(), "cpu_s": time.process_time() - cpu0,
        }

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


__all__ = [
    "row_seed",
    "row_generators",
    "semvae_sample",
    "identity",
    "texture_spec",
    "dino_spec",
    "semvae_spec",
    "semvae_plan_spec",
    "semvae_config_for_file",
    "spec_latent_shapes",
    "build_texture_encoder",
    "build_dino",
    "build_semvae",
    "WorkerSettings",
    "ShardWorker",
]
