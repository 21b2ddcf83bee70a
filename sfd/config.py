"""Typed configs and named presets.

Every entry point owns one dataclass config. Presets are plain Python values selected by name;
any field can be overridden with ``key=value`` strings (nested fields with dots). Unknown keys
are errors everywhere: a typo in a flag or in a saved JSON never silently falls back to a default.

Every entry point's config lives here (one front-end), which is why this file is longer than
~600 lines: models, encoders, training runs and sampling settings, with their presets.

Model field names are the authors' LightningDiT constructor arguments, so the ``config`` JSON
stored with their checkpoints (and with the golden vectors in ``tests/data/golden``) parses as-is.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be built: unknown key, bad type, unknown preset."""


# Fields that name a choice are checked against the choice's registry (sfd/registry.py), which
# lives beside the implementation in a module that imports this one: it is imported when a value
# is checked. The presets below are built while this module is still loading, before such an
# import can work, so their choices are not checked then (tests/test_registry.py checks them).
_loaded = False


def _choice(field: str, value: str, registry: str) -> list[str]:
    """[] if ``value`` is a name in the registry ``registry`` ("module:NAME"), else the problem."""
    if not _loaded:
        return []
    module, attr = registry.split(":")
    names = getattr(importlib.import_module(module), attr)
    return [] if value in names else [f"{field} must be one of {' | '.join(names)}, got {value!r}"]


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Generic strict (de)serialisation


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value (or a CLI string) to the annotated type, strictly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        items = [_coerce(item_t, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {args}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    where = where or cls.__name__
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(types_)}"
        )
    kwargs = {k: _coerce(types_[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a (nested) dataclass config."""
    return json.loads(to_json(cfg))


def to_json(cfg: Any, indent: int | None = 2) -> str:
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    return json.dumps(cfg, default=default, indent=indent, sort_keys=False)


def override(cfg: T, assignments: list[str] | tuple[str, ...]) -> T:
    """Return ``cfg`` with ``key=value`` (or ``a.b=value``) assignments applied strictly.

    All assignments are applied before the config is validated, so changes that only make
    sense together (``in_channels`` with ``semantic_chans``) can be given in any order.
    """
    data = _shallow_dict(cfg)
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} is not of the form key=value")
        key, value = assignment.split("=", 1)
        key = getattr(type(cfg), "ALIASES", {}).get(key.strip(), key.strip())
        _assign(type(cfg), data, key.split("."), value, key)
    return from_dict(type(cfg), data)


def _shallow_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _assign(cls: type, data: dict[str, Any], parts: list[str], value: str, full_key: str) -> None:
    types_ = _field_types(cls)
    name = parts[0]
    if name not in types_:
        raise ConfigError(f"unknown key {full_key!r} for {cls.__name__}; valid keys are {sorted(types_)}")
    tp = types_[name]
    if len(parts) > 1:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{full_key!r}: {name} has no sub-fields")
        child = data[name]
        if dataclasses.is_dataclass(child):
            child = data[name] = _shallow_dict(child)
        _assign(tp, child, parts[1:], value, full_key)
        return
    if value.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        data[name] = None
    elif value.startswith("{") or value.startswith("["):
        data[name] = _coerce(tp, json.loads(value), full_key)
    else:
        data[name] = _coerce(tp, value, full_key)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelConfig:
    """LightningDiT for SFD. Field names follow the authors' constructor arguments.

    Defaults are LightningDiT-XL/1 as configured for the released SFD checkpoints
    (docs/method.md §5): patch 1 on the 16x16x48 composite latent, qk-norm, SwiGLU, 2-D RoPE,
    RMSNorm, adaLN-Zero with shift, REPA projector on block 2 onto 768-d DINOv2-B targets.
    """

    input_size: int = 16  # latent side (256 px / f16)
    patch_size: int = 1
    in_channels: int = 48  # texture 32 + semantic 16 (texture first)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 * mlp_ratio * hidden_size)
    class_dropout_prob: float = 0.1  # label dropout to the null class (index num_classes)
    num_classes: int = 1000
    use_qknorm: bool = True
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    learn_sigma: bool = False
    use_repa: bool = True
    repa_dino_version: str = "dinov2_vitb14_reg"
    repa_depth: int = 2  # 1-indexed block whose output feeds the REPA projector
    repa_projector_dim: int = 2048
    repa_target_dim: int = 768  # DINOv2-B feature width (ours; the authors derive it from the name)
    semantic_chans: int = 16  # last channels of the composite latent; 0 = plain LightningDiT
    semfirst_delta_t: float = 0.3  # Δt the checkpoint was trained with (sampling default)
    # Ours: the map from the global clock to (t_tex, t_sem). "offset" = the paper's constant lead
    # Δt; "power" = a smooth monotone pair whose largest lead is Δt (sfd/diffusion.py). Stored with
    # the weights like Δt, so every sampler follows the schedule the model was trained with.
    semfirst_schedule: str = "offset"
    # Ours: the "learned" schedule's parameters, the lead t_sem − t_tex at K equally spaced values
    # of the clock (sfd.diffusion.LearnedSchedule); the trainer fits and writes them (TrainConfig
    # schedule_*). Empty = the offset path for Δt; must be empty for the fixed schedules.
    semfirst_schedule_knots: tuple[float, ...] = ()
    # Our extension: how time enters the network. "dual" = two half-width embedders
    # concat[emb_sem(t_sem), emb_tex(t_tex)] (every SFD checkpoint); "single" = the authors'
    # single-timestep LightningDiT layout (`t_embedder.*`), which they silently use for Δt = 0.
    timestep_embedding: str = "dual"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        _raise(_choice("semfirst_schedule", self.semfirst_schedule, "sfd.diffusion:SCHEDULES"))
        if _loaded:
            from sfd.diffusion import SCHEDULES

            _raise([f"semfirst_delta_t: {p}" for p in SCHEDULES[self.semfirst_schedule].check(self.semfirst_delta_t)])
            try:
                SCHEDULES[self.semfirst_schedule].with_knots(self.semfirst_schedule_knots)
            except ValueError as e:
                raise ConfigError(f"semfirst_schedule={self.semfirst_schedule}: {e}") from e
        if self.timestep_embedding not in ("dual", "single"):
            raise ConfigError(f"timestep_embedding must be 'dual' or 'single', got {self.timestep_embedding!r}")
        if self.timestep_embedding == "dual" and self.hidden_size % 2:
            raise ConfigError("dual timestep embedding needs an even hidden_size")
        if not 0 <= self.semantic_chans < self.in_channels:
            raise ConfigError(f"semantic_chans {self.semantic_chans} must lie in [0, in_channels)")
        if self.use_repa and not 1 <= self.repa_depth <= self.depth:
            raise ConfigError(f"repa_depth {self.repa_depth} must lie in [1, depth={self.depth}]")

    @property
    def texture_chans(self) -> int:
        return self.in_channels - self.semantic_chans

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def swiglu_hidden(self) -> int:
        return int(2 / 3 * self.mlp_ratio * self.hidden_size)


def _dit(hidden_size: int, depth: int, num_heads: int, **kw: Any) -> ModelConfig:
    return ModelConfig(hidden_size=hidden_size, depth=depth, num_heads=num_heads, **kw)


# The paper's names (docs/method.md §5.1). "1p0B/1" is the paper's "XXL".
MODEL_PRESETS: dict[str, ModelConfig] = {
    "LightningDiT-S/1": _dit(384, 12, 6),
    "LightningDiT-B/1": _dit(768, 12, 12),
    "LightningDiT-L/1": _dit(1024, 24, 16),
    "LightningDiT-XL/1": _dit(1152, 28, 16),
    "LightningDiT-1p0B/1": _dit(1536, 24, 24),
    "LightningDiT-1p6B/1": _dit(1792, 28, 28),
    # Tests and the CPU demo: every code path, a few hundred thousand parameters.
    "tiny": _dit(64, 2, 2, repa_projector_dim=64, input_size=8, num_classes=10),
}
MODEL_ALIASES = {
    "S/1": "LightningDiT-S/1",
    "B/1": "LightningDiT-B/1",
    "L/1": "LightningDiT-L/1",
    "XL/1": "LightningDiT-XL/1",
    "1p0B/1": "LightningDiT-1p0B/1",
    "XXL/1": "LightningDiT-1p0B/1",
    "1p6B/1": "LightningDiT-1p6B/1",
}


def model_preset(name: str, *overrides: str) -> ModelConfig:
    """Model config by the paper's name (``LightningDiT-XL/1``, ``XL/1``, ``tiny`` ...)."""
    key = MODEL_ALIASES.get(name, name)
    if key not in MODEL_PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS) + sorted(MODEL_ALIASES)}"
        )
    return override(MODEL_PRESETS[key], list(overrides))


# The authors derive the REPA target width from the encoder name (lightningdit.py:404-416).
REPA_TARGET_DIMS = {
    "dinov2_vits14": 384,
    "dinov2_vits14_reg": 384,
    "dinov2_vitb14": 768,
    "dinov2_vitb14_reg": 768,
    "dinov2_vitl14": 1024,
    "dinov2_vitl14_reg": 1024,
    "mae_base": 768,
    "mae_large": 1024,
    "clip_vit_base_patch16": 768,
    "clip_vit_large_patch14": 1024,
    "siglip_base_patch16_224": 768,
}


def model_config_from_json(data: dict[str, Any], where: str = "LightningDiT config") -> ModelConfig:
    """ModelConfig from stored constructor arguments (ours or the authors').

    The authors' constructor has no ``timestep_embedding``: they use one embedder unless
    Δt > 0 and semantic_chans > 0 (lightningdit.py:362-367), so that is the default here.
    """
    data = dict(data)
    if "timestep_embedding" not in data:
        sem_first = data.get("semfirst_delta_t", 0.0) > 0 and data.get("semantic_chans", 0) > 0
        data["timestep_embedding"] = "dual" if sem_first else "single"
    if "repa_target_dim" not in data and data.get("repa_dino_version") in REPA_TARGET_DIMS:
        data["repa_target_dim"] = REPA_TARGET_DIMS[data["repa_dino_version"]]
    return from_dict(ModelConfig, data, where=where)


def model_config_from_authors(train_config: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the authors' training YAML (as stored in their ``{..., config}`` .pt).

    Mirrors how their ``train.py`` builds the model, including its defaults for absent keys.
    """
    try:
        m, data = train_config["model"], train_config["data"]
        name = m["model_type"]
        base, patch = name.rsplit("/", 1)
        arch = MODEL_PRESETS[f"{base}/1"]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"not an SFD/LightningDiT training config (model.model_type etc.): {e!r}"
        ) from e
    downsample = train_config.get("vae", {}).get("downsample_ratio", 16)
    semantic_chans = m.get("semantic_chans", 0)
    delta_t = float(m.get("semfirst_delta_t", 0.0))
    use_repa = bool(m.get("use_repa", False))
    dino = m.get("repa_dino_version") or "dinov2_vitb14_reg"
    return ModelConfig(
        input_size=data["image_size"] // downsample,
        patch_size=int(patch),
        in_channels=m.get("in_chans", 4),
        hidden_size=arch.hidden_size,
        depth=arch.depth,
        num_heads=arch.num_heads,
        class_dropout_prob=m.get("class_dropout_prob", 0.1),
        num_classes=data["num_classes"],
        use_qknorm=m["use_qknorm"],
        use_swiglu=m.get("use_swiglu", False),
        use_rope=m.get("use_rope", False),
        use_rmsnorm=m.get("use_rmsnorm", False),
        wo_shift=m.get("wo_shift", False),
        use_repa=use_repa,
        repa_dino_version=dino,
        repa_depth=m.get("repa_feat_depth", 2) if use_repa else 2,
        repa_target_dim=REPA_TARGET_DIMS.get(dino, 768),
        semantic_chans=semantic_chans,
        semfirst_delta_t=delta_t,
        timestep_embedding="dual" if delta_t > 0 and semantic_chans > 0 else "single",
    )


# ---------------------------------------------------------------------------------------------
# Encoders


@dataclass(frozen=True)
class TextureVAEConfig:
    """LDM AutoencoderKL (``ddconfig`` names). Default: hustvl's f16d32 (docs/method.md §2.1)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 32
    embed_dim: int = 32
    double_z: bool = True
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


TEXTURE_VAE_PRESETS: dict[str, TextureVAEConfig] = {
    # hustvl ldm-imagenet256-f16d32-50ep.ckpt: the SFD texture VAE.
    "f16d32": TextureVAEConfig(),
    # Classic SD-VAE kl-f8 (4 channels) for users who bring their own.
    "f8c4": TextureVAEConfig(ch_mult=(1, 2, 4, 4), attn_resolutions=(), z_channels=4, embed_dim=4),
    # Tests: f4, 8 channels, 32x32 input.
    "tiny": TextureVAEConfig(
        ch=32, ch_mult=(1, 2, 2), attn_resolutions=(16,), resolution=32, z_channels=8, embed_dim=8
    ),
}


@dataclass(frozen=True)
class SemVAEConfig:
    """Semantic VAE (authors' ``transformer`` arch, names as their constructor, docs/method.md §3)."""

    input_dim: int = 768
    bottleneck_dim: int = 16
    hidden_dim: int = 768
    arch: str = "transformer"
    transformer_heads: int = 6
    transformer_blocks: int = 4

    def __post_init__(self) -> None:
        if self.arch != "transformer":
            raise ConfigError(f"SemVAE arch {self.arch!r} is not supported (only 'transformer')")


SEMVAE_PRESETS: dict[str, SemVAEConfig] = {
    "transformer_ch16": SemVAEConfig(),
    "tiny": SemVAEConfig(input_dim=64, bottleneck_dim=4, hidden_dim=64, transformer_heads=2, transformer_blocks=1),
}


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2 with registers through timm. Default: ViT-B/14-reg4 at 224² → 256×768 tokens."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    num_register_tokens: int = 4
    img_size: int = 224  # input resolution (patch grid 16x16 at patch 14)
    pretrained_img_size: int = 518  # the checkpoint's position-embedding grid (37x37)
    mlp_ratio: float = 4.0
    init_values: float = 1.0  # LayerScale
    # How the checkpoint's 37x37 position grid is resampled: the *_reg hub models' settings,
    # which timm's one-time resampling at load reproduces exactly (golden test).
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0


DINO_PRESETS: dict[str, DinoConfig] = {
    "dinov2_vitb14_reg": DinoConfig(),
    "tiny": DinoConfig(embed_dim=64, depth=2, num_heads=2),
}


# ---------------------------------------------------------------------------------------------
# Pipeline jobs: the encode job and Semantic-VAE training

ENCODE_STAGES = ("encode", "semvae", "semantic", "stats")


@dataclass
class EncodeConfig:
    """The encode job (pipeline/encode.py): images to a latent cache; defaults as the authors' extractor."""

    images: str
    out: str
    image_size: int = 256  # ADM centre crop side (px)
    texture: str = "f16d32"  # texture-VAE preset, or standin-fN (pixel-unshuffle stand-in, not a VAE)
    texture_vae: str | None = None  # weight file; default weights/ldm-imagenet256-f16d32-50ep.ckpt
    dino: str | None = None  # weight file; default weights/dinov2_vitb14_reg4_pretrain.pth
    dino_preset: str = "dinov2_vitb14_reg"  # DINOv2 architecture of the --dino file
    semvae: str | None = None  # weight file, or "random" (tests); None: train one on this cache
    semvae_preset: str = "transformer_ch16"  # architecture to train (or of an authors' .pt file)
    random_encoders: int | None = None  # seed: random-init tiny encoders instead of weight files
    repa_targets: str = "store"  # store | none
    row_order: str = "permuted"  # permuted (fixed seed) | sorted
    order_seed: int = 0  # seed of the permuted row order
    seed: int = 0  # posterior-noise seed
    rows_per_shard: int = 1024  # work unit (rows written by one actor at a time)
    rows_per_chunk: int = 64  # zarr chunk rows (divides rows_per_shard)
    batch_size: int = 32  # images per forward (×2 with flips)
    precision: str = "fp32"  # fp32 (authors) | bf16 (autocast, opt-in)
    tf32: bool = True  # allow TF32 matmuls on GPU (the authors' setting)
    device: str = "auto"  # auto | cuda | cpu
    num_workers: int | None = None  # actors; default one per GPU, or CPUs // threads_per_worker
    threads_per_worker: int | None = None  # torch threads per actor (CPU default 1, GPU 2)
    cpus_per_worker: float | None = None  # Ray CPU reservation per actor (fractional allowed)
    decode_threads: int | None = None  # image-decoding threads per actor (GPU default 8, CPU 0)
    max_retries: int = 3  # attempts per shard after a failure
    ray_address: str | None = None  # default: RAY_ADDRESS or a local Ray instance
    ray_num_cpus: int | None = None  # CPUs of a local Ray instance (default: all)
    stages: str = ",".join(ENCODE_STAGES)  # comma-separated subset of encode,semvae,semantic,stats
    semvae_dir: str | None = None  # default <out>.semvae
    semvae_steps: int = 1_000_000  # authors: 1M iterations at batch 64
    semvae_batch_size: int = 64  # SemVAE training batch per process (authors: 64)
    semvae_nproc: int = 1  # >1: torchrun DDP on this host
    semvae_args: str = ""  # extra flags for pipeline/train_semvae.py
    stats_samples: int = 10_000  # rows for the statistics (authors: 10,000)
    stats_seed: int = 0  # seed of the rows drawn for the statistics
    verify: bool = False  # decode every file of the finished shards (checksums) before the stages


@dataclass
class TrainSemVAEConfig:
    """Semantic-VAE training (pipeline/train_semvae.py); ``preset`` names the architecture
    (:data:`SEMVAE_PRESETS`). Defaults are the authors' recipe (docs/method.md §3)."""

    cache: str
    run_dir: str
    preset: str = "transformer_ch16"  # SemVAE architecture (tiny for tests)
    steps: int = 1_000_000  # authors: 1M iterations
    batch_size: int = 64  # per process (authors: 64)
    lr: float = 5e-5  # AdamW learning rate (authors: 5e-5)
    weight_decay: float = 0.01  # torch AdamW default, as the authors
    warmup_steps: int = 500  # from warmup_start × lr; capped at steps // 10
    warmup_start: float = 0.01  # warm-up starts at this × lr
    decay_start: float = 0.8  # fraction of the run where the cosine decay begins
    final_lr: float = 0.1  # × lr at the last step
    kl_weight: float = 1e-7  # weight of the KL term (authors: 1e-7)
    cos_axis: str = "token"  # token (authors' code) | feature (per-token cosine)
    window_chunks: int = 16  # zarr chunks shuffled together (memory ≈ 2 windows)
    seed: int = 0  # data order and initialisation seed
    ckpt_every: int = 10_000  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept (older ones deleted)
    log_every: int = 100  # steps between log lines
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cuda | cpu
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this run


# ---------------------------------------------------------------------------------------------
# Training runs


@dataclass(frozen=True)
class TrainConfig:
    """One SFD training run. Defaults are the authors' released recipe (docs/method.md §6)."""

    model: ModelConfig = ModelConfig()
    model_name: str = "LightningDiT-XL/1"  # the preset the model came from (for logs and run names)
    cache: str = "data/cache/imagenet256"  # latent cache built by `just encode imagenet`
    out_dir: str = "runs/sfd-xl"
    # Optimisation (AdamW, constant lr, no warm-up, no weight decay).
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off (the authors clip nothing)
    # fused (sfd.optim.FusedAdamWEMA: clip scale + AdamW + EMA in one pass, compiled unless
    # kernels=eager) | torch (torch.optim.AdamW, then a separate EMA lerp). Same maths and state dict.
    optimizer: str = "fused"
    # Ours: from this fraction of max_steps on, lr falls linearly to 0 at max_steps; 1.0 = the
    # authors' constant lr. For short budgets (the CPU demo), where a constant lr plateaus.
    lr_decay_start: float = 1.0
    global_batch: int = 256  # images per optimiser step over all ranks
    micro_batch: int = 0  # per-rank batch per forward; 0 = global_batch / world_size
    max_steps: int = 4_000_000  # 400K ≈ 80 epochs, 4M ≈ 800 epochs of ImageNet
    ema_decay: float = 0.9999  # every step, from a synced copy at step 0
    # Ours (EDM2's post-hoc EMA, docs/method.md §15): power-function EMA profiles of these relative
    # widths, e.g. "0.05,0.1" (EDM2's pair); "" = off, the authors' recipe (the classic EMA above is
    # kept either way). Their snapshots let eval/posthoc_ema.py rebuild any width after training.
    posthoc_ema_sigma_rel: str = ""
    ema_snapshot_every: int = 0  # steps between profile snapshots; 0 = EDM2's 8M images / global_batch
    # Asynchronous flow matching (docs/method.md §4). Δt is model.semfirst_delta_t (stored with the
    # weights, read back by the samplers); `delta_t` is its alias in overrides and a property here.
    # False = plain LightningDiT(+REPA) on the texture channels of the same cache (no semantic
    # channels: needs model.semantic_chans=0, model.in_channels=cache texture channels, delta_t=0).
    use_semantic: bool = True
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    semantic_weight: float = 2.0  # β on the semantic channels of the velocity MSE
    use_cosine_loss: bool = True
    repa_weight: float = 1.0  # λ; 0 = REPA off
    repa_mode: str = "cos"  # cos | mse | cos_mse (sfd.diffusion.REPA_MODES)
    repa_targets: str = "stored"  # stored (cache's DINO tokens) | semvae (decoded from the semantic latent) | none (sfd.repa_targets.REPA_TARGET_SOURCES)
    mask_clamped: bool = False  # ours, off = faithful: drop the clamped parts from the loss (docs/method.md §12.3 item 7)
    # Ours: fitting model.semfirst_schedule=learned while training (sfd/schedule_learning.py;
    # ignored by the fixed schedules). The knots move every `schedule_update_every` steps (0 = they
    # stay as given) until step `schedule_learn_until` (0 = the whole run).
    schedule_update_every: int = 1000
    schedule_explore: float = 0.25  # share of each batch drawn over the whole t_sem >= t_tex triangle while learning
    schedule_decay: float = 0.999  # per-step decay of the error histogram
    schedule_step: float = 0.5  # share of the way the knots move to each new best path
    schedule_kinetic: float = 0.01  # weight of the clock's kinetic-energy penalty in the path search
    schedule_learn_until: int = 0
    schedule_grid: int = 16  # G: the search grid is G × G and the path has 2G + 1 knots (when the model has none)
    # Performance policy, decided once in main().
    precision: str = "bf16"  # bf16 autocast (CUDA or CPU autocast) | fp32
    # eager | compile (torch.compile of model + loss, before DDP) | triton (compile + the fused
    # ops of sfd/kernels; falls back to compile off CUDA). docs/performance.md has the budget.
    kernels: str = "compile"
    tf32: bool = True  # TF32 matmuls/convs on CUDA
    # autocast (each forward casts the fp32 weights to bf16) | optimizer (the optimizer pass also
    # writes bf16 copies the forward reads; fp32-output weight-gradient GEMMs; sfd/weight_copies.py).
    # Same forward maths; 8 fewer bytes per parameter per step on a GPU. Needs precision=bf16.
    weight_cast: str = "autocast"
    profile_steps: str = ""  # "A:B": torch.profiler trace of steps A..B-1 into <out_dir>/profile/ (sfd/runlog.py)
    grad_checkpointing: bool = False  # recompute block activations in backward (the authors' flag was never wired, §12.3 bug 12)
    # Bookkeeping.
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 3
    sample_every: int = 20_000  # EMA sample grid every N steps; 0 = off
    texture_vae: str = ""  # texture VAE weights for sample-grid PNGs; "" = weights/ldm-imagenet256-f16d32-50ep.ckpt if it exists
    tensorboard: bool = False  # also log to <out_dir>/tb (tensorboard --logdir runs) beside metrics.jsonl
    # Ours: quality measured during training from the EMA weights (sfd/evaluators.py); 0 = off.
    eval_every: int = 0  # every N steps (and at the end): eval_samples class-balanced samples, scored, logged
    eval_samples: int = 0  # samples per evaluation, a multiple of the classes, split across the ranks
    eval_metric: str = "fid"  # fid (needs eval_ref) | judge (the demo: eval_judge + eval_judge_ref)
    eval_ref: str = ""  # reference statistics .npz from `eval/fid.py ref` (mu, sigma of Inception pool features)
    eval_inception: str = ""  # Inception weights; "" = weights/pt_inception-2015-12-05-6726825d.pth; random = untrained (not FID)
    eval_judge: str = ""  # the demo judge's .safetensors
    eval_judge_ref: str = ""  # folder of real images the judge's FD is measured against
    eval_sampling: str = "heun"  # sampler preset of the evaluation (sfd.config.SAMPLING_PRESETS)
    eval_num_steps: int = 0  # fixed-step samplers: steps per sample; 0 = the preset's
    # Ours (the authors have none of these).
    data_mode: str = "pagecache"  # pagecache | memory: cache reader mode (sfd.data.reader.MODES)
    # full: every cache file the run reads has its checksums checked before step 1 (all ranks
    # share the reading); lazy: each file when first read (docs/reliability.md).
    verify: str = "full"  # full | lazy
    max_nan_skips: int = 100  # stop after this many consecutive non-finite steps (each one is skipped)
    init_from: str = ""  # weights to start from (authors' .pt or ours); ignored when resuming

    def __post_init__(self) -> None:
        _raise(_choice("repa_mode", self.repa_mode, "sfd.diffusion:REPA_MODES"))
        _raise(_choice("repa_targets", self.repa_targets, "sfd.repa_targets:REPA_TARGET_SOURCES"))
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if not 0.0 <= self.lr_decay_start <= 1.0:
            raise ConfigError(f"lr_decay_start must lie in [0, 1], got {self.lr_decay_start}")
        if self.delta_t < 0:
            raise ConfigError(f"delta_t must be >= 0, got {self.delta_t}")
        if self.global_batch <= 0 or self.micro_batch < 0:
            raise ConfigError("global_batch must be > 0 and micro_batch >= 0")
        _raise(_choice("kernels", self.kernels, "sfd.kernels:KERNELS"))
        _raise(_choice("data_mode", self.data_mode, "sfd.data.reader:MODES"))
        if self.profile_steps and not _is_step_window(self.profile_steps):
            raise ConfigError(f"profile_steps must be A:B with 0 <= A < B (e.g. 20:25), got {self.profile_steps!r}")
        _raise(_choice("optimizer", self.optimizer, "sfd.optim:OPTIMIZERS"))
        if self.weight_cast not in ("autocast", "optimizer"):
            raise ConfigError(f"weight_cast must be autocast or optimizer, got {self.weight_cast!r}")
        if self.weight_cast == "optimizer" and self.precision != "bf16":
            raise ConfigError("weight_cast=optimizer writes bf16 weight copies: it needs precision=bf16")
        if self.schedule_update_every < 0 or self.schedule_learn_until < 0 or self.schedule_grid < 1:
            raise ConfigError("schedule_update_every and schedule_learn_until must be >= 0, schedule_grid >= 1")
        for name in ("schedule_explore", "schedule_decay", "schedule_step"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.schedule_kinetic < 0:
            raise ConfigError(f"schedule_kinetic must be >= 0, got {self.schedule_kinetic}")
        _raise(_choice("eval_metric", self.eval_metric, "sfd.evaluators:EVALUATORS"))
        if self.eval_every < 0 or self.eval_samples < 0 or self.eval_num_steps < 0:
            raise ConfigError("eval_every, eval_samples and eval_num_steps must be >= 0")
        if self.posthoc_ema_sigma_rel:
            _check_sigma_rels("posthoc_ema_sigma_rel", self.posthoc_ema_sigma_rel)
        if self.ema_snapshot_every < 0:
            raise ConfigError(f"ema_snapshot_every must be >= 0 (0 = EDM2's 8M images), got {self.ema_snapshot_every}")

    @property
    def snapshot_interval(self) -> int:
        """Steps between post-hoc EMA snapshots (``ema_snapshot_every``, or EDM2's 8M images)."""
        if self.ema_snapshot_every:
            return self.ema_snapshot_every
        from sfd.posthoc_ema import EDM2_SNAPSHOT_IMAGES

        return max(1, round(EDM2_SNAPSHOT_IMAGES / self.global_batch))

    # Short names accepted by `override` (and so by `-o`): the one stored Δt is the model's.
    ALIASES: ClassVar[dict[str, str]] = {"delta_t": "model.semfirst_delta_t", "schedule": "model.semfirst_schedule"}

    @property
    def delta_t(self) -> float:
        """Semantic lead Δt; 0 = synchronous baseline (the model config's ``semfirst_delta_t``)."""
        return self.model.semfirst_delta_t


def _check_sigma_rels(field: str, text: str) -> None:
    """Refuse a post-hoc EMA width list that sfd.posthoc_ema cannot use, naming ``field``."""
    from sfd.posthoc_ema import parse_sigma_rels

    try:
        parse_sigma_rels(text)
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None


def _is_step_window(spec: str) -> bool:
    parts = spec.split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) < int(parts[1])


def _run(model_name: str, **kw: Any) -> TrainConfig:
    return TrainConfig(model=model_preset(model_name), model_name=model_name, **kw)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Released checkpoints (docs/method.md §6): lr 1e-4, β2 0.999, REPA 1.0·cos, batch 256.
    "sfd-xl": _run("LightningDiT-XL/1", out_dir="runs/sfd-xl"),
    "sfd-xxl": _run("LightningDiT-1p0B/1", out_dir="runs/sfd-xxl"),
    # AutoGuidance guide: B/1, same recipe, early checkpoints (60K-120K) are used.
    "sfd-b": _run("LightningDiT-B/1", out_dir="runs/sfd-b", max_steps=400_000),
    # The authors' later 80-epoch recipe (train_80ep_lr2e-4.yaml): lr 2e-4, β2 0.95, REPA 0.5·cos_mse.
    "sfd-xl-lr2e-4": _run(
        "LightningDiT-XL/1", out_dir="runs/sfd-xl-lr2e-4", lr=2e-4, beta2=0.95,
        repa_weight=0.5, repa_mode="cos_mse", max_steps=400_000,
    ),
    # Tests and the CPU demo.
    "tiny": _run(
        "tiny", out_dir="runs/tiny", global_batch=8, max_steps=200, precision="fp32",
        kernels="eager", log_every=10, ckpt_every=100, sample_every=0,
    ),
}


def train_preset(name: str, *overrides: str) -> TrainConfig:
    """Run config by preset name with ``key=value`` overrides (``model.depth=4`` reaches the model)."""
    return preset(TRAIN_PRESETS, name, "run", *overrides)


def preset(table: dict[str, T], name: str, kind: str, *overrides: str) -> T:
    if name not in table:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {sorted(table)}")
    return override(table[name], list(overrides))


# ---------------------------------------------------------------------------------------------
# Sampling

@dataclass(frozen=True)
class SamplingConfig:
    """Every setting that decides a sample besides the weights and the index (docs/method.md §7).

    Defaults are the authors' inference configs: dopri5, atol 1e-6, rtol 1e-3, no guidance, no
    timestep shift, CFG interval start 0 (off). Guidance: ``guide_ckpt`` set → AutoGuidance with
    ``ag_scale`` (all reported guided numbers, w ≈ 1.5); otherwise ``cfg_scale`` > 1 → CFG on all
    48 channels. ``cfg_scale_tex``/``cfg_scale_sem`` override the scale of the active guidance
    per part (the authors' ``cfg_scale_tex``/``cfg_scale_sem`` flags act on both kinds).
    """

    method: str = "dopri5"  # euler | heun | dopri5 (sfd.samplers.SAMPLERS)
    num_steps: int | None = None  # fixed-step solvers; None = sampler default (euler 250 points, heun 50)
    atol: float = 1e-6  # dopri5
    rtol: float = 1e-3  # dopri5
    grid: str | None = None  # exact | authors; None = sampler default (euler: authors, else exact)
    shift: float | None = None  # timestep shift s (fixed-step solvers); None = off as the authors
    cfg_scale: float = 1.0  # classifier-free guidance w; 1 = off
    cfg_scale_tex: float | None = None  # per-part override of the active guidance scale
    cfg_scale_sem: float | None = None
    cfg_interval_start: float = 0.0  # guidance off while a part's time is below this; 0 = off
    interval_mode: str = "both"  # both | tex | sem: which parts the interval applies to
    ag_scale: float = 1.0  # AutoGuidance w (with guide_ckpt)
    guide_ckpt: str | None = None  # weaker guide model for AutoGuidance
    delta_t: float | None = None  # None = the Δt the model was trained with
    seed: int = 0  # per-index seeds derive from this
    bf16: bool = False  # bf16 autocast for the DiT (the authors sample in fp32/TF32, §7.1)
    compile: str = "auto"  # torch.compile the guided velocity function: auto (on CUDA) | on | off

    def __post_init__(self) -> None:
        _raise(_choice("method", self.method, "sfd.samplers:SAMPLERS"))
        if self.grid is not None:
            _raise(_choice("grid", self.grid, "sfd.samplers:GRIDS"))
        _raise(_choice("interval_mode", self.interval_mode, "sfd.guidance:INTERVAL_MODES"))
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.method == "dopri5" and (self.num_steps is not None or self.shift is not None):
            raise ConfigError("dopri5 is adaptive: num_steps and shift apply to euler/heun only")
        if self.guide_ckpt is not None and self.cfg_scale != 1.0:
            # The authors use CFG only without AutoGuidance (forward_with_cfg vs _autoguidance).
            raise ConfigError("use either CFG (cfg_scale) or AutoGuidance (guide_ckpt + ag_scale), not both")
        if self.guide_ckpt is None and self.ag_scale != 1.0:
            raise ConfigError("ag_scale needs a guide checkpoint (guide_ckpt)")

    @property
    def scales(self) -> tuple[float, float]:
        """(texture, semantic) scale of the active guidance."""
        base = self.ag_scale if self.guide_ckpt is not None else self.cfg_scale
        tex = base if self.cfg_scale_tex is None else self.cfg_scale_tex
        sem = base if self.cfg_scale_sem is None else self.cfg_scale_sem
        return tex, sem

    @property
    def guidance(self) -> str:
        """"autoguidance", "cfg" or "none" (every scale 1 is no guidance, whatever the flags)."""
        if all(s == 1.0 for s in self.scales):
            return "none"
        return "autoguidance" if self.guide_ckpt is not None else "cfg"

    def solver_options(self) -> dict[str, Any]:
        """Keyword options for :func:`sfd.samplers.sample` (only those that are set)."""
        opts: dict[str, Any] = {}
        if self.grid is not None:
            opts["grid"] = self.grid
        if self.method == "dopri5":
            opts.update(atol=self.atol, rtol=self.rtol)
        else:
            if self.num_steps is not None:
                opts["num_steps"] = self.num_steps
            if self.shift is not None:
                opts["shift"] = self.shift
        return opts

    def describe(self) -> dict[str, Any]:
        """The settings that decide a sample, as plain JSON values, with the derived guidance mode
        and scales."""
        d = asdict(self)
        # Compiling changes how, not what, is computed (float rounding, like the batch size), so
        # it is not part of a sample's identity: eval/fid.py resumes across it.
        del d["compile"]
        d["guidance"] = self.guidance
        d["scale_tex"], d["scale_sem"] = self.scales
        return d


# Named sampling settings (sample/grid.py and eval/fid.py gen: --preset NAME).
SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "authors": SamplingConfig(),  # the authors' inference: dopri5, atol 1e-6, rtol 1e-3
    "heun": SamplingConfig(method="heun"),  # 50 Heun steps on the exact three-phase grid (100 NFE)
    "euler": SamplingConfig(method="euler"),  # 250 Euler points on the authors' grid
}


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation commands (sample/grid.py, eval/fid.py gen | ref | calc)


@dataclass(frozen=True)
class SampleSourceConfig:
    """What a sampling command loads (sfd.loading.load_pipeline) and how it samples. Every
    :class:`SamplingConfig` field is also a top-level key (``-o method=heun`` = ``-o sampling.method=heun``)."""

    ckpt: str = ""  # run dir (latest checkpoint), checkpoint dir, our .safetensors or the authors' .pt
    model: str | None = None  # architecture preset for files without a stored config, e.g. XL/1 for the authors' sfd_xl .pt
    guide_model: str | None = None  # architecture preset of the guide, e.g. B/1 for the authors' guide .pt
    ema: bool = True  # the EMA weights (false: the raw weights)
    stats: str | None = None  # texture latent statistics: a latent-cache dir, the authors' latents_stats.pt, or 'identity'; default: those stored with the checkpoint
    vae: str | None = None  # texture VAE weights (default weights/ldm-imagenet256-f16d32-50ep.ckpt)
    vae_preset: str = "f16d32"  # texture VAE architecture preset (f16d32 | f8c4 | tiny)
    sampling: SamplingConfig = SamplingConfig()  # solver, guidance, seed (docs/method.md §7)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (torchrun: cuda:LOCAL_RANK)
    tf32: bool = True  # TF32 matmuls on CUDA (the authors sample with TF32 on)

    ALIASES: ClassVar[dict[str, str]] = {
        **{f.name: f"sampling.{f.name}" for f in dataclasses.fields(SamplingConfig)},
        "guide": "sampling.guide_ckpt",
    }


@dataclass(frozen=True)
class GridConfig(SampleSourceConfig):
    """sample/grid.py: one row per class, a PNG with captions and a settings JSON beside it."""

    classes: str = "207,360,387,974,88,979,417,279"  # comma-separated labels (indices, or wnids/names with class_names or a cache); default: DiT's sample.py eight
    class_names: str | None = None  # text file, one class name per line in label order (captions and classes)
    per_class: int = 4  # samples per class (one row per class)
    real_images: str | None = None  # image folder <class>/<image>: each row starts with one real image of its class
    batch_size: int = 32  # samples per sampler call
    out: str = "grid.png"  # output PNG (a JSON with the settings is written beside it)


@dataclass(frozen=True)
class PosthocEmaConfig:
    """eval/posthoc_ema.py: EMA weights of chosen widths rebuilt from a run's post-hoc EMA snapshots."""

    run: str = ""  # run directory trained with -o posthoc_ema_sigma_rel=... (its ema_snapshots/)
    sigma_rel: str = "0.05,0.1"  # relative EMA widths to rebuild, comma-separated (EDM2: 0.05, 0.10)
    out: str = ""  # output folder: one checkpoint directory sigma_rel-<value>/ per width
    at_step: int = 0  # rebuild the EMA as it was at this step (snapshots up to it); 0 = the last snapshot

    def __post_init__(self) -> None:
        _check_sigma_rels("sigma_rel", self.sigma_rel)
        if self.at_step < 0:
            raise ConfigError(f"at_step must be >= 0 (0 = the last snapshot), got {self.at_step}")


@dataclass(frozen=True)
class GenConfig(SampleSourceConfig):
    """eval/fid.py gen: N class-balanced samples as {index:06d}.png (resumable; torchrun)."""

    out: str = ""  # sample folder ({index:06d}.png, gen.json, nfe logs)
    num_samples: int = 50_000  # N (the paper's FID-50K)
    num_classes: int | None = None  # classes to balance over; None = the model's
    batch_size: int = 32  # samples per sampler call and rank
    npz: str | None = None  # also pack the ADM sample batch here once all N exist
    shuffle_seed: int = 42  # npz order permutation seed (the authors' 42)
    max_batches: int | None = None  # stop after this many new batches per rank (chunked jobs); re-run to continue


# Named sampling settings for grid and gen (--preset): the sampling presets, everything else default.
GRID_PRESETS: dict[str, GridConfig] = {n: GridConfig(sampling=s) for n, s in SAMPLING_PRESETS.items()}
GEN_PRESETS: dict[str, GenConfig] = {n: GenConfig(sampling=s) for n, s in SAMPLING_PRESETS.items()}

DETECTORS = ("inception", "random")


@dataclass(frozen=True)
class DetectorConfig:
    """The feature detector of eval/fid.py ref and calc."""

    detector: str = "inception"  # inception = the FID weights (--inception); random = untrained (tests; never reported as FID)
    inception: str | None = None  # pt_inception-2015-12-05-6726825d.pth (default: weights/)
    batch_size: int = 250  # images per detector call
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"detector must be one of {' | '.join(DETECTORS)}, got {self.detector!r}")


@dataclass(frozen=True)
class RefConfig(DetectorConfig):
    """eval/fid.py ref: reference statistics (mu, sigma, mu_s, sigma_s, pool features)."""

    source: str = ""  # image folder or npz with arr_0
    out: str = ""  # output .npz
    center_crop: int | None = None  # ADM centre crop of folder images to this size
    recompute_stats: bool = False  # recompute mu/sigma even when the npz stores them


@dataclass(frozen=True)
class CalcConfig(DetectorConfig):
    """eval/fid.py calc: FID, sFID, IS, precision and recall of samples against a reference."""

    samples: str = ""  # sample folder (from gen) or npz with arr_0
    ref: str | None = None  # VIRTUAL_imagenet256_labeled.npz (default: weights/) or a `ref` output
    out: str | None = None  # results JSON (default: <folder>/metrics.json or <npz>.metrics.json)
    num_samples: int | None = None  # require exactly this many samples (e.g. 50000)
    shuffle_seed: int = 42  # order of a folder's samples for the IS splits (the authors' 42)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "MODEL_PRESETS",
    "model_preset",
    "TextureVAEConfig",
    "TEXTURE_VAE_PRESETS",
    "SemVAEConfig",
    "SEMVAE_PRESETS",
    "DinoConfig",
    "DINO_PRESETS",
    "preset",
    "TrainConfig",
    "TRAIN_PRESETS",
    "train_preset",
    "REPA_TARGET_DIMS",
    "model_config_from_json",
    "PosthocEmaConfig",
    "model_config_from_authors",
    "ENCODE_STAGES",
    "EncodeConfig",
    "TrainSemVAEConfig",
    "SamplingConfig",
    "SAMPLING_PRESETS",
    "SampleSourceConfig",
    "GridConfig",
    "GRID_PRESETS",
    "GenConfig",
    "GEN_PRESETS",
    "DetectorConfig",
    "RefConfig",
    "CalcConfig",
    "from_dict",
    "to_dict",
    "to_json",
    "override",
]

_loaded = True  # from here on, choices are checked against their registries (see _choice)
